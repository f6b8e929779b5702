"""A model the app does not ship, for `--run-config "model='examples.mlp:build_mlp'"`.

Any `package.module:build_fn` importable by the ServerApp and the ClientApps works (a module
inside the app folder travels in the app bundle; otherwise install the package). The function
is called with keyword arguments `in_channels`, `num_classes` and `image_size` and returns a
`torch.nn.Module` taking N x C x H x W images normalised per channel.
"""

from __future__ import annotations

from torch import nn


def build_mlp(
    *, in_channels: int, num_classes: int, image_size: int, hidden: int = 128
) -> nn.Module:
    """Flatten -> Linear -> ReLU -> Linear: every parameter (biases too) is exchanged and, under
    FedBAT, trained as a binarized update like any conv weight."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * image_size * image_size, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )
