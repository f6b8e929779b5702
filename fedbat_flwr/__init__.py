"""fedbat-flwr: FedBAT and its baselines as a Flower app (1-bit uplink)."""
