"""hivemind.optim: collaborative training over the DHT (progress tracking, averaging of gradients and state)."""
