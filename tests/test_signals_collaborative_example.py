"""examples/collaborative_training: a second Ctrl-C while a trainer leaves the run does not cut its shutdown short."""

import os
import signal

import pytest
from signals_helpers import SessionProcess

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPOSITORY, "examples", "collaborative_training")
TINY = ["--host_maddrs", "/ip4/127.0.0.1/tcp/0", "--hidden_size", "32", "--num_layers", "1", "--num_heads", "2",
        "--seq_length", "32", "--data_bytes", "100000", "--batch_size", "8", "--target_batch_size", "64",
        "--num_threads", "1"]  # fmt: skip

# a second Ctrl-C reaches the process group just as the trainer starts shutting its optimizer down
SECOND_CTRL_C_DURING_SHUTDOWN = """
import os, signal
import hivemind
_original_shutdown = hivemind.Optimizer.shutdown

def _shutdown_after_another_ctrl_c(self):
    os.killpg(0, signal.SIGINT)
    _original_shutdown(self)

hivemind.Optimizer.shutdown = _shutdown_after_another_ctrl_c
"""


def trainer_script(args) -> str:
    path = os.path.join(EXAMPLE, "run_trainer.py")
    run = f"runpy.run_path({path!r}, run_name='__main__')"
    return f"{SECOND_CTRL_C_DURING_SHUTDOWN}\nimport runpy, sys\nsys.path.insert(0, {EXAMPLE!r})\n" + (
        f"sys.argv = {[path, *args]!r}\n{run}\n"
    )


@pytest.mark.timeout(120)
def test_trainer_second_ctrl_c_while_leaving_the_run_is_ignored():
    trainer = SessionProcess(trainer_script(TINY), cwd=EXAMPLE)
    try:
        trainer.wait_for(r"trainer joined run", timeout=100)
        trainer.signal_group(signal.SIGINT)
        assert trainer.finish() == 0, trainer.output()
        assert "interrupted: leaving the run" in trainer.lines, trainer.output()
        assert "interrupted while starting" not in trainer.lines, trainer.output()
        assert trainer.lines[-1].startswith("trainer finished at epoch"), trainer.output()
        assert "Traceback" not in trainer.output()
        assert trainer.leftovers() == [], trainer.output()
    finally:
        trainer.close()
