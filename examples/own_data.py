"""Write an image-classification data set the way a user would: `datasets` + save_to_disk.

    .venv/bin/python examples/own_data.py /tmp/my-data [--max-examples 20000]

Here the images come from Debian's Fashion-MNIST IDX files, stored as PNG-backed
`datasets.Image` in a column "picture" with the class in "class" (not the app's names, so the
run config has to say `image-column='picture' label-column='class'`). Any DatasetDict with a
"train" and a "test" split, square images (grayscale or colour) and integer labels works the same.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import datasets
import numpy as np

from fedbat_flwr.data import DEBIAN_FMNIST_DIR, IDX_FILES, read_idx


def split(images: np.ndarray, labels: np.ndarray, count: int) -> datasets.Dataset:
    """The first `count` examples as a Dataset of PIL images and ClassLabel labels."""
    features = datasets.Features(
        {"picture": datasets.Image(), "class": datasets.ClassLabel(num_classes=10)}
    )
    rows = {"picture": list(images[:count]), "class": labels[:count].astype(int).tolist()}
    return datasets.Dataset.from_dict(rows, features=features)


def idx_path(name: str) -> Path:
    """A Debian Fashion-MNIST file, plain or gzipped."""
    plain = DEBIAN_FMNIST_DIR / name
    return plain if plain.exists() else plain.with_name(f"{name}.gz")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--max-examples", type=int, default=20000, help="train examples kept")
    args = parser.parse_args()
    read = {role: read_idx(idx_path(name)) for role, name in IDX_FILES.items()}
    splits = datasets.DatasetDict(
        train=split(read["train_images"], read["train_labels"], args.max_examples),
        test=split(read["test_images"], read["test_labels"], len(read["test_labels"])),
    )
    splits.save_to_disk(str(args.folder))
    print(f"wrote {args.folder}: {splits}")


if __name__ == "__main__":
    main()
