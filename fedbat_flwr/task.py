"""What both apps share: building the model a run config asks for and moving its state.

The exchanged state is every floating-point `state_dict` entry (see docs/ARCHITECTURE.md);
`num_batches_tracked` stays local because BatchNorm uses a fixed momentum and never reads it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .config import RunConfig
from .data import DataConfig, info_for
from .training import build_model
from .wire import ModelSpec


def build_model_for(config: RunConfig) -> nn.Module:
    """The configured model (the paper's, or a user's "package.module:build_fn") for the
    configured data set, initialised from the run's seed.

    The weights are drawn from torch's CPU generator seeded inside `fork_rng`, so building a
    model gives the same weights for a seed and leaves the caller's global RNG as it was.
    """
    info = info_for(data_config(config, num_partitions=1))
    width = config.resnet_width
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(config.seed)
        return build_model(
            config.model_name,
            in_channels=info.channels,
            num_classes=info.num_classes,
            image_size=info.image_size,
            resnet_widths=(width, 2 * width, 4 * width, 8 * width),
            cnn4_width=config.cnn4_width,
        )


def state_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """The exchanged state as float32 numpy arrays, in `state_dict` order."""
    return {
        name: tensor.detach().cpu().float().numpy().copy()
        for name, tensor in model.state_dict().items()
        if tensor.is_floating_point()
    }


def model_spec(model: nn.Module) -> ModelSpec:
    """Names, shapes, kinds and update domains the server expects in every reply."""
    return ModelSpec.from_arrays(state_arrays(model))


def load_state(model: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Load received global arrays; only non-float buffers may be missing."""
    tensors = {name: torch.from_numpy(np.asarray(value)) for name, value in arrays.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    float_missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if float_missing or unexpected:
        raise ValueError(
            f"global arrays do not fit the model: missing {float_missing}, unexpected {unexpected}"
        )


def data_config(config: RunConfig, num_partitions: int) -> DataConfig:
    """The data settings of a run, for `num_partitions` clients."""
    return DataConfig(
        dataset=config.dataset,
        partitioner=config.partitioner,
        num_partitions=num_partitions,
        dirichlet_alpha=config.dirichlet_alpha,
        labels_per_client=config.labels_per_client,
        seed=config.seed,
        data_dir=config.data_dir or None,
        max_examples_per_client=config.max_examples_per_client or None,
        image_column=config.get("image-column", ""),
        label_column=config.get("label-column", ""),
    )


def client_seed(config: RunConfig, server_round: int, partition_id: int) -> int:
    """A distinct, reproducible seed for each (run seed, round, client)."""
    return (config.seed * 1_000_003 + server_round * 10_007 + partition_id) % (2**31 - 1)
