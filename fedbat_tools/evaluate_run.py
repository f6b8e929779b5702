"""fedbat-eval RUN_DIR: score a run's final model (model.npz) on the test set.

The run's summary.json holds its whole run config, so the model (built-in or the user's
`model='package.module:build_fn'`), the data set and its data-dir come from there; `--data-dir`
points at another copy of the same data, `--max-test-examples` scores a subset (0 = the whole
test split, whatever the run used). model.npz holds the weights the server evaluated, so on the
run's own test subset this gives the run's final accuracy again.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedbat_flwr.config import ConfigError, RunConfig
from fedbat_flwr.results import load_arrays

from .report import RunDirError


def run_config_of(run_dir: Path) -> RunConfig:
    """The run config a finished run recorded in summary.json."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise RunDirError(f"{run_dir} has no summary.json: the run did not finish")
    recorded = json.loads(path.read_text()).get("config") or {}
    return RunConfig.from_flower(recorded)


def score_run(
    run_dir: Path, *, data_dir: str | None = None, max_test_examples: int = 0
) -> dict[str, Any]:
    """Load model.npz into the run's model and evaluate it; accuracy, loss and example count."""
    from fedbat_flwr.data import load_test_set
    from fedbat_flwr.task import build_model_for, data_config, load_state
    from fedbat_flwr.training import default_device, evaluate, prepare_model

    config = run_config_of(run_dir)
    if data_dir is not None:
        config = config.replace(data_dir=data_dir)
    model_path = Path(run_dir) / "model.npz"
    if not model_path.is_file():
        raise RunDirError(f"{run_dir} has no model.npz (the final model of a finished run)")
    arrays = load_arrays(model_path)
    if not arrays:
        raise RunDirError(f"{run_dir}/model.npz holds no arrays")
    model = build_model_for(config)
    load_state(model, arrays)
    device = default_device()
    model = prepare_model(model, device)
    test = load_test_set(
        data_config(config, num_partitions=1), max_examples=max_test_examples or None
    )
    loss, accuracy = evaluate(
        model, test.x, test.y, batch_size=config.eval_batch_size, device=device
    )
    return {
        "run_dir": str(run_dir),
        "dataset": config.dataset,
        "test_accuracy": accuracy,
        "test_loss": loss,
        "num_examples": len(test),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedbat-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument("--data-dir", help="another copy of the run's data set")
    parser.add_argument(
        "--max-test-examples", type=int, default=0, help="score a fixed subset (0 = all)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        result = score_run(
            args.run_dir, data_dir=args.data_dir, max_test_examples=args.max_test_examples
        )
    except (RunDirError, ConfigError, OSError, ValueError) as exc:
        print(f"fedbat-eval: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['run_dir']}: test accuracy {result['test_accuracy']:.4f}, loss "
            f"{result['test_loss']:.4f} on {result['num_examples']} {result['dataset']} "
            "test examples"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
