"""BiFL (Yang et al., 2021): clients train a binary neural network; the server averages weights.

Local training keeps real-valued latent weights; every conv / linear weight (a parameter with
>= 2 dimensions) is used in the forward pass as alpha * sign(w) with alpha = mean|w| per layer
(XNOR-Net), through a `torch.nn.utils.parametrize` parametrization whose gradient is the
clipped straight-through estimator (d out / d w = 1 where |w| <= 1). BatchNorm and biases stay
full precision, as in binary networks.

Both variants upload *weights*, not updates (absolute payloads: the server's weighted mean is
the new global model, which the clients take as their next latent weights):

- `bifl`: alpha * sign(w) per binarized tensor as 1 bit + alpha; BatchNorm affine parameters,
  running statistics and biases as float32 (`wire.binary`, "binary-weights"; +0.16 bit per
  parameter on CNN4 for those, counted).
- `bifl-full`: the full-precision latent weights, dense float32 ("dense", like FedAvg).

The server evaluates the network the clients compute with: the global (averaged) weights seen
through the clients' forward pass, alpha * sign(w) with alpha = mean |w| per binarized tensor
(`server_part.BinaryNetworkPart`), for both variants: `bifl`'s global tensors are means of
the clients' alpha_k * sign(w_k), `bifl-full`'s means of their latent weights, and either is what
the next round's clients binarize. The BatchNorm statistics are the mean of the clients' running
statistics, gathered under each client's own binary network, not the averaged one's: where the
clients' signs disagree, the averaged network's pre-BatchNorm activations are far smaller and
otherwise centred, and in eval mode its output collapses. Measured on compare-methods (FMNIST,
shard, 10 clients, seed 0, `bifl`): per layer |mean_k alpha_k sign_k| is 0.44-0.94 of mean_k
alpha_k; its activations' std is below sqrt(running_var) by 1.1-4.4x per layer in round 5
(6-60x in round 1, when the statistics still hold BatchNorm's initial var = 1); it predicts
one class for 95-100 % of the test set (10.0, 10.0, 10.0, 13.6, 10.0 % in rounds 1-5); the
same weights with statistics re-estimated on the clients' training data score 24.3, 21.0,
32.6, 50.1, 39.8 %. Clients re-estimating their own statistics (one pass, cumulative) fit
their own networks but leave round 1 at 10.0 %. The same global weights read as a float model
are scored beside it (`test_accuracy_latent` in metrics.jsonl). `model.npz` holds the binary
network.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ..task import state_arrays
from ..wire import ModelSpec, encode_binary_weights, is_binarized
from .base import ClientUpdate, LocalTask, Method, register
from .common import parametrized_weights, train_plain

if TYPE_CHECKING:  # the server side loads only where a server runs (tests/test_doors.py)
    from ..server_part import ServerPart


class SignSTE(nn.Module):
    """alpha * sign(w), alpha = mean|w|, in the forward pass; clipped identity gradient."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        alpha = w.detach().abs().mean()
        binary = torch.where(w >= 0, alpha, -alpha)
        clipped = w.clamp(-1.0, 1.0)
        return clipped + (binary - clipped).detach()


def train_binary(task: LocalTask) -> float:
    """Local SGD of the binarized model's latent weights; the model keeps them afterwards."""
    with parametrized_weights(task.model, SignSTE):
        return train_plain(task)


class BinaryNetworkMethod(Method):
    """A BNN method: the server tests the global weights as the clients' binary network."""

    def server_part(self, spec: ModelSpec) -> ServerPart:
        from ..server_part import BinaryNetworkPart

        return BinaryNetworkPart(spec, self.broadcast(spec))


@register
class BiFL(BinaryNetworkMethod):
    """BNN local training; upload alpha * sign(latent weights), 1 bit + alpha per layer."""

    name = "bifl"
    payload_kind = "binary-weights"

    def train(self, task: LocalTask) -> ClientUpdate:
        loss = train_binary(task)
        weights = state_arrays(task.model)
        bits, alphas, dense = {}, {}, {}
        for t in task.spec:
            w = weights[t.name]
            if is_binarized(t):
                bits[t.name] = w >= 0
                alphas[t.name] = float(np.abs(w).mean(dtype=np.float64)) if w.size else 0.0
            else:
                dense[t.name] = w
        payload = encode_binary_weights(task.spec, bits, alphas, dense)
        return ClientUpdate(payload, task.batches.num_examples, {"train-loss": loss})


@register
class BiFLFull(BinaryNetworkMethod):
    """BNN local training; upload the full-precision latent weights (uncompressed)."""

    name = "bifl-full"
    payload_kind = "dense"

    def train(self, task: LocalTask) -> ClientUpdate:
        loss = train_binary(task)
        return ClientUpdate(
            state_arrays(task.model), task.batches.num_examples, {"train-loss": loss}
        )
