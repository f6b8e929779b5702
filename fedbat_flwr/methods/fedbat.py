"""FedBAT (Li et al., ICML 2024): learn the 1-bit update and its step size during local training."""

from __future__ import annotations

from ..training import FedBATConfig, train_fedbat
from .base import ClientUpdate, LocalTask, Method, register
from .common import bn_float_width, encode_one_bit


@register
class FedBAT(Method):
    """Algorithm 1, client side; the server applies Eq. 11 through the shared sign codec."""

    name = "fedbat"
    payload_kind = "signs"
    options = ("bn-payload",)

    def train(self, task: LocalTask) -> ClientUpdate:
        cfg = self.config
        trainer_config = FedBATConfig(
            epochs=cfg.local_epochs,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            rho=cfg.rho,
            phi=cfg.phi,
            alpha_min=cfg.alpha_min,
            alpha_max=cfg.alpha_max,
            only_matrices=bn_float_width(cfg) is not None,
        )
        result = train_fedbat(
            task.model, task.batches, trainer_config, device=task.device, seed=task.seed
        )
        payload = encode_one_bit(task, result.bits, result.alphas)
        metrics = {"train-loss": result.train_loss, "switch-step": float(result.switch_step)}
        return ClientUpdate(payload, result.num_examples, metrics)
