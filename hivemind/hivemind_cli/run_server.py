"""hivemind-server: serve mixture-of-experts layers to the swarm (not implemented yet)."""

import sys


def main() -> int:
    print("hivemind-server is not implemented yet in this release", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
