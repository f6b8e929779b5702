"""Flower ServerApp: method, model and strategy from the run config; start; write results.

One round, as the data flows: the strategy sends the method's downlink and aggregates the
validated replies (strategy.py), measuring the round in a `RoundStats`; Flower then calls
`evaluate_fn` (`RoundResults` here), which has the global model scored (`CentralEvaluation`),
writes the round's row and a checkpoint (results.py).
"""

from __future__ import annotations

import random
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from .config import RunConfig, declared_defaults
from .data import load_test_set
from .failure import reason_logged_last
from .methods import Method
from .preflight import check_startup, node_wait_timeout, unread_options, wait_for_nodes
from .provenance import environment
from .records import arrays_to_record, record_to_arrays
from .results import (
    Checkpoint,
    Checkpointer,
    RoundStats,
    RunRecorder,
    check_resumable,
    default_run_name,
    final_line,
    load_checkpoint,
    round_row,
)
from .sampling import PartitionSampler
from .server_part import ServerPart
from .strategy import ValidatingStrategy, method_strategy
from .task import build_model_for, data_config, load_state, model_spec, state_arrays
from .training import default_device, evaluate, prepare_model, use_threads

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The run; if it fails, the one-line reason is the last line of its log (failure.py)."""
    with reason_logged_last():
        run(grid, context)


def run(grid: Grid, context: Context) -> None:
    """Check everything knowable before round 1, train, write the results."""
    config = RunConfig.from_flower(context.run_config)
    # Every option, data-dir, output-dir, before any folder is made; the method instance is
    # the run's (its options checked once).
    method = check_startup(config)
    for warning in unread_options(config, declared_defaults()):
        log(WARNING, "fedbat-flwr: %s", warning)  # once, and on with the run
    use_threads(config.torch_threads)
    model = build_model_for(config)
    spec = model_spec(model)
    part = method.server_part(spec)
    initial = part.initial(state_arrays(model))

    random.seed(config.seed)  # any server-side use of `random` repeats with the seed
    sampler = PartitionSampler(config.seed, wait_timeout=node_wait_timeout(config))
    checkpoint, run_dir = _open_run(config)
    recorder = _recorder(config, checkpoint, run_dir, spec.num_params)
    log(INFO, "fedbat-flwr: %s on %s, results in %s", config.method, config.dataset, run_dir)

    done = checkpoint.round if checkpoint is not None else 0
    rounds: dict[int, RoundStats] = {}
    strategy = _strategy(config, method, part, round_offset=done, rounds=rounds, sampler=sampler)
    checkpointer = Checkpointer(recorder, strategy.state, strategy.load_state)
    if checkpoint is not None:
        initial = checkpoint.arrays
        checkpointer.restore(checkpoint)
        log(INFO, "fedbat-flwr: resuming after round %d", checkpoint.round)
    results = RoundResults(config, CentralEvaluation(config, part), rounds, checkpointer, done)
    wait_for_nodes(
        lambda: len(list(grid.get_node_ids())), config.min_train_nodes, node_wait_timeout(config)
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=arrays_to_record(initial),
        num_rounds=config.num_server_rounds - done,
        timeout=config.round_timeout,  # a node that has not replied by then counts as failed
        train_config=ConfigRecord({"method": config.method}),
        evaluate_fn=results,
    )
    final = record_to_arrays(result.arrays) if result.arrays is not None else initial
    recorder.environment["client_torch_threads"] = sampler.client_threads() or None
    _finish(recorder, part.eval_arrays(final))


def _strategy(
    config: RunConfig,
    method: Method,
    part: ServerPart,
    *,
    round_offset: int,
    rounds: dict[int, RoundStats],
    sampler: PartitionSampler | None = None,
) -> ValidatingStrategy:
    """The run's strategy: the method's payload kind, bounds and aggregator, Flower's sampling
    from the run config; federated evaluation off (the server evaluates centrally)."""
    return method_strategy(
        method,
        config,
        part,
        round_offset=round_offset,
        rounds=rounds,
        sampler=sampler,
        fraction_train=config.fraction_train,
        fraction_evaluate=0.0,
        min_train_nodes=config.min_train_nodes,
        min_available_nodes=config.min_train_nodes,
    )


def _open_run(config: RunConfig) -> tuple[Checkpoint | None, Path]:
    """The checkpoint a resumed run continues from (checked against the config), or None for
    a new run; and the run's folder."""
    if config.resume_from:
        run_dir = Path(config.resume_from).resolve()
        checkpoint = load_checkpoint(run_dir)
        check_resumable(checkpoint, config.to_flower(), run_dir)
        return checkpoint, run_dir
    output_dir = Path(config.output_dir).resolve()
    run_name = config.run_name or default_run_name(
        config.method, config.dataset, config.partitioner, output_dir
    )
    return None, output_dir / run_name


def _recorder(
    config: RunConfig, checkpoint: Checkpoint | None, run_dir: Path, num_params: int
) -> RunRecorder:
    """The run's results writer: a new run's, or a resumed one's with its rows so far; what
    produced the run recorded in its environment."""
    recorder = RunRecorder.continuing(
        checkpoint,
        run_dir,
        config.method,
        config.to_flower(),
        num_params,
        config.num_server_rounds,
    )
    recorder.environment = environment()
    if checkpoint is not None:
        recorder.environment["resumed_after_round"] = checkpoint.round
    return recorder


def _finish(recorder: RunRecorder, model: dict[str, np.ndarray]) -> None:
    summary = recorder.finish(model)
    log(INFO, "fedbat-flwr: %s", final_line(summary, recorder.run_dir))


class CentralEvaluation:
    """The server's test of the global arrays: the model the method's server part evaluates
    (FedPM: w_init * mask; BiFL: the binary network), and any side readings beside it."""

    def __init__(self, config: RunConfig, part: ServerPart) -> None:
        self.config = config
        self.part = part
        self.device = default_device()
        self.test = load_test_set(
            data_config(config, num_partitions=1), max_examples=config.max_test_examples or None
        )
        self.model = prepare_model(build_model_for(config), self.device)

    def __call__(self, global_arrays: dict[str, np.ndarray]) -> dict[str, float]:
        """test_accuracy and test_loss of the evaluated model, then the part's extra keys
        (`eval_metrics`, ``test_accuracy_<name>`` / ``test_loss_<name>`` of side readings)."""
        extra = self.part.eval_metrics(global_arrays)
        for name, side in self.part.side_arrays(global_arrays).items():
            side_loss, side_accuracy = self._test(side)
            extra |= {f"test_accuracy_{name}": side_accuracy, f"test_loss_{name}": side_loss}
        loss, accuracy = self._test(self.part.eval_arrays(global_arrays))
        return {"test_accuracy": accuracy, "test_loss": loss, **extra}

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


class RoundResults:
    """Flower's `evaluate_fn`: score the global model when due (round 0, every `eval-every`
    rounds, the last), then write the round's row and checkpoint. Rounds are the run's own:
    a resumed run's Flower rounds start after ``offset``."""

    def __init__(
        self,
        config: RunConfig,
        evaluation: CentralEvaluation,
        rounds: dict[int, RoundStats],
        checkpointer: Checkpointer,
        offset: int = 0,
    ) -> None:
        self.config, self.evaluation, self.rounds = config, evaluation, rounds
        self.checkpointer, self.recorder, self.offset = checkpointer, checkpointer.recorder, offset

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0 and self.offset:
            return None  # a resumed run: its starting model was evaluated before the crash
        server_round += self.offset
        weights = record_to_arrays(arrays)
        last = server_round == self.config.num_server_rounds
        due = server_round == 0 or last or server_round % self.config.eval_every == 0
        scores = self.evaluation(weights) if due else {}
        if server_round == 0:
            self.recorder.initial = {"accuracy": scores["test_accuracy"]}
        else:
            stats, num_params = self.rounds[server_round], self.recorder.num_params
            row = round_row(server_round, self.config.method, stats, scores, num_params)
            self.recorder.add_round(row)
            self.checkpointer.save(server_round, weights)
        if not scores:
            return None
        return MetricRecord(
            {"test-loss": scores["test_loss"], "test-accuracy": scores["test_accuracy"]}
        )
