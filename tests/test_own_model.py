"""FedBAT on a user's own model and data: `model='package.module:build_fn'` (examples/mlp.py, a
model the app does not ship) and `dataset='custom'`, a `datasets` save_to_disk folder with its
own column names. Fast checks first; one test trains a round through the real simulation."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from torch import nn

from fedbat_flwr.config import ConfigError, RunConfig
from fedbat_flwr.data import clear_caches, info_for, load_partition
from fedbat_flwr.methods import client_task, get_method
from fedbat_flwr.preflight import check_startup
from fedbat_flwr.task import build_model_for, data_config, state_arrays
from fedbat_flwr.wire import AlphaBounds, decode_payload
from fedbat_tools.localrun import LocalSuperLink

SIZE, CLASSES = 12, 3


def make_custom(folder: Path, train: int = 48, test: int = 24) -> Path:
    """Grayscale SIZE x SIZE PNG images whose bright row tells the class; columns img / y."""
    rng = np.random.default_rng(0)

    def split(count: int) -> datasets.Dataset:
        labels = np.arange(count) % CLASSES
        images = rng.integers(0, 60, size=(count, SIZE, SIZE), dtype=np.uint8)
        for image, label in zip(images, labels, strict=True):
            image[3 * label + 1] = 250
        features = datasets.Features({"img": datasets.Image(), "y": datasets.Value("int64")})
        return datasets.Dataset.from_dict(
            {"img": list(images), "y": labels.tolist()}, features=features
        )

    datasets.DatasetDict(train=split(train), test=split(test)).save_to_disk(str(folder))
    clear_caches()
    return folder


def own_config(data_dir: Path, **extra: object) -> RunConfig:
    return RunConfig.from_flower(
        {
            "dataset": "custom",
            "data-dir": str(data_dir),
            "image-column": "img",
            "label-column": "y",
            "model": "examples.mlp:build_mlp",
            "output-dir": str(data_dir.parent / "out"),
            "batch-size": 8,
            **extra,
        }
    )


def test_custom_data_set_is_read_with_its_own_columns(tmp_path: Path):
    config = own_config(make_custom(tmp_path / "data"))
    info = info_for(data_config(config, 2))
    assert (info.channels, info.image_size, info.num_classes) == (1, SIZE, CLASSES)
    part = load_partition(data_config(config, 2), 1)
    assert part.x.shape == (24, 1, SIZE, SIZE) and set(part.y.tolist()) == {0, 1, 2}
    # normalised with the data's own mean and std (estimated from the train split)
    assert abs(float(part.x.mean())) < 0.3 and 0.7 < float(part.x.std()) < 1.3


@pytest.mark.parametrize(("bn_payload", "signed"), [("binary", 4), ("float16", 2)])
def test_fedbat_trains_the_mlp_unchanged(tmp_path: Path, bn_payload: str, signed: int):
    """`binary` binarizes all four tensors; the default float16 binarizes the two weight
    matrices and sends the biases (like BatchNorm's vectors) as float16 updates."""
    config = own_config(
        make_custom(tmp_path / "data"), **{"local-epochs": 1, "bn-payload": bn_payload}
    )
    method = get_method("fedbat")(config)
    data = load_partition(data_config(config, 2), 0)
    model = build_model_for(config)
    assert isinstance(model, nn.Sequential) and len(state_arrays(model)) == 4  # 2 weights, 2 biases
    task = client_task(method, data, state_arrays(model), partition_id=0, server_round=1)
    update = method.train(task)
    decoded = decode_payload(method.payload_kind, update.payload, task.spec, AlphaBounds())
    assert decoded is not None and len(update.payload["alphas"]) == signed
    biases = sum(t.size for t in task.spec if t.name.endswith("bias"))
    if bn_payload == "float16":
        assert update.payload["dense"].size == biases
    else:
        assert "dense" not in update.payload
    assert update.num_examples == len(data)


def test_bad_columns_and_models_name_their_run_config_key(tmp_path: Path):
    data = make_custom(tmp_path / "data")
    with pytest.raises(ConfigError, match=r"'image-column' = 'image' is not a column"):
        check_startup(own_config(data, **{"image-column": "image"}))
    with pytest.raises(ConfigError, match=r"'model' = 'examples.nope:build'.*cannot load"):
        check_startup(own_config(data, model="examples.nope:build"))
    with pytest.raises(ConfigError, match=r"floating-point buffers \['scale'\]"):
        check_startup(own_config(data, model="tests.test_own_model:build_with_buffer"))
    with pytest.raises(ConfigError, match="'custom' needs data-dir"):
        check_startup(RunConfig.from_flower({"dataset": "custom", "output-dir": str(tmp_path)}))


def build_with_buffer(*, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """A model whose float buffer has no update rule (used by the test above)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, num_classes))
    model.register_buffer("scale", torch.ones(1))
    return model


@pytest.mark.e2e
def test_own_model_and_data_train_a_round_in_simulation(superlink: LocalSuperLink, tmp_path: Path):
    data = make_custom(tmp_path / "data", train=60, test=30)
    config = {
        "dataset": "custom",
        "data-dir": str(data),
        "image-column": "img",
        "label-column": "y",
        "model": "examples.mlp:build_mlp",
        "num-server-rounds": 1,
        "batch-size": 8,
        "output-dir": str(tmp_path / "out"),
        "run-name": "mlp",
    }
    lines: list[str] = []
    code = superlink.run(config, num_supernodes=2, on_line=lines.append, timeout=600)
    assert code == 0, "\n".join(lines[-30:])
    rows = [json.loads(x) for x in (tmp_path / "out/mlp/metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1, lines[-30:]
    assert rows[0]["num_replies"] == 2 and rows[0]["num_rejected"] == 0
    assert 1.0 < rows[0]["uplink_bits_per_param"] < 2.0  # 1 bit + framing of a tiny model
    assert rows[0]["test_accuracy"] is not None
    assert (tmp_path / "out/mlp/summary.json").exists()
