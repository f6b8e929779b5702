"""What a method is: a client part (torch), the payload kind the server decodes, a server part.

A method file defines one `Method` subclass and decorates it with `@register`. Both apps look the
method up by the run config's `method` and instantiate it once, which checks every option it
reads. The ClientApp calls `train`; the ServerApp asks for `server_part` (downlink,
aggregation, evaluation, state) and the strategy decodes replies with the payload kind's codec
in `fedbat_flwr.wire`. Adding a method therefore edits no other file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from torch import nn

from ..config import ConfigError, RunConfig
from ..data import TensorData
from ..task import build_model_for, client_seed, load_state, model_spec
from ..training import TensorBatches, default_device, prepare_model
from ..wire import AlphaBounds, ModelSpec
from ..wire.downlink import decode_downlink

if TYPE_CHECKING:  # the server side loads only where a server runs (tests/test_doors.py)
    from ..broadcast import Broadcast
    from ..server_part import ServerPart


@dataclass
class LocalTask:
    """Everything one client round needs; the model already holds the global weights."""

    model: nn.Module
    global_state: dict[str, np.ndarray]
    spec: ModelSpec
    batches: TensorBatches
    config: RunConfig
    device: torch.device
    seed: int
    server_round: int
    # Per-client memory that survives rounds (error feedback, virtual bits): numpy arrays by
    # name, stored by the ClientApp in Flower's `context.state`.
    state: MutableMapping[str, np.ndarray] = field(default_factory=dict)
    # The downlink payload as received; `global_state` is what `Method.receive` made of it.
    # Only methods whose downlink is not the dense model (FedBiF, FedPM) need to read it.
    downlink: Mapping[str, np.ndarray] = field(default_factory=dict)


@dataclass
class ClientUpdate:
    """What a client sends back: the encoded payload and the numbers the server weighs it by."""

    payload: dict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float]


class Method(ABC):
    """One training method (FedBAT or a baseline): its client part and its server part."""

    name: ClassVar[str]
    payload_kind: ClassVar[str]  # the wire codec the server decodes replies with
    # True for methods whose server sends a downlink of its own (FedBiF, FedPM): `downlink-bits`
    # quantizes the dense model broadcast, which they do not send.
    own_downlink: ClassVar[bool] = False
    # The run-config keys only some methods read that this one does (its options and, for the
    # 1-bit methods, `bn-payload`): a change of another method's option leaves this method's
    # runs as they are (fedbat-sweep).
    options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: RunConfig) -> None:
        if self.own_downlink and config.downlink_bits != 32:
            raise ConfigError(
                f"run-config 'downlink-bits' = {config.downlink_bits} does not apply to method "
                f"{self.name!r}, whose server sends its own downlink; allowed: 32"
            )
        self.config = config

    @classmethod
    def check_options(cls, config: RunConfig) -> None:
        """Check this method's `options` as `config` sets them, whichever method the run chose.

        The method is built from its own options with every other key at its default, so only
        a value (or a combination of its own options) this method refuses raises ConfigError:
        a run of another method thereby refuses `topk-density = 5`, which nothing accepts.
        """
        own = {key: value for key, value in config.to_flower().items() if key in cls.options}
        cls(RunConfig.from_flower({**own, "method": cls.name}))

    @abstractmethod
    def train(self, task: LocalTask) -> ClientUpdate:
        """Run one client round and encode the result."""

    @classmethod
    def aggregator(cls, config: RunConfig) -> str:
        """The server's aggregation rule for this method: the run config's `aggregator`.

        A method may map a key of its own onto it (signsgd: `sign-aggregation = "majority"`).
        """
        return config.aggregator

    def server_part(self, spec: ModelSpec) -> ServerPart:
        """This method's server side (docs/ARCHITECTURE.md, "Methods"). Default: broadcast the
        model (quantized with `downlink-bits` < 32), aggregate with the run's `aggregator`,
        evaluate the weights as they are."""
        from ..server_part import ServerPart

        return ServerPart(spec, self.broadcast(spec))

    def broadcast(self, spec: ModelSpec) -> Broadcast:
        """The model broadcast of this run (`downlink-bits`, noise from the run's seed), for a
        server part that sends the model as the default one does."""
        from ..broadcast import Broadcast

        return Broadcast(spec, self.config.downlink_bits, self.config.seed)

    @classmethod
    def step_bounds(cls, config: RunConfig) -> AlphaBounds:
        """The step sizes the server accepts in this method's replies (docs/ARCHITECTURE.md,
        "Influence of one client"): [alpha-min, alpha-max] for a sign kind's parameters,
        stat-alpha-max for BatchNorm statistics, max-update-entry for data-sized steps. A
        method whose step is a run-config constant narrows `param` to exactly that value."""
        return AlphaBounds(
            param=(config.alpha_min, config.alpha_max),
            stat=(0.0, config.stat_alpha_max),
            update=config.max_update_entry,
        )

    def receive(
        self,
        payload: Mapping[str, np.ndarray],
        spec: ModelSpec,
        state: MutableMapping[str, np.ndarray],
    ) -> dict[str, np.ndarray]:
        """The model state (every spec tensor) this client starts from, out of the downlink.

        Default: the payload is the dense global model, or with `downlink-bits` < 32 its
        quantized broadcast (validated: PayloadError). A method whose server part sends its own
        downlink decodes it here; ``state`` is the client's memory, for a downlink that only makes
        sense against what the client kept.
        """
        if self.config.downlink_bits != 32:
            return decode_downlink(payload, spec)
        return dict(payload)


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method selectable with `--run-config "method='<name>'"`."""
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    """The method class registered under `name`; the error lists the allowed names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        allowed = ", ".join(repr(n) for n in method_names())
        raise ValueError(f"run-config 'method' = {name!r} is unknown; allowed: {allowed}") from None


def client_task(
    method: Method,
    data: TensorData,
    downlink: dict[str, np.ndarray],
    *,
    partition_id: int,
    server_round: int,
    state: MutableMapping[str, np.ndarray] | None = None,
    device: torch.device | None = None,
    model: nn.Module | None = None,
) -> LocalTask:
    """One client round's LocalTask, exactly as the ClientApp builds it.

    The model (the run config's unless one is given) starts from what `method.receive` makes
    of the downlink, and trains on `data` in an order seeded by (run seed, round, partition).
    """
    config = method.config
    device = device or default_device()
    state = {} if state is None else state
    model = build_model_for(config) if model is None else model
    spec = model_spec(model)
    global_state = method.receive(downlink, spec, state)
    load_state(model, global_state)
    seed = client_seed(config, server_round, partition_id)
    generator = torch.Generator().manual_seed(seed)
    return LocalTask(
        model=prepare_model(model, device),
        global_state=global_state,
        spec=spec,
        batches=TensorBatches(data.x, data.y, config.batch_size, generator),
        config=config,
        device=device,
        seed=seed,
        server_round=server_round,
        state=state,
        downlink=downlink,
    )
