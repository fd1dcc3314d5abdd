"""hivemind-dht: run a standalone DHT peer (not implemented yet; lands with the DHT)."""

import sys


def main() -> int:
    print("hivemind-dht is not implemented yet in this release", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
