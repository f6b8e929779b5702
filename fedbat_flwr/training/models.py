"""The paper's models (Table 4): a 4-layer CNN (FMNIST, SVHN) and ResNet-10 (CIFAR-10/100)."""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Sequence

from torch import Tensor, nn

from fedbat_flwr.config import AUTO_MODEL, MODELS

_INIT_STD = 0.01  # authors' code: conv/linear weights ~ N(0, 0.01^2)


def _init_weights(model: nn.Module) -> None:
    """N(0, 0.01) for conv/linear weights as in the authors' code; BatchNorm keeps torch's init."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=_INIT_STD)


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False)
    return [conv, nn.BatchNorm2d(out_ch)]


class CNN4(nn.Module):
    """4 x [conv 3x3, BN, ReLU, max-pool 2] with widths w/2w/4w/8w (Table 4: w = 32), then one
    bias-free Linear. A wider w over-parameterizes it (FedPM's random networks)."""

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, width: int = 32
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        widths = (in_channels, width, 2 * width, 4 * width, 8 * width)
        for in_ch, out_ch in itertools.pairwise(widths):
            layers += [*_conv_bn(in_ch, out_ch, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        side = image_size // 16
        if side < 1:
            raise ValueError(f"image_size={image_size} is too small for CNN4 (need >= 16)")
        self.classifier = nn.Linear(8 * width * side * side, num_classes, bias=False)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


class BasicBlock(nn.Module):
    """He et al. (2016) basic block: two 3x3 conv+BN, identity or 1x1 conv+BN shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn(in_ch, out_ch, 3, stride), nn.ReLU(inplace=True), *_conv_bn(out_ch, out_ch, 3)
        )
        needs_projection = stride != 1 or in_ch != out_ch
        self.shortcut = (
            nn.Sequential(*_conv_bn(in_ch, out_ch, 1, stride))
            if needs_projection
            else nn.Identity()
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class ResNet10(nn.Module):
    """Stem conv 3x3 + BN + ReLU, four BasicBlocks (strides 1, 2, 2, 2), global avg pool, Linear.

    Table 4 uses widths 32/64/128/256; the authors' code uses 64/128/256/512 (``widths``).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: Sequence[int] = (32, 64, 128, 256),
    ) -> None:
        super().__init__()
        if len(widths) != 4:
            raise ValueError(f"widths={tuple(widths)} must have 4 entries (one per BasicBlock)")
        self.stem = nn.Sequential(*_conv_bn(in_channels, widths[0], 3), nn.ReLU(inplace=True))
        blocks = []
        in_ch = widths[0]
        for i, out_ch in enumerate(widths):
            blocks.append(BasicBlock(in_ch, out_ch, stride=1 if i == 0 else 2))
            in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(widths[-1], num_classes, bias=False)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.blocks(self.stem(x))).flatten(1))


def build_model(
    name: str,
    *,
    in_channels: int,
    num_classes: int,
    image_size: int,
    resnet_widths: Sequence[int] = (32, 64, 128, 256),
    cnn4_width: int = 32,
) -> nn.Module:
    """Build a model by its run-config name: "cnn4", "resnet10" or "package.module:build_fn"."""
    if ":" in name:
        return build_user_model(
            name, in_channels=in_channels, num_classes=num_classes, image_size=image_size
        )
    if name == "cnn4":
        return CNN4(in_channels, num_classes, image_size, width=cnn4_width)
    if name == "resnet10":
        return ResNet10(num_classes=num_classes, in_channels=in_channels, widths=resnet_widths)
    built_in = ", ".join(m for m in MODELS if m != AUTO_MODEL)
    raise ValueError(
        f"run-config 'model' = {name!r} is not allowed; allowed: {built_in} or "
        "'package.module:build_fn'"
    )


def build_user_model(
    spec: str, *, in_channels: int, num_classes: int, image_size: int
) -> nn.Module:
    """A user's model: `spec` = "package.module:build_fn", called with keyword arguments
    in_channels, num_classes and image_size; it must return a torch.nn.Module.

    Every method exchanges the model's floating-point state_dict entries and trains its
    parameters, so any layer type works; floating-point buffers other than BatchNorm running
    statistics have no update rule and are refused.
    """
    module_name, _, function_name = spec.partition(":")
    prefix = f"run-config 'model' = {spec!r}"
    try:
        build_fn = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(
            f"{prefix}: cannot load it ({type(exc).__name__}: {exc}); allowed: an importable "
            "'package.module:build_fn' (installed, or a module inside the app folder)"
        ) from None
    model = build_fn(in_channels=in_channels, num_classes=num_classes, image_size=image_size)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{prefix} returned {type(model).__name__}; allowed: a torch.nn.Module")
    buffers = [
        name
        for name, buffer in model.named_buffers()
        if buffer.is_floating_point() and not name.endswith(("running_mean", "running_var"))
    ]
    if buffers:
        raise ValueError(
            f"{prefix} has floating-point buffers {buffers}; only parameters and BatchNorm "
            "running statistics can be exchanged (make them parameters or non-float)"
        )
    return model
