"""The FedBAT local trainer: Algorithm 1, client side (lines 10-24)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedbat_flwr.training.loop import TensorBatches, prepare_model, run_sgd
from fedbat_flwr.training.parametrize import (
    BinarizedUpdates,
    attach_binarized_updates,
    detach_binarized_updates,
)


@dataclass
class FedBATConfig:
    """Local hyperparameters; defaults are the paper's (Sec. 5.1: 10 epochs, batch 64, lr 0.1)."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.1
    rho: float = 6.0
    phi: float = 0.5
    alpha_min: float = 5e-4
    alpha_max: float = 5e-2
    # Binarize conv / linear weights only; train BatchNorm affine and biases in full precision
    # (run-config bn-payload float16 / float32, as the authors' code does).
    only_matrices: bool = False

    def __post_init__(self) -> None:
        checks = [
            ("epochs", self.epochs, self.epochs >= 1, "an integer >= 1"),
            ("batch_size", self.batch_size, self.batch_size >= 1, "an integer >= 1"),
            ("lr", self.lr, self.lr > 0, "> 0"),
            ("rho", self.rho, self.rho >= 0, ">= 0"),
            ("phi", self.phi, 0 <= self.phi <= 1, "in [0, 1]"),
            ("alpha_min", self.alpha_min, self.alpha_min > 0, "> 0"),
            ("alpha_max", self.alpha_max, self.alpha_max >= self.alpha_min, ">= alpha_min"),
        ]
        for field, value, ok, allowed in checks:
            if not ok or (isinstance(value, float) and math.isnan(value)):
                raise ValueError(f"FedBATConfig.{field}={value!r} is invalid; allowed: {allowed}")


@dataclass
class FedBATResult:
    """What one client sends: per tensor (state_dict name) its bits (True = +alpha) and alpha."""

    bits: dict[str, np.ndarray]  # the binarized tensors only
    alphas: dict[str, float]
    num_examples: int
    train_loss: float
    steps: int
    switch_step: int  # floor(phi * tau): first binarization-aware step (= steps when phi = 1)


def switch_step(phi: float, tau: int) -> int:
    """floor(phi * tau) (Algorithm 1, line 14), robust to float error (0.29 * 100 -> 29)."""
    return math.floor(round(phi * tau, 9))


def train_fedbat(
    model: nn.Module,
    batches: TensorBatches,
    config: FedBATConfig,
    *,
    device: torch.device,
    seed: int,
) -> FedBATResult:
    """Learn a binarized update of ``model``'s (global, frozen) parameters on ``batches``.

    Steps s < floor(phi tau) train the update m in full precision (Eq. 12); at
    s = floor(phi tau) every tensor gets alpha' = mean|m|, alpha_e = 0 (Eq. 13) and the remaining
    steps train m and alpha_e through S (Eq. 14). With phi = 1 no binarized step runs: the
    switch is made after the last step so the result is still 1 bit + alpha (alpha' = mean|m|).
    With phi = 0, m = 0 at the switch, so alpha' = 0 and the clamp lifts alpha to alpha_min.

    On return the binarized parameters hold their original weights again; BN statistics (and,
    with ``only_matrices``, the plain parameters) stay as trained. ``seed`` fixes S's noise.
    """
    if batches.num_examples == 0:
        raise ValueError("batches is empty: a client needs at least one example to train")
    model = prepare_model(model, device)
    noise = torch.Generator(device=device).manual_seed(seed)
    bounds = {"alpha_min": config.alpha_min, "alpha_max": config.alpha_max}
    updates = attach_binarized_updates(
        model, rho=config.rho, **bounds, generator=noise, only_matrices=config.only_matrices
    )
    switch = switch_step(config.phi, config.epochs * len(batches))
    try:
        steps, train_loss = _train_through_switch(model, updates, batches, config, device, switch)
        bits = {k: _to_numpy(b) for k, b in updates.final_bits().items()}
        alphas = updates.final_alphas()
    finally:
        detach_binarized_updates(model)
    return FedBATResult(bits, alphas, batches.num_examples, train_loss, steps, switch)


def _train_through_switch(
    model: nn.Module,
    updates: BinarizedUpdates,
    batches: TensorBatches,
    config: FedBATConfig,
    device: torch.device,
    switch: int,
) -> tuple[int, float]:
    """SGD on the updates (and any plain parameter), binarizing from step `switch` on; with
    phi = 1 the switch comes after the last step. Returns (steps, mean training loss)."""
    plain = [p for p in model.parameters() if p.requires_grad]  # only_matrices leaves these

    def on_step(step: int) -> None:
        if step == switch:
            updates.start_binarization()

    trained = [updates.update, updates.alpha_e, *plain]
    steps, train_loss = run_sgd(
        model, trained, batches, epochs=config.epochs, lr=config.lr, device=device, on_step=on_step
    )
    if switch >= steps:  # phi = 1: no binarized step ran
        on_step(switch)
    return steps, train_loss


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """Logical (C-order) copy on the host, whatever the tensor's memory format."""
    return np.ascontiguousarray(t.detach().cpu().numpy())
