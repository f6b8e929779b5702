"""Flower ServerApp: model, strategy and recorder from the run config; start; write results."""

from __future__ import annotations

import random
import time
from logging import INFO
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from .broadcast import Broadcast
from .config import RunConfig
from .data import load_test_set
from .methods import get_method
from .preflight import check_startup, node_wait_timeout, wait_for_nodes
from .records import arrays_to_record, record_to_arrays
from .results import (
    CHECKPOINT_VERSION,
    Checkpoint,
    RunRecorder,
    check_resumable,
    default_run_name,
    load_checkpoint,
    save_checkpoint,
)
from .server_rules import Evaluation
from .strategy import UplinkMixin, build_strategy
from .task import build_model_for, data_config, load_state, model_spec, state_arrays
from .training import default_device, evaluate, prepare_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = RunConfig.from_flower(context.run_config)
    check_startup(config)  # every option, data-dir, output-dir: before any folder is made
    method = get_method(config.method)
    model = build_model_for(config)
    spec = model_spec(model)
    rule = method.server_rule(config, spec)  # None unless the method has its own server side
    initial = state_arrays(model) if rule is None else rule.initial(state_arrays(model))
    # What the server tests: the rule's model, the method's (BiFL: its binary network), or the
    # global weights as they are.
    evaluation = rule if rule is not None else method.evaluation(config, spec)
    evaluation = evaluation if evaluation is not None else Evaluation()

    random.seed(config.seed)  # Flower samples clients with `random.sample`
    checkpoint = None
    if config.resume_from:
        run_dir = Path(config.resume_from).resolve()
        checkpoint = load_checkpoint(run_dir)
        check_resumable(checkpoint, config.to_flower(), run_dir)
    else:
        output_dir = Path(config.output_dir).resolve()
        run_name = config.run_name or default_run_name(
            config.method, config.dataset, config.partitioner, output_dir
        )
        run_dir = output_dir / run_name
    recorder = RunRecorder.continuing(
        checkpoint,
        run_dir,
        config.method,
        config.to_flower(),
        spec.num_params,
        config.num_server_rounds,
    )
    log(INFO, "fedbat-flwr: %s on %s, results in %s", config.method, config.dataset, run_dir)

    strategy = build_strategy(
        method.aggregator(config),
        spec=spec,
        payload_kind=method.payload_kind,
        bounds=method.step_bounds(config),
        max_num_examples=config.max_num_examples,
        num_examples_policy=config.num_examples_policy,
        rule=rule,
        broadcast=Broadcast(spec, config.downlink_bits, config.seed),
        fraction_train=config.fraction_train,
        fraction_evaluate=0.0,
        min_train_nodes=config.min_train_nodes,
        min_available_nodes=config.min_train_nodes,
    )
    if checkpoint is not None:
        initial = checkpoint.arrays
        strategy.load_strategy_state(checkpoint.strategy_state)
        strategy.round_offset = checkpoint.round
        restore_rng(checkpoint)
        log(INFO, "fedbat-flwr: resuming after round %d", checkpoint.round)
    evaluate_fn = CentralEvaluation(config, strategy, recorder, evaluation)
    wait_for_nodes(
        lambda: len(list(grid.get_node_ids())), config.min_train_nodes, node_wait_timeout(config)
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=arrays_to_record(initial),
        num_rounds=config.num_server_rounds - strategy.round_offset,
        timeout=config.round_timeout,  # a node that has not replied by then counts as failed
        train_config=ConfigRecord({"method": config.method}),
        evaluate_fn=evaluate_fn,
    )
    final = record_to_arrays(result.arrays) if result.arrays is not None else initial
    summary = recorder.finish(evaluation.eval_arrays(final))
    log(
        INFO,
        "fedbat-flwr: final accuracy %s, best %s, uplink %.2f MB, results in %s",
        summary["final_accuracy"],
        summary["best_accuracy"],
        summary["total_uplink_bytes"] / 1e6,
        run_dir,
    )


def rng_arrays() -> dict[str, np.ndarray]:
    """numpy's and torch's global generator states, as arrays for the checkpoint."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = np.array([pos, has_gauss], dtype=np.int64)
    return {
        "numpy_keys": np.asarray(keys),
        "numpy_state": numpy_state,
        "numpy_gauss": np.array([gauss]),
        "torch": torch.get_rng_state().numpy(),
    }


def restore_rng(checkpoint: Checkpoint) -> None:
    """Continue every server-side random stream where the checkpointed run left it."""
    version, state, gauss = checkpoint.meta["python_random"]
    random.setstate((version, tuple(state), gauss))
    rng = checkpoint.rng
    pos, has_gauss = (int(v) for v in rng["numpy_state"])
    np.random.set_state(
        ("MT19937", rng["numpy_keys"], pos, has_gauss, float(rng["numpy_gauss"][0]))
    )
    torch.set_rng_state(torch.from_numpy(rng["torch"].copy()))


class CentralEvaluation:
    """Flower's `evaluate_fn`: test the global model, then write the round's results row."""

    def __init__(
        self,
        config: RunConfig,
        strategy: UplinkMixin,
        recorder: RunRecorder,
        evaluation: Evaluation,
    ) -> None:
        self.config = config
        self.strategy = strategy
        self.recorder = recorder
        self.evaluation = evaluation
        self.device = default_device()
        self.test = load_test_set(
            data_config(config, num_partitions=1), max_examples=config.max_test_examples or None
        )
        self.model = prepare_model(build_model_for(config), self.device)

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0 and self.strategy.round_offset:
            return None  # a resumed run: its starting model was evaluated before the crash
        server_round += self.strategy.round_offset
        last = server_round == self.config.num_server_rounds
        metrics: dict[str, float] = {}
        extra: dict[str, float] = {}
        if server_round == 0 or last or server_round % self.config.eval_every == 0:
            # The global arrays need not be the tested weights (FedPM: theta; BiFL: latent).
            weights = record_to_arrays(arrays)
            extra = self.evaluation.eval_metrics(weights)
            for name, side in self.evaluation.side_arrays(weights).items():
                side_loss, side_accuracy = self._test(side)
                extra |= {f"test_accuracy_{name}": side_accuracy, f"test_loss_{name}": side_loss}
            loss, accuracy = self._test(self.evaluation.eval_arrays(weights))
            metrics = {"test-loss": loss, "test-accuracy": accuracy}
        if server_round == 0:
            self.recorder.initial = {"accuracy": metrics["test-accuracy"]}
        else:
            self._record(server_round, metrics, extra)
            self._checkpoint(server_round, arrays)
        return MetricRecord(metrics) if metrics else None

    def _test(self, weights: dict[str, np.ndarray]) -> tuple[float, float]:
        """(loss, accuracy) of ``weights`` on the test set."""
        load_state(self.model, weights)
        return evaluate(
            self.model,
            self.test.x,
            self.test.y,
            batch_size=self.config.eval_batch_size,
            device=self.device,
        )

    def _checkpoint(self, server_round: int, arrays: ArrayRecord) -> None:
        """After the round's row: the state to continue from if the server stops now."""
        meta = {
            "version": CHECKPOINT_VERSION,
            "config": self.recorder.config,
            "rows": self.recorder.rows,
            "initial": self.recorder.initial,
            "wall_seconds": self.recorder.wall_seconds,
            "python_random": random.getstate(),
        }
        state = self.strategy.strategy_state()
        checkpoint = Checkpoint(server_round, record_to_arrays(arrays), state, rng_arrays(), meta)
        save_checkpoint(self.recorder.run_dir, checkpoint)

    def _record(
        self, server_round: int, metrics: dict[str, float], extra: dict[str, float] | None = None
    ) -> None:
        stats = self.strategy.rounds[server_round]
        num_params = self.strategy.spec.num_params
        sent = max(stats.num_sent, 1)
        self.recorder.add_round(
            {
                "round": server_round,
                "method": self.config.method,
                "test_accuracy": metrics.get("test-accuracy"),
                "test_loss": metrics.get("test-loss"),
                "uplink_bytes": stats.uplink_bytes,
                "uplink_bits_per_param": stats.uplink_bits_per_param,
                "downlink_bytes": stats.downlink_bytes,
                "downlink_bits_per_param": 8 * stats.downlink_bytes / sent / num_params,
                "num_replies": stats.num_replies,
                "num_rejected": stats.num_rejected,
                "round_seconds": time.monotonic() - stats.started,
                "model_updated": stats.model_updated,
                "train_loss": stats.train_metrics.get("train-loss"),
                **(extra or {}),  # optional keys a method's server rule adds (e.g. model_sparsity)
            }
        )
