"""hivemind-server: host mixture-of-experts layers for the swarm until SIGINT/SIGTERM.

Options come from the command line, from ``config.yml`` in the working directory and from ``--config FILE``
(YAML-like ``key: value`` lines with the long option names); the command line wins.
"""

import concurrent.futures
import functools
import io
import json
import re
import sys
from pathlib import Path
from typing import List, Optional

import configargparse

from hivemind.hivemind_cli.shutdown_signals import ShutdownSignals
from hivemind.proto.runtime_pb2 import CompressionType
from hivemind.utils.limits import increase_file_limit
from hivemind.utils.logging import get_logger, use_hivemind_log_handler
from hivemind.utils.networking import initial_peers_hint
from hivemind.utils.process_handle import how_it_ended, peek_exitcode

logger = get_logger(__name__)

OPTIMIZERS = ("adam", "sgd", "none")
SGD_LEARNING_RATE = 0.01
DAEMON_CHECK_TIMEOUT = 10.0  # seconds to wait for the DHT process to say whether p2pd runs


class ConfigFileParser(configargparse.DefaultConfigFileParser):
    """configargparse's ``key: value`` lines, where a list may also be a YAML block list: ``key:`` then ``- item``
    lines (an ``[a, b]`` value works as before)."""

    def parse(self, stream):
        lines, list_key, items = [], None, []

        def close_list():
            if list_key is not None:  # ("key:" and no items: the empty value, as before)
                lines.append(f"{list_key}: {json.dumps(items)}" if items else f"{list_key}:")

        for number, line in enumerate(stream, start=1):
            stripped = line.strip()
            item = re.fullmatch(r"-\s+(.*)|-", stripped)
            if item is not None:
                if list_key is None:
                    raise configargparse.ConfigFileParserException(
                        f"line {number} of {getattr(stream, 'name', 'the config file')}: the list item "
                        f"{stripped!r} follows no 'key:' line; write 'key:' on the line before the '- item' lines"
                    )
                items.append(_list_item(item.group(1) or ""))
                continue
            if not stripped or stripped.startswith("#"):
                continue
            close_list()
            list_key, items = None, []
            key = re.fullmatch(r"([^:=;#\s]+)\s*:(?:\s+[#;].*)?", stripped)
            if key is not None:  # "key:" with nothing (or a comment) after it: a block list may follow
                list_key = key.group(1)
                continue
            lines.append(stripped)
        close_list()
        return super().parse(io.StringIO("\n".join(lines)))


def _list_item(text: str) -> str:
    """The value of a ``- item`` line: unquoted, without a trailing ``# comment`` (as on ``key: value`` lines)."""
    quoted = re.fullmatch(r"""(['"])(.*)\1(?:\s+[#;].*)?""", text)
    if quoted is not None:
        return quoted.group(2)
    return re.sub(r"\s+[#;].*$", "", text).strip().strip("'\"")


def make_parser() -> configargparse.ArgParser:
    parser = configargparse.ArgParser(
        config_file_parser_class=ConfigFileParser,
        default_config_files=["config.yml"],
        description="Host mixture-of-experts layers (experts) and serve them to the hivemind swarm.",
    )
    parser.add("-c", "--config", required=False, is_config_file=True, help="Path to an extra config file")

    experts = parser.add_argument_group("Experts")
    experts.add("--num_experts", type=int, help="How many experts to host (use this or --expert_uids)")
    experts.add(
        "--expert_pattern",
        type=str,
        help="Uid pattern: dot-separated blocks, each a literal or a [a:b] range (random int in [a, b)), e.g. "
        "myexpert.[0:256].[0:1024]; without it the uids are expert.0, expert.1, ...",
    )
    experts.add("--expert_uids", type=str, nargs="*", help="Exact expert uids (not with --num_experts)")
    experts.add(
        "--expert_cls",
        type=str,
        default="ffn",
        help="Expert class: ffn, transformer, nop, nop_delay, det_dropout or one registered by --custom_module_path",
    )
    experts.add("--hidden_dim", type=int, default=1024, help="Hidden size of each expert and of its sample input")
    experts.add(
        "--custom_module_path",
        type=str,
        help="Python file executed at start-up that registers custom expert classes with @register_expert_class",
    )

    network = parser.add_argument_group("Network")
    network.add(
        "--host_maddrs",
        type=str,
        nargs="+",
        default=["/ip4/0.0.0.0/tcp/0"],
        help="Multiaddrs to listen on (default: all IPv4 interfaces, random TCP port)",
    )
    network.add("--announce_maddrs", type=str, nargs="+", help="Multiaddrs to advertise instead of the detected ones")
    network.add("--no_relay", action="store_false", dest="use_relay", help="Disable libp2p circuit relay")
    network.add("--use_auto_relay", action="store_true", help="Reserve slots on relays when behind NAT")
    network.add(
        "--initial_peers", type=str, nargs="*", default=[], help="Multiaddrs (with /p2p/<peer id>) of peers to join"
    )
    network.add("--identity_path", type=str, help="Private key file (created if missing) for a stable peer id")
    network.add(
        "--increase_file_limit",
        action="store_true",
        help="Raise the open-file limit to at least 32768 (many peers need many sockets)",
    )
    network.add(
        "--num_handlers",
        type=int,
        default=None,
        help="Serve requests from this many connection-handler processes (default: one handler thread in the "
        "server's process, which is faster)",
    )

    batching = parser.add_argument_group("Batching and device")
    batching.add("--min_batch_size", type=int, default=1, help="Minimum examples per processed batch")
    batching.add(
        "--max_batch_size",
        type=int,
        default=16384,
        help="Maximum examples per batch; a single request above it is refused",
    )
    batching.add("--device", type=str, default=None, help="Torch device of the experts (default: cuda if available)")

    training = parser.add_argument_group("Training")
    training.add("--optimizer", type=str, default="adam", choices=OPTIMIZERS, help="Expert optimizer")
    training.add("--scheduler", type=str, default="none", choices=("linear", "none"), help="Learning-rate schedule")
    training.add("--num_warmup_steps", type=int, default=None, help="Warm-up steps of the linear schedule")
    training.add("--num_training_steps", type=int, default=None, help="Total steps of the linear schedule")
    training.add("--clip_grad_norm", type=float, default=None, help="Clip the gradient norm of expert updates")

    upkeep = parser.add_argument_group("Announcements, checkpoints, statistics")
    upkeep.add(
        "--update_period", type=float, default=30, help="Seconds between DHT announcements (and checkpoint saves)"
    )
    upkeep.add(
        "--expiration",
        type=float,
        default=None,
        help="Lifetime of DHT announcements in seconds (default: max(2 x update_period, 3))",
    )
    upkeep.add(
        "--compression",
        type=str,
        default="NONE",
        choices=tuple(CompressionType.keys()),
        help="Compression of expert inputs and outputs on the wire (floating-point tensors)",
    )
    upkeep.add(
        "--checkpoint_dir",
        type=Path,
        default=None,
        help="Directory of expert checkpoints: experts found there are loaded, all are saved every update_period",
    )
    upkeep.add("--stats_report_interval", type=int, default=None, help="Seconds between throughput reports in the log")
    return parser


def make_optimizer_factory(name: str):
    """The optimizer class (or factory) for ``--optimizer``; ``None`` means the experts are not trained."""
    import torch  # imported late: Ctrl-C while torch loads (seconds) is already a clean shutdown

    if name == "adam":
        return torch.optim.Adam
    if name == "sgd":
        return functools.partial(torch.optim.SGD, lr=SGD_LEARNING_RATE)
    if name == "none":
        return None
    raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {name!r}")


def parse_server_options(parser: configargparse.ArgParser, argv: Optional[List[str]]) -> dict:
    """Parse the options into keyword arguments of ``Server.create`` (exits with status 2 on misuse)."""
    args = vars(parser.parse_args(argv))
    args.pop("config", None)
    if (args["num_experts"] is None) == (args["expert_uids"] is None):
        parser.error("give exactly one of --num_experts (optionally with --expert_pattern) and --expert_uids")
    if args["expert_uids"] is not None and args["expert_pattern"] is not None:
        parser.error("--expert_pattern generates uids for --num_experts; it cannot be combined with --expert_uids")
    if args["num_experts"] is not None and args["num_experts"] <= 0:
        parser.error(f"--num_experts must be a positive number of experts, got {args['num_experts']}")
    for flag in ("update_period", "stats_report_interval"):  # None (no statistics) is allowed for the latter
        if args[flag] is not None and args[flag] <= 0:
            parser.error(f"--{flag} must be a positive number of seconds, got {args[flag]}")
    for flag in ("hidden_dim", "min_batch_size", "max_batch_size", "num_handlers"):
        if args[flag] is not None and args[flag] < 1:
            parser.error(f"--{flag} must be at least 1, got {args[flag]}")
    if args["min_batch_size"] > args["max_batch_size"]:
        parser.error(f"--min_batch_size {args['min_batch_size']} is above --max_batch_size {args['max_batch_size']}")
    if args["expiration"] is not None and args["expiration"] <= args["update_period"]:
        parser.error(
            f"--expiration {args['expiration']} must be above --update_period {args['update_period']}: otherwise "
            f"the experts' announcements expire before they are renewed and clients cannot find them in between"
        )
    check_expert_flags(parser, args)
    args["optim_cls"] = make_optimizer_factory(args.pop("optimizer"))
    args["compression"] = CompressionType.Value(args["compression"])
    if not args.pop("increase_file_limit"):
        return args
    increase_file_limit()
    return args


def check_expert_flags(parser: configargparse.ArgParser, args: dict) -> None:
    """Usage errors (exit 2) for expert flags that Server.create would refuse only after its DHT started."""
    from hivemind.moe.expert_uid import is_valid_uid  # imported late: --help stays fast
    from hivemind.moe.server.expert_pattern import parse_expert_pattern

    if args["expert_pattern"] is not None:
        try:
            parse_expert_pattern(args["expert_pattern"])
        except ValueError as e:
            parser.error(str(e).replace("expert pattern ", "--expert_pattern ", 1))
    for uid in args["expert_uids"] or ():
        if not is_valid_uid(uid):
            parser.error(f"--expert_uids: {uid!r} is not a valid expert uid (e.g. ffn.3 or ffn.3.14)")
    path = args["custom_module_path"]
    if path is not None and not Path(path).expanduser().is_file():
        parser.error(f"--custom_module_path {path} does not exist or is not a file")
    from hivemind.moe.server.layers import add_custom_models_from_file, name_to_block

    if path is not None:
        add_custom_models_from_file(path)  # (run once per process: Server.create does not run it again)
    if args["expert_cls"] not in name_to_block:
        if path is None:
            problem = "is not a built-in expert class"
            advice = "register your own with @register_expert_class in a file given as --custom_module_path"
        else:
            problem = f"is neither a built-in expert class nor one that {path} registers"
            advice = "check the names it gives to @register_expert_class"
        parser.error(f"--expert_cls {args['expert_cls']!r} {problem} ({', '.join(sorted(name_to_block))}); {advice}")
    path = args["checkpoint_dir"]
    if path is not None and not path.is_dir():
        what = "is not a directory" if path.exists() else f"does not exist; create it (mkdir -p {path})"
        parser.error(f"--checkpoint_dir {path} {what}")
    if args["device"] is not None:
        import torch  # imported late (see make_optimizer_factory)

        try:
            torch.device(args["device"])
        except RuntimeError as e:
            parser.error(f"--device {args['device']!r} is not a torch device (e.g. cpu, cuda, cuda:1): {e}")
    if args["clip_grad_norm"] is not None and not args["clip_grad_norm"] > 0:  # (NaN too)
        parser.error(f"--clip_grad_norm must be a positive number, got {args['clip_grad_norm']}")
    if args["scheduler"] == "linear":
        warmup, total = args["num_warmup_steps"], args["num_training_steps"]
        if warmup is None or total is None:
            parser.error("--scheduler linear needs --num_warmup_steps and --num_training_steps")
        if not 0 <= warmup <= total:
            parser.error(f"need 0 <= --num_warmup_steps <= --num_training_steps, got {warmup} and {total}")


async def _p2p_daemon_alive(dht, node) -> bool:
    """Runs inside the DHT process: whether this peer's p2pd (which the server's handlers share) still runs."""
    return node.p2p.is_alive


def daemon_stopped(server) -> Optional[str]:
    """None while the server's p2pd daemon runs; otherwise what stopped (clients can no longer reach its experts)."""
    try:
        answer = server.dht.run_coroutine(_p2p_daemon_alive, return_future=True)
    except Exception as e:  # the DHT process itself is gone (its p2pd exits with it)
        return _dht_process_ended(server, e)
    try:
        return None if answer.result(timeout=DAEMON_CHECK_TIMEOUT) else "This server's p2pd daemon stopped (see above)"
    except concurrent.futures.TimeoutError:  # a busy DHT process: ask again at the next check
        answer.cancel()
        return None
    except Exception as e:
        return _dht_process_ended(server, e)


def _dht_process_ended(server, error: Exception) -> str:
    code = peek_exitcode(server.dht, wait=1.0)
    how = f"ended ({error})" if code is None else how_it_ended(code)
    return f"This server's DHT process {how}, and its p2pd daemon with it"


def main(argv: Optional[List[str]] = None) -> int:
    use_hivemind_log_handler("in_root_logger")  # everything goes to stderr through the root logger
    signals = ShutdownSignals().install()  # from here on, SIGINT/SIGTERM at any moment end in a clean shutdown
    server_options = parse_server_options(make_parser(), argv)  # (loads torch: seconds)
    if signals.requested.is_set():
        return 0

    from hivemind.moe.server import Server  # imported late: --help stays fast

    if signals.requested.is_set():
        return 0
    try:
        server = Server.create(**server_options, start=True)  # on failure, it stops whatever it started
    except Exception:
        if not signals.requested.is_set():
            raise
        # Ctrl-C reaches the whole process group: p2pd may have exited before the server's DHT was ready
        logger.debug("Start-up interrupted", exc_info=True)
        return 0
    try:
        if not signals.requested.is_set():
            try:
                hint = initial_peers_hint(server.dht.get_visible_maddrs())
                logger.info(f"To connect other peers to this server, use {hint}")
            except Exception as e:  # e.g. the DHT process or its p2pd ended since: the first check below says how
                logger.warning(f"Could not read this server's addresses for the --initial_peers hint: {e}")
                logger.debug("Reading the addresses failed", exc_info=True)
        while not signals.requested.wait(1.0):
            if not server.is_alive():
                logger.error("The server stopped on its own; exiting")
                return 1
            stopped = daemon_stopped(server)
            if stopped is not None:
                if signals.requested.wait(1.0):  # Ctrl-C reaches p2pd too: it may have stopped just before we knew
                    break
                logger.error(
                    f"{stopped}, so clients can no longer reach its experts; exiting. Start hivemind-server again "
                    f"(with the same --identity_path to keep its peer id)"
                )
                return 1
    finally:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
