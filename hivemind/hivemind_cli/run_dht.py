"""hivemind-dht: run a standalone DHT peer (e.g. the bootstrap peer of a swarm) until SIGINT/SIGTERM."""

import argparse
import functools
import logging
import secrets
import sys
from typing import List, Optional, Tuple

from hivemind.dht import DHT, DHTNode
from hivemind.dht.process_channel import ChannelClosedError
from hivemind.hivemind_cli.shutdown_signals import ShutdownSignals
from hivemind.utils.logging import get_logger, use_hivemind_log_handler
from hivemind.utils.networking import log_visible_maddrs
from hivemind.utils.process_handle import how_it_ended, peek_exitcode

logger = get_logger(__name__)


async def report_status(dht: DHT, node: DHTNode, with_dumps: bool = True) -> Optional[Tuple[int, int, str, str]]:
    """
    Runs inside the DHT process: look up a random heartbeat key (exercising and refreshing the routing table), then
    return (nodes known including this one, live stored keys, routing table dump, storage dump) for the log.
    The dumps are empty strings unless ``with_dumps`` (they are only logged at debug level).
    Returns None when this peer's p2pd daemon is gone: other peers can no longer reach it.
    """
    if not node.p2p.is_alive:
        return None
    await node.get(f"heartbeat_{secrets.token_hex(16)}", latest=True)
    routing_table = node.protocol.routing_table
    num_nodes = 1 + sum(len(bucket.nodes) + len(bucket.replacements) for bucket in routing_table.buckets)
    stored = list(node.protocol.storage.items())
    if not with_dumps:
        return num_nodes, len(stored), "", ""
    storage_dump = "\n".join(f"{key!r}: {item!r}" for key, item in stored)
    return num_nodes, len(stored), repr(routing_table), storage_dump


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Run a standalone hivemind DHT peer until interrupted.")
    parser.add_argument(
        "--initial_peers", nargs="*", help="Multiaddrs (ending in /p2p/<peer id>) of existing peers to join"
    )
    parser.add_argument(
        "--host_maddrs",
        nargs="*",
        default=["/ip4/0.0.0.0/tcp/0"],
        help="Multiaddrs to listen on (default: all IPv4 interfaces, random TCP port)",
    )
    parser.add_argument(
        "--announce_maddrs", nargs="*", help="Multiaddrs to advertise instead of the detected ones (explicit ports)"
    )
    parser.add_argument(
        "--use_ipfs",
        action="store_true",
        help="Bootstrap through the public IPFS DHT; initial peers may then be given as bare /p2p/<peer id>",
    )
    parser.add_argument(
        "--identity_path", help="Private key file (created if missing) that keeps the peer id stable across restarts"
    )
    parser.add_argument("--no_relay", action="store_false", dest="use_relay", help="Disable libp2p circuit relay")
    parser.add_argument(
        "--use_auto_relay", action="store_true", help="Look for relays to become reachable from behind NAT"
    )
    parser.add_argument(
        "--refresh_period", type=int, default=30, help="Seconds between status reports / routing table refreshes"
    )
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    use_hivemind_log_handler("in_root_logger")  # all output goes to stderr through the root logger
    parser = make_parser()
    dht_options = vars(parser.parse_args(argv))  # flag names are DHT / P2P option names
    refresh_period = dht_options.pop("refresh_period")
    if refresh_period <= 0:
        parser.error(f"--refresh_period must be a positive number of seconds, got {refresh_period}")
    signals = ShutdownSignals().install()  # from here on, SIGINT/SIGTERM at any moment end in dht.shutdown() below
    dht = DHT(start=False, **dht_options)
    try:
        try:
            dht.run_in_background(await_ready=True)
            visible_maddrs = dht.get_visible_maddrs()
        except ChannelClosedError as e:  # the DHT process ended right after it started (killed, out of memory)
            if signals.requested.is_set():
                return 0
            logger.error(f"{e}; exiting. Start hivemind-dht again")
            return 1
        except Exception:
            if not signals.requested.is_set():
                raise
            # Ctrl-C reaches the whole process group: p2pd may have exited before this peer was ready
            logger.debug("Start-up interrupted", exc_info=True)
            return 0
        if signals.requested.is_set():
            return 0
        log_visible_maddrs(visible_maddrs, only_p2p=dht_options["use_ipfs"])
        while not signals.requested.is_set():  # a first report at once (did this peer join?), then periodically
            with_dumps = logger.isEnabledFor(logging.DEBUG)
            report = functools.partial(report_status, with_dumps=with_dumps)
            try:
                status = dht.run_coroutine(report)
            except Exception:
                if signals.requested.is_set():
                    break  # e.g. a SIGTERM to the whole process group stopped the DHT process meanwhile
                code = peek_exitcode(dht, wait=1.0)
                if code is None:  # (the DHT process runs: some other failure)
                    raise
                logger.error(
                    f"This peer's DHT process {how_it_ended(code)}, and its p2pd daemon with it, so other peers "
                    f"can no longer reach it; exiting. Start hivemind-dht again (with the same --identity_path to "
                    f"keep its peer id)"
                )
                return 1
            if status is None:
                if signals.requested.wait(1.0):  # Ctrl-C reaches p2pd too: it may have stopped just before we knew
                    break
                logger.error(
                    "This peer's p2pd daemon stopped (see above), so other peers can no longer reach it; exiting. "
                    "Start hivemind-dht again (with the same --identity_path to keep its peer id)"
                )
                return 1
            num_nodes, num_keys, routing_dump, storage_dump = status
            logger.info(f"{num_nodes} DHT nodes (including this one) are in the local routing table ")
            logger.debug(f"Routing table contents: {routing_dump}")
            logger.info(f"Local storage contains {num_keys} keys")
            logger.debug(f"Local storage contents: {storage_dump}")
            signals.requested.wait(refresh_period)
    finally:
        dht.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
