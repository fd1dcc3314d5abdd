"""Command-line entry points (hivemind-dht, hivemind-server) and the bundled p2pd binary."""
