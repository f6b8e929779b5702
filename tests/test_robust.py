"""Issue 6: FedBAT on real Fashion-MNIST with 2 attackers among 10 clients, aggregated by the
mean (Eq. 11, streamed), the weighted majority vote and the coordinate-wise median.

In-process, without Flower's runtime: each honest client trains as `client_app.train` makes it
(a `LocalTask` for the method), its payload travels as an ArrayRecord in a hand-built reply
Message, and the real strategy's `aggregate_train` validates and aggregates the round.

The attackers send well-formed payloads at the edge of what validation lets through: the
negated sign of the honest clients' mean update (colluding attackers who see the round; no
training needed), alpha = alpha-max on parameters, the honest mean alpha on BatchNorm
statistics, and `num-examples` = 10^9, capped to `max-num-examples` (1,000 here, 3.3x an honest
client). The test prints the final test accuracies of all six runs. Measured on 2026-11-25
(commit 9234140; an earlier 2-core CPU, 1 thread): mean 0.57 / majority 0.64 / median 0.66 clean,
0.09 / 0.63 / 0.61 attacked, ~35 s.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from fedbat_flwr.config import RunConfig
from fedbat_flwr.data import DataUnavailableError, TensorData, load_partition, load_test_set
from fedbat_flwr.methods import client_task, get_method
from fedbat_flwr.records import payload_to_record, record_to_arrays
from fedbat_flwr.strategy import build_strategy
from fedbat_flwr.task import (
    build_model_for,
    data_config,
    load_state,
    model_spec,
    state_arrays,
)
from fedbat_flwr.training import evaluate, prepare_model
from fedbat_flwr.wire import AlphaBounds, ModelSpec, decode_payload, encode_signs
from tests.strategy_helpers import reply

NUM_CLIENTS = 10
ATTACKERS = 2
ROUNDS = 3
CONFIG = RunConfig(
    method="fedbat",
    max_examples_per_client=300,
    batch_size=16,  # 19 local steps a round (64 would give 5: still at chance after 3 rounds)
    max_num_examples=1000,
    local_epochs=1,
    seed=42,
    bn_payload="binary",  # every tensor 1-bit, so the attacker can flip every one of them
)
TEST_EXAMPLES = 1000
AGGREGATORS = ("fedavg", "majority", "sign-median")
CHANCE = 0.1
TOLERANCE = 0.03
BOUNDS = AlphaBounds(param=(CONFIG.alpha_min, CONFIG.alpha_max), stat=(0.0, CONFIG.stat_alpha_max))


class Federation:
    """The clients' data and a cache of local updates by (global model, client, round).

    Every run starts from the same initial model, so round 1's honest updates are trained once
    and shared by all six runs.
    """

    def __init__(self, partitions: list[TensorData], test: TensorData) -> None:
        self.partitions = partitions
        self.test = test
        self.method = get_method(CONFIG.method)(CONFIG)
        model = build_model_for(CONFIG)
        self.spec: ModelSpec = model_spec(model)
        self.initial = state_arrays(model)
        self._cache: dict[tuple[str, int, int], tuple[dict[str, np.ndarray], int]] = {}

    def local_update(
        self, global_state: dict[str, np.ndarray], pid: int, server_round: int
    ) -> tuple[dict[str, np.ndarray], int]:
        """The payload and example count client `pid` sends, trained as the ClientApp does."""
        key = (_digest(global_state), pid, server_round)
        if key not in self._cache:
            task = client_task(
                self.method,
                self.partitions[pid],
                global_state,
                partition_id=pid,
                server_round=server_round,
                device=torch.device("cpu"),
            )
            update = self.method.train(task)
            self._cache[key] = (update.payload, update.num_examples)
        return self._cache[key]

    def attack(self, honest: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """The negated sign of the honest mean update, alpha-max (parameters) / honest mean
        alpha (statistics): valid, and as harmful as the bounds allow."""
        views = [decode_payload("signs", p, self.spec, BOUNDS) for p in honest]
        mean = {t.name: np.mean([v.delta()[t.name] for v in views], axis=0) for t in self.spec}
        alphas = np.mean([p["alphas"] for p in honest], axis=0)
        return encode_signs(
            self.spec,
            {t.name: mean[t.name] < 0 for t in self.spec},
            {
                t.name: CONFIG.alpha_max if t.kind == "param" else float(a)
                for t, a in zip(self.spec, alphas, strict=True)
            },
        )

    def run(self, aggregator: str, attackers: int) -> float:
        """ROUNDS rounds with `attackers` of the NUM_CLIENTS clients attacking; test accuracy."""
        strategy = build_strategy(
            aggregator,
            spec=self.spec,
            payload_kind=get_method(CONFIG.method).payload_kind,
            bounds=BOUNDS,
            max_num_examples=CONFIG.max_num_examples,
            min_train_nodes=1,
            fraction_evaluate=0.0,
        )
        weights = self.initial
        for server_round in range(1, ROUNDS + 1):
            honest = [
                self.local_update(weights, pid, server_round)
                for pid in range(NUM_CLIENTS - attackers)
            ]
            replies = [reply(pid + 1, payload_to_record(p), n) for pid, (p, n) in enumerate(honest)]
            if attackers:
                evil = payload_to_record(self.attack([p for p, _ in honest]))
                replies += [reply(100 + i, evil, num_examples=10**9) for i in range(attackers)]
            strategy.global_arrays = weights
            arrays, _ = strategy.aggregate_train(server_round, replies)
            assert strategy.rounds[server_round].num_rejected == 0, "the attack is well-formed"
            weights = record_to_arrays(arrays)
        return self.accuracy(weights)

    def accuracy(self, weights: dict[str, np.ndarray]) -> float:
        model = build_model_for(CONFIG)
        load_state(model, weights)
        model = prepare_model(model, torch.device("cpu"))
        _, accuracy = evaluate(
            model, self.test.x, self.test.y, batch_size=1024, device=torch.device("cpu")
        )
        return float(accuracy)


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha1()
    for name, value in arrays.items():
        h.update(name.encode())
        h.update(np.ascontiguousarray(value).tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def federation() -> Iterator[Federation]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core machine: one intra-op thread is faster for CNN4
    try:
        cfg = data_config(CONFIG, NUM_CLIENTS)
        partitions = [load_partition(cfg, pid) for pid in range(NUM_CLIENTS)]
        test = load_test_set(data_config(CONFIG, 1), max_examples=TEST_EXAMPLES)
    except DataUnavailableError as exc:
        pytest.skip(f"Fashion-MNIST not available: {exc}")
    try:
        yield Federation(partitions, test)
    finally:
        torch.set_num_threads(threads)


def test_robust_aggregators_resist_two_attackers(federation: Federation) -> None:
    clean = {agg: federation.run(agg, attackers=0) for agg in AGGREGATORS}
    attacked = {agg: federation.run(agg, attackers=ATTACKERS) for agg in AGGREGATORS}
    print(f"\nFedBAT, Fashion-MNIST, {NUM_CLIENTS} clients x 300 examples, {ROUNDS} rounds:")
    for agg in AGGREGATORS:
        print(f"  {agg:12s} clean {clean[agg]:.4f}   {ATTACKERS} attackers {attacked[agg]:.4f}")

    assert all(acc > CHANCE + 0.1 for acc in clean.values()), clean
    for robust in ("majority", "sign-median"):  # one vote per client: the cap buys nothing
        assert attacked[robust] > CHANCE + 0.1, attacked
        assert attacked[robust] >= attacked["fedavg"] - TOLERANCE, attacked
        # At most 15 points lost (FedAvg loses ~50). Over seeds 0-7 and 42 (this one: 1.4 and
        # 4.3) the attack cost majority -0.4 to 5.8 points (mean 2), sign-median -1.8 to 10.5
        # (mean 5, std 5): a seed that breaks this bound is a change in behaviour, not bad luck.
        assert attacked[robust] >= clean[robust] - 0.15, (clean, attacked)
    # Round 1 starts from the same model in all six runs: each client trained it once.
    assert len([key for key in federation._cache if key[2] == 1]) == NUM_CLIENTS
