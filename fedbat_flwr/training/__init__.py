"""Training room (torch only, never flwr): S(m, alpha), parametrized updates, models, loops."""

from fedbat_flwr.training.binarize import StochasticBinarize, binarize
from fedbat_flwr.training.fedbat import FedBATConfig, FedBATResult, switch_step, train_fedbat
from fedbat_flwr.training.loop import (
    TensorBatches,
    default_device,
    evaluate,
    input_memory_format,
    keep_freed_memory,
    prepare_model,
    recompute_batchnorm_statistics,
    run_sgd,
    use_threads,
)
from fedbat_flwr.training.models import CNN4, ResNet10, build_model
from fedbat_flwr.training.parametrize import (
    BinarizedUpdates,
    attach_binarized_updates,
    binarized_updates_of,
    detach_binarized_updates,
    original_name,
)

__all__ = [
    "CNN4",
    "BinarizedUpdates",
    "FedBATConfig",
    "FedBATResult",
    "ResNet10",
    "StochasticBinarize",
    "TensorBatches",
    "attach_binarized_updates",
    "binarize",
    "binarized_updates_of",
    "build_model",
    "default_device",
    "detach_binarized_updates",
    "evaluate",
    "input_memory_format",
    "keep_freed_memory",
    "original_name",
    "prepare_model",
    "recompute_batchnorm_statistics",
    "run_sgd",
    "switch_step",
    "train_fedbat",
    "use_threads",
]
