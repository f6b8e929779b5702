"""quickstart: the model, the data of one node and the test loop (plain PyTorch and numpy)."""

import gzip
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist


class Net(nn.Module):
    """A small CNN for 28x28 grey images, 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 16, 5, padding=2), nn.Conv2d(16, 32, 5, padding=2)
        self.fc1, self.fc2 = nn.Linear(32 * 7 * 7, 128), nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


@lru_cache(maxsize=2)
def _read_idx(name: str) -> np.ndarray:
    """A gzipped IDX file of bytes, read once per process: a 4-byte magic whose last byte is
    the number of dimensions, a big-endian uint32 per dimension, then the data."""
    path = DATA_DIR / f"train-{name}.gz"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: this example reads Fashion-MNIST from {DATA_DIR} "
            "(sudo apt-get install dataset-fashion-mnist)"
        )
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    shape = np.frombuffer(raw, dtype=">u4", count=raw[3], offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * raw[3]).reshape(shape)


def load_data(
    partition_id: int, num_partitions: int, batch_size: int, max_examples: int = 0
) -> tuple[DataLoader, DataLoader]:
    """This node's IID share of the training set (at most `max_examples`, 0 = all), split
    80/20 into a train loader and a held-out test loader."""
    images, labels = _read_idx("images-idx3-ubyte"), _read_idx("labels-idx1-ubyte")
    order = np.random.default_rng(0).permutation(len(labels))
    share = order[partition_id::num_partitions]
    share = share[:max_examples] if max_examples > 0 else share
    x = (torch.from_numpy(images[share]).float().unsqueeze(1) / 255.0 - 0.5) / 0.5
    y = torch.from_numpy(labels[share].astype(np.int64))
    cut = int(0.8 * len(share))
    train, test = TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:])
    return DataLoader(train, batch_size, shuffle=True), DataLoader(test, batch_size)


def test(net: nn.Module, testloader: DataLoader, device: torch.device) -> tuple[float, float]:
    """Mean loss and accuracy of `net` on `testloader`."""
    net.to(device).eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for x, y in testloader:
            logits = net(x.to(device))
            loss += nn.functional.cross_entropy(logits, y.to(device), reduction="sum").item()
            correct += (logits.argmax(1) == y.to(device)).sum().item()
    n = len(testloader.dataset)
    return loss / n, correct / n
