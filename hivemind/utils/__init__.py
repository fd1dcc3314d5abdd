"""hivemind.utils"""
