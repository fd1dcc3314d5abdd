"""hivemind.compression"""
