"""quickstart: Flower's PyTorch quickstart, trained with FedBAT (fedbat-flwr)."""
