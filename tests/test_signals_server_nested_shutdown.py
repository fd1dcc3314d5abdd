"""A SIGTERM handler that calls Server.shutdown() while the main thread is inside Server.shutdown() already (e.g. in a
``finally:`` block): the nested call returns at once and the server stops. Each case runs in its own process: the
deadlock it guards against never ends."""

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, threading, time

    import torch

    from hivemind.dht import DHT
    from hivemind.moe import ModuleBackend, Server
    from hivemind.utils.tensor_descr import BatchTensorDescriptor


    class SignalOnClose:  # a pool's batch pipe whose closing (inside the pool's lock) is interrupted by a signal
        def __init__(self, connection):
            self._connection = connection

        def __getattr__(self, name):
            return getattr(self._connection, name)

        def close(self):
            os.kill(os.getpid(), signal.SIGUSR1)  # (its handler runs at the next line of Python code, right here)
            self._connection.close()


    if __name__ == "__main__":
        case = sys.argv[1]
        schema = (BatchTensorDescriptor(4),)
        backends = {"ffn.0": ModuleBackend("ffn.0", torch.nn.Linear(4, 4), args_schema=schema, max_batch_size=8)}
        dht = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        server = Server(dht, backends, num_connection_handlers=1, start=case != "while_starting")
        nested = []

        def handler(signum, frame):
            nested.append(None)
            started = time.monotonic()
            server.shutdown()
            nested[-1] = time.monotonic() - started

        signal.signal(signal.SIGUSR1, handler)
        if case == "pool_lock":
            pool = backends["ffn.0"].forward_pool
            pool._batch_sender = SignalOnClose(pool._batch_sender)
        elif case == "handler_pipe":  # the signal comes while a connection handler's pipe is being closed
            (handler_process,) = server.conn_handlers
            handler_process._outer_pipe = SignalOnClose(handler_process._outer_pipe)
        else:  # shut down while the server thread starts: it then stops what it started, under the stop lock
            stop_runtime = server.runtime.shutdown

            def signalled_runtime_shutdown(*args, **kwargs):
                if nested or not threading.current_thread() is threading.main_thread():
                    return stop_runtime(*args, **kwargs)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:  # until the server thread waits for the lock held here
                    frame = sys._current_frames().get(server.ident)
                    if frame is None or "_stop_parts" in {frame.f_code.co_name, frame.f_back.f_code.co_name}:
                        break
                    time.sleep(0.001)
                os.kill(os.getpid(), signal.SIGUSR1)
                stop_runtime(*args, **kwargs)

            server.runtime.shutdown = signalled_runtime_shutdown
            server.start()
        started = time.monotonic()
        server.shutdown()
        print(f"outer {time.monotonic() - started:.2f} nested {nested} alive {server.is_alive()}", flush=True)
        dht.shutdown()
    """
)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("case", ["pool_lock", "handler_pipe", "while_starting"])
def test_server_shutdown_from_a_signal_handler_inside_shutdown_returns_at_once(tmp_path, case):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    try:
        result = subprocess.run(
            [sys.executable, str(script), case], capture_output=True, text=True, timeout=40, cwd=tmp_path
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the script hung: {str(e.stdout)[-2000:]} {str(e.stderr)[-3000:]}")
    assert result.returncode == 0, result.stderr[-3000:]
    outer, outer_seconds, _, nested, _, alive = result.stdout.split()[0:6]
    nested_seconds = [float(x) for x in nested.strip("[]").split(",")]
    assert len(nested_seconds) == 1 and nested_seconds[0] < 5, result.stdout
    assert float(outer_seconds) < 8 and alive == "False", result.stdout
    assert "did not stop" not in result.stderr, result.stderr[-3000:]
