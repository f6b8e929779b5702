"""fedbat-matrix: every method with every aggregator, in one process: does each combination learn?

Each combination trains `rounds` rounds on IID Fashion-MNIST with `clients` clients (all of them
every round), one local epoch on `examples` examples each, through the code a Flower run uses:
the method's client side as the ClientApp builds it (`methods.client_task`, statistics measured by
`client_app.measure_network`), the strategy and server part as the ServerApp builds them
(`server_app._strategy`), replies packed as ArrayRecords and validated by the strategy. Flower's
runtime is left out (messages travel in memory; the end-to-end tests cover it), so the matrix
takes minutes, not hours. A combination the app refuses at start-up is listed with its error.

Besides accuracy, each cell records the largest |entry| of an honest reply's update per tensor:
the measurement the per-method bounds on a reply's influence are calibrated against.

    python -m fedbat_tools.matrix --output results/matrix
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from fedbat_flwr import provenance, server_app
from fedbat_flwr.aggregators import AGGREGATORS
from fedbat_flwr.client import CONFIG_KEY, run_round
from fedbat_flwr.client_app import measure_network
from fedbat_flwr.config import ConfigError, RunConfig
from fedbat_flwr.data import TensorData, load_partition, load_test_set
from fedbat_flwr.keys import ARRAYS_KEY
from fedbat_flwr.methods import Method, method_names
from fedbat_flwr.preflight import check_method
from fedbat_flwr.records import arrays_to_record, record_to_arrays
from fedbat_flwr.results import RoundStats
from fedbat_flwr.server_part import ServerPart
from fedbat_flwr.strategy import ValidatingStrategy
from fedbat_flwr.task import build_model_for, data_config, load_state, model_spec, state_arrays
from fedbat_flwr.training import evaluate, use_threads
from fedbat_tools.messages import metadata_from, reply


@dataclass
class Protocol:
    """What every cell trains on."""

    rounds: int = 10
    clients: int = 10
    examples: int = 1000
    test_examples: int = 10_000
    seed: int = 0

    def config(self, method: str, aggregator: str) -> RunConfig:
        return RunConfig(
            method=method,
            aggregator=aggregator,
            partitioner="iid",
            num_server_rounds=self.rounds,
            min_train_nodes=self.clients,
            local_epochs=1,
            max_examples_per_client=self.examples,
            max_test_examples=self.test_examples,
            seed=self.seed,
        )


@dataclass
class Cell:
    """One method x aggregator: refused at start-up (with why), or its run's figures."""

    method: str
    aggregator: str
    status: str  # "ok" | "refused" | "failed"
    reason: str = ""
    final_accuracy: float = float("nan")  # test accuracy after the last round
    rejected: int = 0  # replies the server refused, all rounds
    uplink_bits_per_param: float = float("nan")
    max_update: dict[str, float] = field(default_factory=dict)  # tensor -> largest |entry|
    seconds: float = 0.0
    # The global arrays after the last round (not written to cells.jsonl).
    final_model: dict[str, np.ndarray] | None = field(default=None, repr=False)


class Federation:
    """The clients' data and the test set, loaded once for every cell."""

    def __init__(self, protocol: Protocol) -> None:
        self.protocol = protocol
        config = protocol.config("fedavg", "fedavg")
        cfg = data_config(config, protocol.clients)
        self.partitions = [load_partition(cfg, k) for k in range(protocol.clients)]
        self.test = load_test_set(
            data_config(config, 1), max_examples=protocol.test_examples or None
        )

    def run(self, method_name: str, aggregator: str) -> Cell:
        config = self.protocol.config(method_name, aggregator)
        try:
            method = check_method(config)
        except ConfigError as exc:
            return Cell(method_name, aggregator, "refused", str(exc))
        started = time.monotonic()
        cell = Cell(method_name, aggregator, "ok")
        try:
            _train(self, method, config, cell)
        except Exception as exc:  # a combination that crashes is a finding, not the end
            cell.status, cell.reason = "failed", f"{type(exc).__name__}: {exc}"
        cell.seconds = time.monotonic() - started
        return cell


def _train(federation: Federation, method: Method, config: RunConfig, cell: Cell) -> None:
    """`config.num_server_rounds` rounds of the method with every client, filling `cell`."""
    model = build_model_for(config)
    spec = model_spec(model)
    part = method.server_part(spec)
    strategy = server_app._strategy(config, method, part, round_offset=0, rounds={})
    master = part.initial(state_arrays(model))
    memories = [RecordDict() for _ in federation.partitions]  # each client's context.state
    bits = []
    for server_round in range(1, config.num_server_rounds + 1):
        strategy.rounds[server_round] = RoundStats()
        strategy.global_arrays = master
        content = {ARRAYS_KEY: part.downlink(master, server_round)}
        sent = Message(
            RecordDict({**content, CONFIG_KEY: ConfigRecord({"server-round": server_round})}),
            metadata=metadata_from(0),
        )
        replies = [
            _client_reply(method, data, sent, k, memories[k], strategy, cell)
            for k, data in enumerate(federation.partitions)
        ]
        arrays, _ = strategy.aggregate_train(server_round, replies)
        stats = strategy.rounds[server_round]
        cell.rejected += stats.num_rejected
        bits.append(stats.uplink_bits_per_param)
        if arrays is not None:
            master = record_to_arrays(arrays)
        if part.refits_statistics:
            _refit(federation, config, part, master, strategy, server_round)
    cell.final_accuracy = _test(federation.test, config, part.eval_arrays(master))
    cell.uplink_bits_per_param = float(np.mean(bits))
    cell.final_model = master


def _client_reply(
    method: Method,
    data: TensorData,
    sent: Message,
    k: int,
    memory: RecordDict,
    strategy: ValidatingStrategy,
    cell: Cell,
) -> Message:
    """Client k's round as the ClientApp runs it (`client.run_round`), as the server receives
    it from node k + 1; its update's size recorded."""
    answer = run_round(method, data, sent, client_id=k, memory=memory)
    _record_update_size(strategy, answer.content[ARRAYS_KEY], cell)
    return Message(answer.content, metadata=metadata_from(k + 1))


def _record_update_size(strategy: ValidatingStrategy, record: ArrayRecord, cell: Cell) -> None:
    """The largest |entry| per tensor of an update (replies that carry weights are skipped)."""
    try:
        decoded = strategy.decode(record)
    except Exception:  # the strategy's validation will count it as rejected
        return
    if getattr(decoded, "absolute", False) or not hasattr(decoded, "delta"):
        return
    for name, value in decoded.delta().items():
        size = float(np.max(np.abs(value))) if np.size(value) else 0.0
        cell.max_update[name] = max(cell.max_update.get(name, 0.0), size)


def _refit(
    federation: Federation,
    config: RunConfig,
    part: ServerPart,
    master: dict[str, np.ndarray],
    strategy: ValidatingStrategy,
    server_round: int,
) -> None:
    """The federated-evaluation step: every client measures the evaluated network's statistics."""
    network = part.eval_arrays(master)
    replies = []
    for k, data in enumerate(federation.partitions):
        statistics, _, _ = measure_network(config, data, network)
        replies.append(reply(k + 1, arrays_to_record(statistics), len(data)))
    strategy.aggregate_evaluate(server_round, replies)


def _test(test: TensorData, config: RunConfig, weights: dict[str, np.ndarray]) -> float:
    model = build_model_for(config)
    load_state(model, weights)
    _, accuracy = evaluate(model, test.x, test.y, device=torch.device("cpu"))
    return accuracy


def run_matrix(
    protocol: Protocol, methods: Sequence[str], aggregators: Sequence[str], out_dir: Path
) -> list[Cell]:
    """Every combination not in `out_dir`/cells.jsonl yet (it grows as cells finish, so an
    interrupted matrix resumes), then table.md over all of them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    environment = provenance.environment()
    done = _finished(out_dir / "cells.jsonl")
    todo = [(m, a) for m in methods for a in aggregators if (m, a) not in done]
    federation = Federation(protocol) if todo else None
    with open(out_dir / "cells.jsonl", "a") as fh:
        for method, aggregator in todo:
            assert federation is not None
            cell = done[(method, aggregator)] = federation.run(method, aggregator)
            fh.write(json.dumps({**asdict(cell), "final_model": None}) + "\n")
            fh.flush()
            print(_progress(cell), flush=True)
    environment["ended"] = provenance.now_utc()
    (out_dir / "environment.json").write_text(json.dumps(environment, indent=2) + "\n")
    cells = [done[(m, a)] for m in methods for a in aggregators]
    (out_dir / "table.md").write_text(table(cells, protocol, environment))
    return cells


def _finished(path: Path) -> dict[tuple[str, str], Cell]:
    """The cells an earlier call wrote, by (method, aggregator)."""
    if not path.exists():
        return {}
    cells = [Cell(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    return {(c.method, c.aggregator): c for c in cells}


def _progress(cell: Cell) -> str:
    if cell.status != "ok":
        return f"{cell.method} x {cell.aggregator}: {cell.status}: {cell.reason[:120]}"
    return (
        f"{cell.method} x {cell.aggregator}: final {cell.final_accuracy:.3f}, "
        f"rejected {cell.rejected}, {cell.uplink_bits_per_param:.3f} bit/param, "
        f"{cell.seconds:.0f} s"
    )


def table(cells: Sequence[Cell], protocol: Protocol, environment: Mapping[str, Any]) -> str:
    """Markdown: final accuracy per method x aggregator; the refusals; the failures."""
    aggregators = list(dict.fromkeys(c.aggregator for c in cells))
    methods = list(dict.fromkeys(c.method for c in cells))
    by = {(c.method, c.aggregator): c for c in cells}
    lines = [
        "# Every method with every aggregator",
        "",
        f"IID Fashion-MNIST, {protocol.clients} clients (all every round), {protocol.rounds} "
        f"rounds of 1 local epoch on {protocol.examples} examples each, seed {protocol.seed}; "
        "in one process through the app's client and server code (`fedbat_tools/matrix.py`). "
        "Cell: final test accuracy (%) / replies rejected; `refused` = stopped at start-up "
        "(reasons below).",
        "",
        f"Commit {environment.get('commit')} (dirty: {environment.get('dirty')}), torch "
        f"{environment.get('torch')} at {environment.get('torch_threads')} thread(s), "
        f"{environment.get('cpu')} ({environment.get('cpu_cores')} cores), "
        f"{environment.get('started')} to {environment.get('ended')}.",
        "",
        "| method | uplink bit/param | " + " | ".join(aggregators) + " |",
        "|---|---:|" + "---:|" * len(aggregators),
    ]
    for method in methods:
        row = [by[(method, a)] for a in aggregators if (method, a) in by]
        bits = next((c.uplink_bits_per_param for c in row if c.status == "ok"), float("nan"))
        lines.append(f"| {method} | {bits:.3f} | " + " | ".join(_cell(c) for c in row) + " |")
    lines += ["", "## Refused and failed combinations", ""]
    lines += [f"- {c.method} x {c.aggregator}: {c.status}: {c.reason}" for c in cells if c.reason]
    return "\n".join(lines) + "\n"


def _cell(cell: Cell) -> str:
    if cell.status != "ok":
        return cell.status
    return f"{100 * cell.final_accuracy:.1f} / {cell.rejected}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedbat-matrix", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("results/matrix"))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--methods", nargs="+", default=method_names())
    parser.add_argument("--aggregators", nargs="+", default=list(AGGREGATORS))
    parser.add_argument("--test-examples", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    use_threads(args.threads)
    logging.getLogger("flwr").setLevel(logging.ERROR)  # Flower's per-round notices
    protocol = Protocol(args.rounds, args.clients, args.examples, args.test_examples)
    run_matrix(protocol, args.methods, args.aggregators, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
