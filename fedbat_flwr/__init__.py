"""fedbat-flwr: FedBAT and its baselines for Flower (1-bit uplink).

A library first: `FedBATStrategy` / `make_strategy` go into anyone's ServerApp and
`fedbat_flwr.client.train` into their ClientApp (docs/API.md); the app in this package
(`server_app`, `client_app`) is one user of them. Importing the package loads neither side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .strategies import FedBATStrategy, make_strategy

__all__ = ["FedBATStrategy", "make_strategy"]


def __getattr__(name: str) -> Any:
    """The server side on first use, so a ClientApp importing `fedbat_flwr.client` never
    loads it."""
    if name in __all__:
        from . import strategies

        return getattr(strategies, name)
    raise AttributeError(f"module 'fedbat_flwr' has no attribute {name!r}")
