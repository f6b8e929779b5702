"""The one error a decoder raises for a bad payload.

A client payload is untrusted input. When it is rejected, the server log must say which tensor
(layer), which payload field, what value was found and what was allowed, so the offending client
or codec bug can be found without a debugger.
"""

from __future__ import annotations


class PayloadError(ValueError):
    """A payload failed validation.

    Attributes:
        layer: the tensor the problem is about, or None for payload-wide fields.
        field: the payload key (e.g. ``"alphas"``) or input the problem is in.
        reason: the bad value and what is allowed, e.g.
            ``"alpha=nan is not finite (allowed: finite, within [0.0005, 0.05])"``.
    """

    def __init__(self, layer: str | None, field: str, reason: str) -> None:
        # Pass all three to ValueError so the exception pickles (Ray / multiprocessing).
        super().__init__(layer, field, reason)
        self.layer = layer
        self.field = field
        self.reason = reason

    def __str__(self) -> str:
        where = f"field {self.field!r}"
        if self.layer is not None:
            where = f"layer {self.layer!r}, {where}"
        return f"payload rejected: {where}: {self.reason}"
