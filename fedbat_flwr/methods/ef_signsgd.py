"""EF-SignSGD (Karimireddy et al., 2019): error feedback makes the 1-bit update unbiased over time.

Per parameter tensor: p = m + e (e = what earlier rounds failed to send, 0 at first), send
sign(p) with alpha = ||p||_1 / d, keep e <- p - alpha sign(p). No hyperparameter (Appendix A.2).
The residual e is this client's memory: `task.state[tensor name]`, which the ClientApp stores
in Flower's `context.state`, so it survives rounds (and rounds the client sits out).
BatchNorm running statistics travel 1-bit with alpha = mean|delta| and no residual (`stat_signs`),
refitted to the sent weights first (`encode_param_signs`).
"""

from __future__ import annotations

from collections.abc import MutableMapping

import numpy as np

from .base import ClientUpdate, LocalTask, Method, register
from .common import encode_param_signs, local_delta, signed_params, train_plain


@register
class EFSignSGD(Method):
    """SignSGD with the binarization error carried into the next round."""

    name = "ef-signsgd"
    payload_kind = "signs-unbounded"  # alpha = ||p||_1 / d has no a-priori bound
    options = ("bn-payload",)

    def train(self, task: LocalTask) -> ClientUpdate:
        loss = train_plain(task)
        delta = local_delta(task)
        bits: dict[str, np.ndarray] = {}
        alphas: dict[str, float] = {}
        for t in signed_params(task):
            bits[t.name], alphas[t.name] = error_feedback_step(task.state, t.name, delta[t.name])
        payload = encode_param_signs(task, delta, bits, alphas)
        return ClientUpdate(payload, task.batches.num_examples, {"train-loss": loss})


def error_feedback_step(
    state: MutableMapping[str, np.ndarray], name: str, m: np.ndarray
) -> tuple[np.ndarray, float]:
    """Bits and alpha of sign(m + e); stores the new residual e in ``state[name]``.

    The residual uses alpha rounded to float32, the value the server decodes, so
    ``alpha sign(p) + e_new == p`` holds for what actually arrives.
    """
    residual = state.get(name)
    if residual is None:
        residual = np.zeros_like(m, dtype=np.float32)
    elif residual.shape != m.shape:
        raise ValueError(
            f"error-feedback residual of {name!r} has shape {residual.shape}, the update "
            f"{m.shape}: the client state belongs to another model"
        )
    p = (m + residual).astype(np.float32)
    alpha = np.float32(np.abs(p, dtype=np.float64).mean()) if p.size else np.float32(0.0)
    bits = p >= 0
    state[name] = p - np.where(bits, alpha, -alpha)
    return bits, float(alpha)
