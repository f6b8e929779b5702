"""Local training loop on a pre-tensorised partition: batches, SGD, evaluation, device helpers."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def use_threads(count: int) -> None:
    """torch's intra-op threads for this process; 0 keeps torch's default. Results repeat
    exactly only at one count: a reduction is split differently across threads."""
    if count and torch.get_num_threads() != count:
        torch.set_num_threads(count)


# glibc mallopt parameters and the values keep_freed_memory sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed value on 64-bit
_TRIM_THRESHOLD = 256 * 2**20


@functools.cache
def keep_freed_memory() -> bool:
    """Let glibc keep freed tensor memory for reuse instead of returning it to the OS.

    torch's CPU allocator is plain malloc. By default glibc serves each ~1-6 MB activation,
    gradient or update buffer with a fresh mmap (or trims it off the heap when freed), so every
    training step page-faults its memory back in: ~1,000-2,000 minor faults and ~15 % of a
    CNN4 step here (benchmarks/NOTES.md). Raising the mmap and trim thresholds makes the
    buffers come back from the heap, as torch's CUDA caching allocator does on GPUs.

    Process-wide, so the process's entry point calls it, not a training loop: the ClientApp at
    start-up (its lifespan), the benchmarks before they time a step. Once per process; a no-op
    (False) where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    return bool(
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    )


@dataclass
class TensorBatches:
    """A client partition held as two tensors, cut into shuffled mini-batches each epoch.

    ``x`` is float32 N x C x H x W, already normalised; ``y`` int64 labels. Indexing whole
    tensors avoids a DataLoader's per-item work; ``generator`` (seeded by the caller) fixes the
    order. The last partial batch is kept.
    """

    x: torch.Tensor
    y: torch.Tensor
    batch_size: int
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if len(self.x) != len(self.y):
            raise ValueError(f"x has {len(self.x)} examples but y has {len(self.y)}")

    @property
    def num_examples(self) -> int:
        return len(self.y)

    def __len__(self) -> int:
        return math.ceil(self.num_examples / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(self.num_examples, generator=self.generator).to(self.x.device)
        for start in range(0, self.num_examples, self.batch_size):
            idx = order[start : start + self.batch_size]
            yield self.x[idx], self.y[idx]

    def to(
        self, device: torch.device, memory_format: torch.memory_format = torch.preserve_format
    ) -> TensorBatches:
        """The same partition on ``device`` (and layout), converted once for all epochs."""
        x = self.x.to(device)
        if x.dim() == 4 and memory_format is not torch.preserve_format:
            x = x.contiguous(memory_format=memory_format)
        return TensorBatches(x, self.y.to(device), self.batch_size, self.generator)


def input_memory_format(model: nn.Module) -> torch.memory_format:
    """The layout inputs should have: channels_last when the model's conv weights are."""
    for p in model.parameters():
        is_nhwc = p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last)
        if is_nhwc and not p.is_contiguous():
            return torch.channels_last
    return torch.preserve_format


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Move ``model`` to ``device``; on CPU store conv nets channels_last (CNN4: 1.4-1.6x faster).

    ``run_sgd`` and ``evaluate`` then convert inputs to the same layout (see
    ``input_memory_format``), once per partition or evaluation batch.
    """
    model = model.to(device)
    is_conv_net = any(p.dim() == 4 for p in model.parameters())
    if torch.device(device).type == "cpu" and is_conv_net:
        model = model.to(memory_format=torch.channels_last)
    return model


def keep_strides(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Give ``out`` the strides of ``like`` (a copy, needed only for a few small tensors).

    Elementwise ops drop the channels_last hint of a conv weight with one input channel
    (strides of size-1 dims are ambiguous); oneDNN would then run that conv, and the layers after
    it, in the slower NCHW layout.
    """
    if out.stride() == like.stride():
        return out
    return torch.empty_like(like).copy_(out)


def run_sgd(
    model: nn.Module,
    params: Iterable[torch.Tensor],
    batches: TensorBatches,
    *,
    epochs: int,
    lr: float,
    device: torch.device,
    on_step: Callable[[int], None] | None = None,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> tuple[int, float]:
    """Plain SGD with cross-entropy on ``params`` for ``epochs`` passes over ``batches``.

    ``on_step(s)`` runs before each step s = 0..tau-1 (FedBAT switches phase there). Returns
    (steps, mean of the per-step batch losses); the loss is summed on device and read once.
    """
    # foreach: one C++ loop over the tensors instead of a Python loop (not the CPU default).
    optimizer = torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=True
    )
    batches = batches.to(device, input_memory_format(model))
    model.train()
    loss_sum = torch.zeros((), device=device)
    step = 0
    for _ in range(epochs):
        for x, y in batches:
            if on_step is not None:
                on_step(step)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            step += 1
    return step, float(loss_sum) / max(step, 1)


@torch.no_grad()
def recompute_batchnorm_statistics(
    model: nn.Module, batches: TensorBatches, *, device: torch.device
) -> None:
    """Re-estimate every BatchNorm layer's running mean/var for the model's current weights.

    One pass over ``batches`` in train mode with a cumulative average (momentum None), no
    gradients; momenta and the train/eval mode are restored afterwards.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [norm.momentum for norm in norms]
    was_training = model.training
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    try:
        for x, _ in batches.to(device, input_memory_format(model)):
            model(x)
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        model.train(was_training)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int = 1024,
    device: torch.device,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (eval mode) on ``x``, ``y``."""
    model.eval()
    memory_format = input_memory_format(model)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    for start in range(0, len(y), batch_size):
        xb = x[start : start + batch_size].to(device)
        if xb.dim() == 4 and memory_format is not torch.preserve_format:
            xb = xb.contiguous(memory_format=memory_format)
        yb = y[start : start + batch_size].to(device)
        logits = model(xb)
        loss_sum += F.cross_entropy(logits, yb, reduction="sum")
        correct += (logits.argmax(dim=1) == yb).sum()
    n = max(len(y), 1)
    return float(loss_sum) / n, int(correct) / n
