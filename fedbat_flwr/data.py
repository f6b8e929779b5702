"""Image datasets and their federated partitions, read from local files before the Hub.

Where a dataset comes from, first match wins:

- Fashion-MNIST: (1) ``data_dir`` (run config ``data-dir``) holding the four IDX files, gzipped
  or not, or a ``datasets.DatasetDict`` saved with ``save_to_disk``; (2) the Debian package
  ``dataset-fashion-mnist`` (:data:`DEBIAN_FMNIST_DIR`); (3) the Hugging Face Hub.
- CIFAR-10, CIFAR-100, SVHN: (1) ``data_dir`` with a ``save_to_disk`` folder; (2) the Hub.
- ``custom``: ``data_dir`` with a user's ``save_to_disk`` folder (train and test splits) of any
  image-classification data set; its column names are ``image_column`` / ``label_column``
  (run config ``image-column`` / ``label-column``); channels, square image size, number of
  classes and the normalisation are read from the data (:func:`source_info`).

Every source becomes two ``datasets.Dataset`` (train, test) with columns ``image`` and
``label``, and a flwr-datasets partitioner splits the train set: ``iid`` (IidPartitioner after a
seeded shuffle), ``dirichlet`` (DirichletPartitioner, label skew set by ``dirichlet_alpha``) or
``shard`` (PathologicalPartitioner, ``labels_per_client`` labels each). IDX images stay uint8
arrays (nested fixed-size Arrow lists sharing numpy's buffer), Hub images stay PNG-backed
``datasets.Image``; a partition is turned into tensors in one vectorised step and normalised
once. Nothing is read, and nothing is downloaded, at import time.
"""

from __future__ import annotations

import functools
import gzip
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import datasets
import numpy as np
import pyarrow as pa
import torch
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    PathologicalPartitioner,
)

from .config import CUSTOM, DATASETS, PARTITIONERS

# Where Debian's `dataset-fashion-mnist` installs the IDX files (tests monkeypatch this).
DEBIAN_FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

# The four Fashion-MNIST IDX files by role; each may also end in ".gz".
IDX_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# Examples the custom data set's per-channel mean and std are estimated from.
CUSTOM_STATS_EXAMPLES = 2000

# Smallest Dirichlet partition: BatchNorm in train mode needs 2 examples, and a larger floor
# makes flwr-datasets resample (and give up after 10 tries) far more often at small alpha.
DIRICHLET_MIN_PARTITION_SIZE = 2

# Seed of the fixed shuffle behind `load_test_set(max_examples=n)`: every run, whatever its
# own seed, is scored on the same n test images.
TEST_SUBSET_SEED = 0


class DataUnavailableError(RuntimeError):
    """No source holds the dataset; the message says how to provide one."""


class DataFormatError(ValueError):
    """A local file or saved dataset exists but does not have the expected layout."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset looks like and where the Hub keeps it (models and normalisation read it)."""

    name: str
    hub_id: str
    image_column: str
    label_column: str
    channels: int
    image_size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hub_config: str | None = None


# Every data set of config.DATASETS but CUSTOM, whose DatasetInfo is read from the data.
DATASET_INFO: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            name="fashion_mnist",
            hub_id="zalando-datasets/fashion_mnist",
            image_column="image",
            label_column="label",
            channels=1,
            image_size=28,
            num_classes=10,
            mean=(0.2860,),
            std=(0.3530,),
        ),
        DatasetInfo(
            name="cifar10",
            hub_id="uoft-cs/cifar10",
            image_column="img",
            label_column="label",
            channels=3,
            image_size=32,
            num_classes=10,
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2470, 0.2435, 0.2616),
        ),
        DatasetInfo(
            name="cifar100",
            hub_id="uoft-cs/cifar100",
            image_column="img",
            label_column="fine_label",
            channels=3,
            image_size=32,
            num_classes=100,
            mean=(0.5071, 0.4865, 0.4409),
            std=(0.2673, 0.2564, 0.2762),
        ),
        DatasetInfo(
            name="svhn",
            hub_id="ufldl-stanford/svhn",
            hub_config="cropped_digits",
            image_column="image",
            label_column="label",
            channels=3,
            image_size=32,
            num_classes=10,
            mean=(0.4377, 0.4438, 0.4728),
            std=(0.1980, 0.2010, 0.1970),
        ),
    )
}


def dataset_info(name: str) -> DatasetInfo:
    """Look a dataset up by name; an unknown name is an error listing the known ones."""
    info = DATASET_INFO.get(name) if isinstance(name, str) else None
    if info is None:
        allowed = ", ".join(DATASETS)
        raise ValueError(f"unknown dataset {name!r}; allowed: {allowed}")
    return info


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    """Raise naming the field, its value and the allowed range unless low <= value <= high."""
    if not _is_int(value) or value < low or (high is not None and value > high):
        allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise ValueError(f"DataConfig.{name}={value!r} is invalid; allowed: {allowed}")


@dataclass(frozen=True)
class DataConfig:
    """Which data a run uses and how it is split; frozen so it can key the caches."""

    dataset: str = "fashion_mnist"
    partitioner: str = "iid"
    num_partitions: int = 10
    dirichlet_alpha: float = 0.3
    labels_per_client: int = 3
    seed: int = 42
    data_dir: str | None = None
    max_examples_per_client: int | None = None
    image_column: str = ""  # "" = the data set's own (custom: "image")
    label_column: str = ""  # "" = the data set's own (custom: "label")

    def __post_init__(self) -> None:
        # A custom data set's classes are known once it is read (run-config checks do that).
        classes = None if self.dataset == CUSTOM else dataset_info(self.dataset).num_classes
        if self.partitioner not in PARTITIONERS:
            raise ValueError(
                f"DataConfig.partitioner={self.partitioner!r} is invalid; "
                f"allowed: {', '.join(PARTITIONERS)}"
            )
        _check_int("num_partitions", self.num_partitions, low=1)
        alpha = self.dirichlet_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(
                f"DataConfig.dirichlet_alpha={alpha!r} is invalid; allowed: a number > 0"
            )
        _check_int("labels_per_client", self.labels_per_client, low=1, high=classes)
        _check_int("seed", self.seed, low=0)
        if self.data_dir == "":  # a run config cannot hold None; "" means "not set"
            object.__setattr__(self, "data_dir", None)
        if self.data_dir is not None and not isinstance(self.data_dir, str):
            raise ValueError(
                f"DataConfig.data_dir={self.data_dir!r} is invalid; allowed: a path string or None"
            )
        if self.max_examples_per_client is not None:
            _check_int("max_examples_per_client", self.max_examples_per_client, low=1)


@dataclass(frozen=True, eq=False)
class TensorData:
    """Examples as tensors: x float32 N x C x H x W (normalised), y int64 N.

    Instances are shared through the caches: treat them as read-only.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"x has {self.x.shape[0]} rows but y has {self.y.shape[0]}")

    def __len__(self) -> int:
        return int(self.y.shape[0])


# --- IDX files ------------------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError
        raise DataFormatError(f"{path}: cannot read ({error})") from error


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (gunzipped if it ends in .gz) into its shape.

    The header is two zero bytes, the type code 0x08 (uint8), the number of dimensions, then
    one big-endian uint32 per dimension: 0x00000803 for images, 0x00000801 for labels.
    """
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] == 0:
        raise DataFormatError(
            f"{path}: not an IDX uint8 file (magic {raw[:4].hex() or 'missing'}, "
            "expected 000008 followed by the number of dimensions, e.g. 00000803)"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFormatError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + math.prod(dims)
    if len(raw) != expected:
        raise DataFormatError(
            f"{path}: {len(raw)} bytes, but the header's shape {dims} needs {expected}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx_files(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """Locate the four IDX files (plain preferred to gzipped); also return the missing names."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for role, base in IDX_FILES.items():
        candidates = [folder / base, folder / f"{base}.gz"]
        present = [path for path in candidates if path.is_file()]
        if present:
            found[role] = present[0]
        else:
            missing.append(f"{base}[.gz]")
    return found, missing


def _arrays_to_dataset(images: np.ndarray, labels: np.ndarray) -> datasets.Dataset:
    """Wrap uint8 N x C x H x W images as a Dataset without a per-image Python loop."""
    column: pa.Array = pa.array(np.ascontiguousarray(images).reshape(-1))
    for size in reversed(images.shape[1:]):  # W, then H, then C
        column = pa.FixedSizeListArray.from_arrays(column, size)
    table = pa.table({"image": column, "label": pa.array(labels.astype(np.int64))})
    return datasets.Dataset(table)


def _idx_split(files: dict[str, Path], split: str, info: DatasetInfo) -> datasets.Dataset:
    """Read one split's image and label files, checking they agree with each other and info."""
    images_path, labels_path = files[f"{split}_images"], files[f"{split}_labels"]
    images, labels = read_idx(images_path), read_idx(labels_path)
    size = info.image_size
    if images.shape[1:] != (size, size):
        raise DataFormatError(
            f"{images_path}: images of shape {images.shape[1:]}, expected ({size}, {size}) "
            "(an idx3 file, magic 00000803)"
        )
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataFormatError(
            f"{labels_path}: labels of shape {labels.shape}, expected ({len(images)},) to match "
            f"{images_path} (an idx1 file, magic 00000801)"
        )
    return _arrays_to_dataset(images[:, None], labels)


# --- sources --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """Where a dataset's splits come from; resolved before the cache so a new source reloads."""

    dataset: str
    kind: Literal["idx", "disk", "hub"]
    path: str | None = None
    image_column: str = ""
    label_column: str = ""


def _resolve_source(
    name: str, data_dir: str | None, columns: tuple[str, str] = ("", "")
) -> _Source:
    """Pick the first available source: data_dir, then Debian's IDX files, then the Hub."""
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
        if (folder / "dataset_dict.json").is_file():
            return _Source(name, "disk", str(folder), *columns)
        if name != "fashion_mnist":
            raise DataUnavailableError(
                f"data-dir {str(folder)!r} holds no {name} dataset: expected a folder written "
                "by datasets.DatasetDict.save_to_disk (dataset_dict.json, train/, test/)"
            )
        _, missing = _find_idx_files(folder)
        if missing:
            state = "does not exist" if not folder.is_dir() else "exists"
            raise DataUnavailableError(
                f"data-dir {str(folder)!r} ({state}) is missing Fashion-MNIST file(s): "
                f"{', '.join(missing)}; or give a folder written by DatasetDict.save_to_disk"
            )
        return _Source(name, "idx", str(folder))
    if name == CUSTOM:
        raise DataUnavailableError(
            "dataset 'custom' needs data-dir: a folder written by "
            "datasets.DatasetDict.save_to_disk with train and test splits"
        )
    if name == "fashion_mnist" and not _find_idx_files(DEBIAN_FMNIST_DIR)[1]:
        return _Source(name, "idx", str(DEBIAN_FMNIST_DIR))
    return _Source(name, "hub", None, *columns)


def _unavailable_message(info: DatasetInfo, error: Exception) -> str:
    """Say why the Hub failed and list every other way to provide the dataset."""
    if info.name == "fashion_mnist":
        folder = "the four IDX files, gzipped or not, or a DatasetDict.save_to_disk folder"
    else:
        folder = "a folder written by datasets.DatasetDict.save_to_disk with train and test"
    ways = [f"--run-config \"data-dir='/path/to/folder'\" ({folder})"]
    if info.name == "fashion_mnist":
        ways.append(f"apt-get install dataset-fashion-mnist (IDX files in {DEBIAN_FMNIST_DIR})")
    config = f" (config {info.hub_config!r})" if info.hub_config else ""
    ways.append(f"network access to the Hugging Face Hub dataset {info.hub_id!r}{config}")
    listed = "; ".join(f"({number}) {way}" for number, way in enumerate(ways, start=1))
    return (
        f"dataset {info.name!r} is not available: no local copy, and loading {info.hub_id!r} "
        f"from the Hub failed ({type(error).__name__}: {error}). Provide it by {listed}."
    )


def _load_hub(info: DatasetInfo) -> datasets.DatasetDict:
    """Load from the Hub (or its local cache); any failure becomes a how-to-fix error."""
    kwargs = {"name": info.hub_config} if info.hub_config else {}
    try:
        return datasets.load_dataset(info.hub_id, **kwargs)
    except Exception as error:  # offline: ConnectionError, OSError, HTTP client errors, ...
        raise DataUnavailableError(_unavailable_message(info, error)) from error


def _standardise(
    splits: datasets.DatasetDict, split: str, info: DatasetInfo, where: str
) -> datasets.Dataset:
    """Keep only the image and label columns, renamed image/label, images in one colour mode."""
    if split not in splits:
        raise DataFormatError(f"{where} has splits {list(splits)}; needs 'train' and 'test'")
    ds = splits[split]
    wanted = [info.image_column, info.label_column]
    missing = [column for column in wanted if column not in ds.column_names]
    if missing:
        raise DataFormatError(
            f"{where} split {split!r} lacks column(s) {missing}; it has {ds.column_names}"
        )
    ds = ds.select_columns(wanted)
    renames = {old: new for old, new in zip(wanted, ("image", "label"), strict=True) if old != new}
    if renames:
        ds = ds.rename_columns(renames)
    if isinstance(ds.features["image"], datasets.Image):
        ds = ds.cast_column("image", datasets.Image(mode="L" if info.channels == 1 else "RGB"))
    return ds


@functools.lru_cache(maxsize=8)
def source_info(source: _Source) -> DatasetInfo:
    """What the data of `source` looks like: a built-in data set's table entry (with the
    configured column names), or for ``custom`` what its save_to_disk folder holds."""
    if source.dataset != CUSTOM:
        info = dataset_info(source.dataset)
        return replace(
            info,
            image_column=source.image_column or info.image_column,
            label_column=source.label_column or info.label_column,
        )
    return _custom_info(source)


def _custom_info(source: _Source) -> DatasetInfo:
    """Channels, square image size, classes, mean and std of a user's save_to_disk folder."""
    splits = datasets.load_from_disk(str(source.path))
    where = f"data-dir {source.path!r}"
    image_column, label_column = source.image_column or "image", source.label_column or "label"
    if "train" not in splits or "test" not in splits:
        raise DataFormatError(f"{where} has splits {list(splits)}; needs 'train' and 'test'")
    train = splits["train"]
    for key, column in (("image-column", image_column), ("label-column", label_column)):
        if column not in train.column_names:
            raise DataFormatError(
                f"run-config '{key}' = {column!r} is not a column of {where}; it has "
                f"{train.column_names}"
            )
    first = np.asarray(train[0][image_column])
    feature = train.features[image_column]
    if isinstance(feature, datasets.Image):  # PIL: H x W (mode L) or H x W x C
        channels = 1 if first.ndim == 2 else 3
        height, width = first.shape[:2]
    else:  # nested lists: H x W or C x H x W
        channels = 1 if first.ndim == 2 else first.shape[0]
        height, width = first.shape[-2:]
    if height != width:
        raise DataFormatError(f"{where}: images are {height} x {width}; allowed: square images")
    labels = train.features[label_column]
    if isinstance(labels, datasets.ClassLabel):
        num_classes = labels.num_classes
    else:
        num_classes = 1 + max(max(split[label_column]) for split in (train, splits["test"]))
    info = DatasetInfo(
        CUSTOM, "", image_column, label_column, channels, height, num_classes,
        mean=(0.0,) * channels, std=(1.0,) * channels,
    )  # fmt: skip
    sample = _standardise(splits, "train", info, where)
    sample = sample.select(range(min(CUSTOM_STATS_EXAMPLES, len(sample))))
    images = _to_arrays(sample, info)[0].astype(np.float64) / 255.0
    mean = images.mean(axis=(0, 2, 3))
    std = np.maximum(images.std(axis=(0, 2, 3)), 1e-6)
    return replace(info, mean=tuple(map(float, mean)), std=tuple(map(float, std)))


@functools.lru_cache(maxsize=4)
def _load_splits(source: _Source) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Load (train, test) once per process and source; every client of the process shares it."""
    info = source_info(source)
    if source.kind == "idx":
        files, missing = _find_idx_files(Path(str(source.path)))
        if missing:  # removed since the source was resolved
            raise DataUnavailableError(f"{source.path} is missing {', '.join(missing)}")
        return _idx_split(files, "train", info), _idx_split(files, "test", info)
    if source.kind == "disk":
        splits, where = datasets.load_from_disk(str(source.path)), f"data-dir {source.path!r}"
    else:
        splits, where = _load_hub(info), f"Hub dataset {info.hub_id!r}"
    return _standardise(splits, "train", info, where), _standardise(splits, "test", info, where)


# --- tensors --------------------------------------------------------------------------------


def _flat_images(ds: datasets.Dataset) -> np.ndarray:
    """The image column of a nested-list dataset as one flat uint8 array (no copy per image)."""
    column = ds.with_format("arrow")[:].column("image").combine_chunks()
    while pa.types.is_fixed_size_list(column.type) or pa.types.is_list(column.type):
        column = column.flatten()
    return column.to_numpy(zero_copy_only=False)


def _to_arrays(ds: datasets.Dataset, info: DatasetInfo) -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 N x C x H x W and labels, decoded in one batch rather than per item."""
    shape = (info.channels, info.image_size, info.image_size)
    if len(ds) == 0:
        return np.zeros((0, *shape), np.uint8), np.zeros(0, np.int64)
    if isinstance(ds.features["image"], datasets.Image):
        batch = ds.with_format("numpy")[:]
        images, labels = batch["image"], batch["label"]
        if images.ndim in (3, 4):  # N x H x W (mode L) or N x H x W x C (mode RGB)
            images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    else:  # nested lists stored C x H x W, as _arrays_to_dataset writes them
        images = _flat_images(ds)
        if images.size == len(ds) * math.prod(shape):
            images = images.reshape(len(ds), *shape)
        labels = np.asarray(ds.with_format("arrow")[:].column("label").to_numpy())
    if images.shape[1:] != shape or images.dtype != np.uint8:
        raise DataFormatError(
            f"{info.name}: images decode to {images.dtype} {images.shape}, "
            f"expected uint8 (N, {', '.join(map(str, shape))})"
        )
    if labels.min() < 0 or labels.max() >= info.num_classes:
        raise DataFormatError(
            f"{info.name}: labels span [{labels.min()}, {labels.max()}], "
            f"expected [0, {info.num_classes - 1}]"
        )
    return images, labels


def _to_tensors(ds: datasets.Dataset, info: DatasetInfo) -> TensorData:
    """Decode and normalise once per partition: (x / 255 - mean) / std per channel."""
    images, labels = _to_arrays(ds, info)
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    mean = torch.tensor(info.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(info.std, dtype=torch.float32).view(1, -1, 1, 1)
    x.div_(255.0).sub_(mean).div_(std)
    return TensorData(x=x, y=torch.from_numpy(labels.astype(np.int64)))


# --- partitions -----------------------------------------------------------------------------


def _make_partitioner(cfg: DataConfig) -> Partitioner:
    """Build the flwr-datasets partitioner named by cfg; every random choice uses cfg.seed."""
    if cfg.partitioner == "iid":
        return IidPartitioner(num_partitions=cfg.num_partitions)
    if cfg.partitioner == "dirichlet":
        return DirichletPartitioner(
            num_partitions=cfg.num_partitions,
            partition_by="label",
            alpha=float(cfg.dirichlet_alpha),
            min_partition_size=DIRICHLET_MIN_PARTITION_SIZE,
            self_balancing=False,
            shuffle=True,
            seed=cfg.seed,
        )
    # "first-deterministic": exactly k distinct labels per client, client i always holds label
    # i mod C (so every label is used once there are >= C clients), the other k-1 drawn from
    # the seeded RNG. ("random" can leave a label unused; "deterministic" ignores the seed.)
    return PathologicalPartitioner(
        num_partitions=cfg.num_partitions,
        partition_by="label",
        num_classes_per_partition=cfg.labels_per_client,
        class_assignment_mode="first-deterministic",
        shuffle=True,
        seed=cfg.seed,
    )


@functools.lru_cache(maxsize=4)
def _partitioner(cfg: DataConfig, source: _Source) -> Partitioner:
    """One partitioner per split, shared by the process's clients: indices are computed once."""
    train, _ = _load_splits(source)
    if cfg.partitioner == "iid":
        # IidPartitioner shards contiguous rows; a seeded shuffle first makes the split IID
        # whatever the source's order (a save_to_disk folder may be sorted by label).
        train = train.shuffle(seed=cfg.seed, keep_in_memory=True)
    partitioner = _make_partitioner(cfg)
    partitioner.dataset = train
    # Assign every index now, before the partitioner is shared: the lazy assignment draws from
    # the partitioner's RNG, so two threads racing through it could get different partitions.
    _ = partitioner.num_partitions
    return partitioner


def load_partition(cfg: DataConfig, partition_id: int) -> TensorData:
    """One client's train examples as normalised tensors (cached per config and id).

    Partitions come in a seeded random order (IID: seeded shuffle before sharding; Dirichlet
    and shard: the partitioner's seeded shuffle), so ``max_examples_per_client=n`` keeps the
    first n of the partition: a seeded random subset, the same on every call.
    """
    if not _is_int(partition_id) or not 0 <= partition_id < cfg.num_partitions:
        raise ValueError(
            f"partition_id={partition_id!r} is invalid; allowed: an integer in "
            f"[0, {cfg.num_partitions}) for num_partitions={cfg.num_partitions}"
        )
    return _load_partition(cfg, int(partition_id))


@functools.lru_cache(maxsize=128)
def _load_partition(cfg: DataConfig, partition_id: int) -> TensorData:
    source = _source(cfg)
    partitioner = _partitioner(replace(cfg, max_examples_per_client=None), source)
    part = partitioner.load_partition(partition_id)
    if cfg.max_examples_per_client is not None:
        part = part.select(range(min(cfg.max_examples_per_client, len(part))))
    return _to_tensors(part, source_info(source))


@functools.lru_cache(maxsize=4)
def _test_set(source: _Source, max_examples: int | None) -> TensorData:
    _, test = _load_splits(source)
    if max_examples is not None and max_examples < len(test):
        order = np.random.default_rng(TEST_SUBSET_SEED).permutation(len(test))
        test = test.select(np.sort(order[:max_examples]))
    return _to_tensors(test, source_info(source))


def load_test_set(cfg: DataConfig, max_examples: int | None = None) -> TensorData:
    """The test split as normalised tensors (cached); only dataset and data_dir matter.

    ``max_examples=n`` keeps n examples picked by a fixed shuffle (:data:`TEST_SUBSET_SEED`),
    independent of ``cfg.seed``, so runs with different seeds are scored on the same images.
    """
    if max_examples is not None and (not _is_int(max_examples) or max_examples < 1):
        raise ValueError(f"max_examples={max_examples!r} is invalid; allowed: None or >= 1")
    return _test_set(_source(cfg), max_examples)


def _source(cfg: DataConfig) -> _Source:
    return _resolve_source(cfg.dataset, cfg.data_dir, (cfg.image_column, cfg.label_column))


def info_for(cfg: DataConfig) -> DatasetInfo:
    """The data set of `cfg` as the models and the normalisation see it (custom: read once)."""
    return source_info(_source(cfg))


def class_counts(cfg: DataConfig, partition_id: int) -> dict[int, int]:
    """Examples per label in one partition (labels absent from it are left out)."""
    labels, counts = np.unique(load_partition(cfg, partition_id).y.numpy(), return_counts=True)
    return {int(label): int(count) for label, count in zip(labels, counts, strict=True)}


def clear_caches() -> None:
    """Forget loaded splits, partitioners and tensors (tests; processes that switch data)."""
    for cached in (_load_partition, _test_set, _partitioner, _load_splits, source_info):
        cached.cache_clear()
