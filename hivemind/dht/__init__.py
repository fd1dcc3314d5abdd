"""hivemind.dht"""
