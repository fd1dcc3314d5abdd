"""hivemind.p2p"""
