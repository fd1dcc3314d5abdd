"""The server side of mixture-of-experts: hosting experts, batching their requests and announcing them in the DHT."""
