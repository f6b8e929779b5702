"""Data sources and partitions: real Fashion-MNIST from Debian's files, small generated IDX
folders, and generated Hub-shaped datasets behind a monkeypatched ``datasets.load_dataset``.

Nothing here touches the network: every Hub call is monkeypatched.
"""

from __future__ import annotations

import gzip
import hashlib
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from fedbat_flwr import data
from fedbat_flwr.config import CUSTOM, DATASETS, PARTITIONERS
from fedbat_flwr.data import DataConfig

HAVE_FMNIST = not data._find_idx_files(data.DEBIAN_FMNIST_DIR)[1]
needs_fmnist = pytest.mark.skipif(
    not HAVE_FMNIST, reason="apt-get install dataset-fashion-mnist for the real-data tests"
)


# --- helpers --------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 IDX file (gzipped if the name ends in .gz)."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


def id_images(n: int, size: int = 28) -> np.ndarray:
    """n images whose first two pixels encode the image's index (so rows can be traced)."""
    images = np.full((n, size, size), 7, dtype=np.uint8)
    images[:, 0, 0] = np.arange(n) % 256
    images[:, 0, 1] = np.arange(n) // 256
    return images


def write_fmnist_folder(folder: Path, n_train: int, n_test: int, gz: bool) -> np.ndarray:
    """A data-dir holding the four IDX files; returns the train labels written."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    train_labels = np.arange(n_train) % 10
    write_idx(folder / f"train-images-idx3-ubyte{suffix}", id_images(n_train))
    write_idx(folder / f"train-labels-idx1-ubyte{suffix}", train_labels)
    write_idx(folder / f"t10k-images-idx3-ubyte{suffix}", id_images(n_test))
    write_idx(folder / f"t10k-labels-idx1-ubyte{suffix}", np.arange(n_test) % 10)
    return train_labels


def image_ids(tensors: data.TensorData, info: data.DatasetInfo) -> list[int]:
    """Undo normalisation on the two id pixels of id_images."""
    first = tensors.x[:, 0, 0, :2] * info.std[0] + info.mean[0]
    pixels = torch.round(first * 255).to(torch.int64)
    return (pixels[:, 0] + 256 * pixels[:, 1]).tolist()


def row_hashes(tensors: data.TensorData) -> Counter[bytes]:
    rows = tensors.x.reshape(len(tensors), -1).numpy()
    return Counter(hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in rows)


@pytest.fixture
def fresh_caches():
    """Run a test against empty caches and leave none of its data behind."""
    data.clear_caches()
    yield
    data.clear_caches()


# --- real Fashion-MNIST (Debian package) ----------------------------------------------------


@needs_fmnist
def test_fmnist_test_set_shape_dtype_and_normalisation():
    test = data.load_test_set(DataConfig())
    assert test.x.shape == (10_000, 1, 28, 28) and test.x.dtype == torch.float32
    assert test.y.dtype == torch.int64 and set(test.y.tolist()) == set(range(10))
    assert abs(test.x.mean().item()) < 0.02 and abs(test.x.std().item() - 1) < 0.02


@needs_fmnist
def test_fmnist_iid_partitions_cover_the_train_set_exactly_once():
    cfg = DataConfig(num_partitions=10)
    parts = [data.load_partition(cfg, pid) for pid in range(10)]
    assert [len(part) for part in parts] == [6000] * 10
    sample = parts[0].x
    assert abs(sample.mean().item()) < 0.05 and abs(sample.std().item() - 1) < 0.05
    whole = data.load_partition(DataConfig(num_partitions=1), 0)
    assert len(whole) == 60_000
    union = sum((row_hashes(part) for part in parts), Counter())
    assert union == row_hashes(whole)  # same multiset of images: disjoint and complete
    per_class = Counter()
    for pid in range(10):
        per_class.update(data.class_counts(cfg, pid))
    assert per_class == {label: 6000 for label in range(10)}


@needs_fmnist
@pytest.mark.parametrize("num_partitions", [10, 100])
def test_fmnist_shard_gives_every_client_exactly_k_labels(num_partitions):
    cfg = DataConfig(partitioner="shard", num_partitions=num_partitions, labels_per_client=3)
    counts = [data.class_counts(cfg, pid) for pid in range(num_partitions)]
    assert all(len(client) == 3 for client in counts)
    assert sum(sum(client.values()) for client in counts) == 60_000
    assert set().union(*counts) == set(range(10))  # first-deterministic uses every label


@needs_fmnist
def test_fmnist_dirichlet_is_deterministic_under_seed(fresh_caches):
    cfg = DataConfig(partitioner="dirichlet", num_partitions=10, dirichlet_alpha=0.3, seed=7)
    first = data.load_partition(cfg, 3)
    data.clear_caches()  # rebuild the partitioner from scratch
    again = data.load_partition(cfg, 3)
    assert first is not again and torch.equal(first.x, again.x) and torch.equal(first.y, again.y)
    other = data.load_partition(DataConfig(partitioner="dirichlet", seed=8), 3)
    assert len(other) != len(first) or not torch.equal(other.y, first.y)
    skewed = data.class_counts(cfg, 3)
    assert max(skewed.values()) > 2 * sum(skewed.values()) / 10  # non-IID at alpha=0.3


@needs_fmnist
def test_fmnist_max_examples_keeps_the_first_n_of_the_partition():
    full = data.load_partition(DataConfig(partitioner="dirichlet"), 2)
    cut = data.load_partition(DataConfig(partitioner="dirichlet", max_examples_per_client=50), 2)
    assert len(cut) == 50 and torch.equal(cut.x, full.x[:50]) and torch.equal(cut.y, full.y[:50])
    small = data.load_test_set(DataConfig(seed=1), max_examples=200)
    assert len(small) == 200
    assert torch.equal(small.y, data.load_test_set(DataConfig(seed=2), max_examples=200).y)


# --- data-dir IDX folders -------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_data_dir_idx_files_take_priority(tmp_path, monkeypatch, fresh_caches, gz):
    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub must not be asked when data-dir is set")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    labels = write_fmnist_folder(tmp_path, n_train=100, n_test=20, gz=gz)
    info = data.dataset_info("fashion_mnist")
    whole = data.load_partition(DataConfig(data_dir=str(tmp_path), num_partitions=1), 0)
    assert whole.x.shape == (100, 1, 28, 28)  # not Debian's 60 000
    ids = image_ids(whole, info)
    assert sorted(ids) == list(range(100))
    assert whole.y.tolist() == labels[ids].tolist()
    background = (7 / 255 - info.mean[0]) / info.std[0]
    assert torch.allclose(whole.x[:, 0, 5:, :], torch.tensor(background), atol=1e-6)
    assert len(data.load_test_set(DataConfig(data_dir=str(tmp_path)))) == 20


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "shard"])
def test_partitions_are_disjoint_and_complete(tmp_path, fresh_caches, partitioner):
    write_fmnist_folder(tmp_path, n_train=300, n_test=10, gz=False)
    cfg = DataConfig(data_dir=str(tmp_path), partitioner=partitioner, num_partitions=5)
    info = data.dataset_info("fashion_mnist")
    ids = [image_ids(data.load_partition(cfg, pid), info) for pid in range(5)]
    flat = [i for part in ids for i in part]
    assert sorted(flat) == list(range(300))


def test_iid_shuffles_a_label_sorted_source(tmp_path, fresh_caches):
    write_fmnist_folder(tmp_path, n_train=300, n_test=10, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.repeat(np.arange(10), 30))
    cfg = DataConfig(data_dir=str(tmp_path), partitioner="iid", num_partitions=5)
    assert all(len(data.class_counts(cfg, pid)) >= 8 for pid in range(5))


def test_data_dir_missing_files_names_folder_and_files(tmp_path, fresh_caches):
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", id_images(5))
    with pytest.raises(data.DataUnavailableError) as caught:
        data.load_partition(DataConfig(data_dir=str(tmp_path)), 0)
    message = str(caught.value)
    assert str(tmp_path) in message and "train-images" not in message
    for name in ("train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert name in message


def test_corrupt_idx_magic_is_reported(tmp_path, fresh_caches):
    write_fmnist_folder(tmp_path, n_train=20, n_test=10, gz=False)
    bad = tmp_path / "train-labels-idx1-ubyte"
    bad.write_bytes(b"\x12\x34" + bad.read_bytes()[2:])
    with pytest.raises(data.DataFormatError, match=r"train-labels-idx1-ubyte.*magic 1234"):
        data.load_partition(DataConfig(data_dir=str(tmp_path), num_partitions=2), 0)


def test_truncated_idx_is_reported(tmp_path):
    path = tmp_path / "x-idx3-ubyte"
    write_idx(path, id_images(3))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(data.DataFormatError, match="needs"):
        data.read_idx(path)


@settings(max_examples=20, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    gz=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_read_idx_round_trips(tmp_path_factory, shape, gz, seed):
    array = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    path = tmp_path_factory.mktemp("idx") / ("a-idx-ubyte.gz" if gz else "a-idx-ubyte")
    write_idx(path, array)
    assert np.array_equal(data.read_idx(path), array)


def test_no_source_error_names_all_three_ways(tmp_path, monkeypatch, fresh_caches):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(data, "DEBIAN_FMNIST_DIR", tmp_path / "absent")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(data.DataUnavailableError) as caught:
        data.load_partition(DataConfig(), 0)
    message = str(caught.value)
    assert "--run-config \"data-dir='" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "zalando-datasets/fashion_mnist" in message and "no network" in message
    assert isinstance(caught.value.__cause__, ConnectionError)


# --- Hub-shaped datasets (cifar10, cifar100, svhn) ------------------------------------------

HUB_SCHEMAS = {  # name -> (hub id, config, image column, label columns with their class counts)
    "cifar10": ("uoft-cs/cifar10", None, "img", {"label": 10}),
    "cifar100": ("uoft-cs/cifar100", None, "img", {"fine_label": 100, "coarse_label": 20}),
    "svhn": ("ufldl-stanford/svhn", "cropped_digits", "image", {"label": 10}),
}


def fake_split(image_column: str, label_columns: dict[str, int], n: int) -> datasets.Dataset:
    """n PIL images whose red channel is the image's index, with the Hub's column names."""
    rng = np.random.default_rng(n)
    pixels = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    pixels[:, :, :, 0] = np.arange(n, dtype=np.uint8)[:, None, None]
    images = [Image.fromarray(array) for array in pixels]
    images[1] = images[1].convert("L")  # a stray grayscale image must come out as RGB
    columns = {image_column: images}
    features = {image_column: datasets.Image()}
    for offset, (column, num_classes) in enumerate(label_columns.items()):
        columns[column] = [(i + offset) % num_classes for i in range(n)]
        features[column] = datasets.ClassLabel(num_classes=num_classes)
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


@pytest.fixture
def fake_hub(monkeypatch, fresh_caches):
    """Serve generated datasets for the Hub ids; record every call."""
    calls: list[tuple[tuple, dict]] = []

    def load_dataset(path, *args, **kwargs):
        calls.append(((path, *args), kwargs))
        [(_, _, image_column, labels)] = [s for s in HUB_SCHEMAS.values() if s[0] == path]
        return datasets.DatasetDict(
            train=fake_split(image_column, labels, 120), test=fake_split(image_column, labels, 30)
        )

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


@pytest.mark.parametrize("name", list(HUB_SCHEMAS))
def test_hub_datasets_load_normalised_rgb_tensors(fake_hub, name):
    hub_id, config, _, label_columns = HUB_SCHEMAS[name]
    info = data.dataset_info(name)
    test = data.load_test_set(DataConfig(dataset=name))
    assert fake_hub == [((hub_id,), {"name": config} if config else {})]
    assert test.x.shape == (30, 3, 32, 32) and test.x.dtype == torch.float32
    assert test.y.tolist() == [i % next(iter(label_columns.values())) for i in range(30)]
    red = test.x[:, 0] * info.std[0] + info.mean[0]
    expected = torch.arange(30, dtype=torch.float32)[:, None, None] / 255
    assert torch.allclose(red[[0, *range(2, 30)]], expected[[0, *range(2, 30)]], atol=1e-5)


@pytest.mark.filterwarnings("ignore:Classes.*will NOT be used")  # 4 clients x 2 labels < 10
@pytest.mark.parametrize("name", list(HUB_SCHEMAS))
@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "shard"])
def test_hub_datasets_partition(fake_hub, name, partitioner):
    cfg = DataConfig(dataset=name, partitioner=partitioner, num_partitions=4, labels_per_client=2)
    parts = [data.load_partition(cfg, pid) for pid in range(4)]
    assert all(part.x.shape[1:] == (3, 32, 32) for part in parts)
    if partitioner == "shard":  # labels no client drew are left out
        assert all(len(data.class_counts(cfg, pid)) == 2 for pid in range(4))
    else:
        assert sum(len(part) for part in parts) == 120
    assert len(fake_hub) == 1  # the four clients shared one load


def test_cifar100_uses_fine_labels(fake_hub):
    test = data.load_test_set(DataConfig(dataset="cifar100"))
    assert test.y.tolist() == list(range(30))  # fine_label = i; coarse_label would be i + 1


def test_grayscale_hub_image_is_converted_to_rgb(fake_hub):
    test = data.load_test_set(DataConfig(dataset="cifar10"))
    gray = test.x[1] * torch.tensor(data.dataset_info("cifar10").std).view(3, 1, 1)
    gray = gray + torch.tensor(data.dataset_info("cifar10").mean).view(3, 1, 1)
    assert torch.allclose(gray[0], gray[1], atol=1e-5) and torch.allclose(gray[1], gray[2])


def test_save_to_disk_folder_is_a_data_dir(tmp_path, monkeypatch, fresh_caches):
    monkeypatch.setattr(datasets, "load_dataset", pytest.fail)
    schema = HUB_SCHEMAS["svhn"]
    splits = datasets.DatasetDict(
        train=fake_split(schema[2], schema[3], 40), test=fake_split(schema[2], schema[3], 10)
    )
    splits.save_to_disk(tmp_path / "svhn")
    cfg = DataConfig(dataset="svhn", data_dir=str(tmp_path / "svhn"), num_partitions=2)
    assert len(data.load_partition(cfg, 0)) + len(data.load_partition(cfg, 1)) == 40
    assert data.load_test_set(cfg).x.shape == (10, 3, 32, 32)


def test_hub_offline_error_for_cifar_omits_debian(monkeypatch, fresh_caches):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(data.DataUnavailableError) as caught:
        data.load_test_set(DataConfig(dataset="svhn"))
    message = str(caught.value)
    assert "data-dir=" in message and "'ufldl-stanford/svhn'" in message
    assert "cropped_digits" in message and "apt-get" not in message


# --- configuration errors -------------------------------------------------------------------


def test_every_data_set_and_partitioner_of_the_run_config_is_served_here():
    assert set(data.DATASET_INFO) == set(DATASETS) - {CUSTOM}  # custom's info is read from disk
    for partitioner in PARTITIONERS:
        DataConfig(partitioner=partitioner)


def test_dataset_info_values():
    info = data.dataset_info("cifar100")
    assert (info.channels, info.image_size, info.num_classes) == (3, 32, 100)
    assert data.dataset_info("fashion_mnist").mean == (0.2860,)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"dataset": "mnist"}, ["'mnist'", "fashion_mnist", "cifar10", "cifar100", "svhn"]),
        ({"partitioner": "pathological"}, ["'pathological'", "iid", "dirichlet", "shard"]),
        ({"num_partitions": 0}, ["num_partitions", "0"]),
        ({"dirichlet_alpha": 0.0}, ["dirichlet_alpha", "0.0"]),
        ({"labels_per_client": 11}, ["labels_per_client", "11", "[1, 10]"]),
        ({"max_examples_per_client": 0}, ["max_examples_per_client", "0"]),
        ({"seed": -1}, ["seed", "-1"]),
    ],
)
def test_bad_config_errors_name_field_and_value(kwargs, named):
    with pytest.raises(ValueError) as caught:
        DataConfig(**kwargs)
    assert all(part in str(caught.value) for part in named)


def test_empty_data_dir_means_unset():
    assert DataConfig(data_dir="").data_dir is None


@pytest.mark.parametrize("partition_id", [-1, 10, 2.0, True])
def test_bad_partition_id_is_named(partition_id):
    with pytest.raises(ValueError, match=f"partition_id={partition_id!r}.*\\[0, 10\\)"):
        data.load_partition(DataConfig(), partition_id)


def test_unknown_dataset_name_lists_allowed():
    with pytest.raises(ValueError, match=r"'imagenet'.*fashion_mnist, cifar10, cifar100, svhn"):
        data.dataset_info("imagenet")
