"""Datasets for the ``divebatch`` command: Fashion-MNIST, scikit-learn digits, synthetic.

Everything here runs offline. Each loader returns a :class:`DataBundle` of in-memory float32
tensors, already normalised, so the training loop indexes them directly (no per-sample
``__getitem__``/collate cost, which on a 2-core CPU would cost more than the model).

* ``fashion-mnist``: the IDX files of Debian's ``dataset-fashion-mnist`` package
  (``/usr/share/datasets/fashion-mnist/``, 60 000 train + 10 000 test images, 28×28), or any
  folder with the four standard IDX files (``train-images-idx3-ubyte[.gz]`` …) given as
  ``data_dir``. Pixels are scaled to [0, 1], then standardised with the training-set mean and
  standard deviation.
* ``digits``: scikit-learn's bundled ``load_digits()`` (1797 8×8 images, 10 classes), split
  80/20 into train/test with a fixed permutation (seed 0), pixels scaled to [0, 1] and
  standardised. Always available: the fallback when Fashion-MNIST is not installed.
* ``synthetic``: the convex setting of the DiveBatch authors' prototype: logistic regression,
  n = 1000 samples, d = 512 features uniform in (−1, 1), labels ``1[x·w* + 0.1·ε > 0]`` with
  ``w* ~ N(0, I)`` and ``ε ~ N(0, 1)``; a test set of another 1000 samples from the same
  ``w*``. Generated from ``seed`` with NumPy's PCG64, so it is identical on every machine.

``load_dataset(name)`` raises :class:`DataNotFoundError` (a ``FileNotFoundError``) with a
message that says how to get the data when the files are missing.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DataBundle",
    "DataNotFoundError",
    "DEFAULT_FASHION_MNIST_DIR",
    "DATASETS",
    "load_dataset",
    "load_fashion_mnist",
    "load_digits",
    "make_synthetic",
    "read_idx",
    "default_dataset_name",
]

#: Where Debian's ``dataset-fashion-mnist`` package installs the IDX files.
DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Names accepted by :func:`load_dataset` (``"auto"`` picks Fashion-MNIST, else digits).
DATASETS = ("auto", "fashion-mnist", "digits", "synthetic")

_FMNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

_HOW_TO_GET_DATA = (
    "install Debian's package (`apt-get install dataset-fashion-mnist`, files land in "
    f"{DEFAULT_FASHION_MNIST_DIR}), or pass --data-dir DIR with the four IDX files "
    "(train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], "
    "t10k-labels-idx1-ubyte[.gz]), or use --dataset digits / --dataset synthetic (built in)"
)


class DataNotFoundError(FileNotFoundError):
    """The requested dataset's files are not there; the message says how to get them."""


@dataclass
class DataBundle:
    """A train/test split held in memory.

    Attributes:
        name: dataset name (``"fashion-mnist"``, ``"digits"``, ``"synthetic"``).
        x_train, x_test: float32 features, ``[N, *input_shape]`` (images are ``[N, 1, H, W]``,
            tabular data ``[N, d]``); normalised as described in the module docstring.
        y_train, y_test: int64 class labels ``[N]`` (``{0, 1}`` for binary tasks).
        num_classes: number of classes; 2 with ``task == "binary"`` means one logit.
        task: ``"multiclass"`` (softmax cross-entropy) or ``"binary"`` (one logit, logistic loss).
        source: where the data came from (a folder, or a description).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    task: str = "multiclass"
    source: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample's features (without the batch dimension)."""
        return tuple(self.x_train.shape[1:])

    @property
    def n_train(self) -> int:
        """Number of training samples n (the ``dataset_size`` of the DiveBatch rule)."""
        return int(self.x_train.shape[0])

    def train_dataset(self) -> torch.utils.data.TensorDataset:
        """The training split as a ``TensorDataset`` (for a user's own ``DataLoader``)."""
        return torch.utils.data.TensorDataset(self.x_train, self.y_train)

    def test_dataset(self) -> torch.utils.data.TensorDataset:
        """The test split as a ``TensorDataset``."""
        return torch.utils.data.TensorDataset(self.x_test, self.y_test)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into a NumPy array.

    The IDX format: two zero bytes, a type code (0x08 = uint8 … 0x0E = float64), the number of
    dimensions, then one big-endian uint32 per dimension, then the data, big-endian.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    code, ndim = raw[2], raw[3]
    if code not in dtypes:
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02x}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    data = np.frombuffer(raw, dtype=dtypes[code], offset=offset)
    expected = int(np.prod(shape)) if shape else 0
    if data.size != expected:
        raise ValueError(f"{path}: header says {shape} ({expected} values), file holds {data.size}")
    return data.reshape(shape).astype(dtypes[code][1:], copy=False)


def _find_idx(data_dir: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        p = data_dir / name
        if p.is_file():
            return p
    return None


def fashion_mnist_available(data_dir: str | os.PathLike | None = None) -> bool:
    """True when the four Fashion-MNIST IDX files are in ``data_dir`` (default: Debian's)."""
    d = Path(data_dir) if data_dir is not None else DEFAULT_FASHION_MNIST_DIR
    return d.is_dir() and all(_find_idx(d, s) is not None for s in _FMNIST_FILES.values())


def load_fashion_mnist(data_dir: str | os.PathLike | None = None, limit: int | None = None) -> DataBundle:
    """Load Fashion-MNIST from IDX files.

    Args:
        data_dir: folder with the four IDX files (gzip or plain); default
            :data:`DEFAULT_FASHION_MNIST_DIR`.
        limit: keep only the first ``limit`` training and test samples (for smoke tests).

    Returns:
        A :class:`DataBundle` with images ``[N, 1, 28, 28]`` float32, standardised with the
        training-set mean and std of the [0, 1]-scaled pixels.

    Raises:
        DataNotFoundError: a file is missing; the message says how to get the data.
    """
    d = Path(data_dir) if data_dir is not None else DEFAULT_FASHION_MNIST_DIR
    paths = {}
    for key, stem in _FMNIST_FILES.items():
        p = _find_idx(d, stem) if d.is_dir() else None
        if p is None:
            raise DataNotFoundError(f"Fashion-MNIST file {stem}[.gz] not found in {d}: {_HOW_TO_GET_DATA}")
        paths[key] = p
    arr = {k: read_idx(p) for k, p in paths.items()}
    for split in ("train", "test"):
        xi, yi = arr[f"{split}_images"], arr[f"{split}_labels"]
        if xi.ndim != 3 or yi.ndim != 1 or xi.shape[0] != yi.shape[0]:
            raise ValueError(f"{d}: {split} images {xi.shape} and labels {yi.shape} do not match")
    if limit is not None:
        for k in arr:
            arr[k] = arr[k][:limit]
    xtr = torch.from_numpy(arr["train_images"].astype(np.float32) / 255.0).unsqueeze(1)
    xte = torch.from_numpy(arr["test_images"].astype(np.float32) / 255.0).unsqueeze(1)
    mean, std = xtr.mean(), xtr.std().clamp_min(1e-6)
    xtr = (xtr - mean) / std
    xte = (xte - mean) / std
    return DataBundle(
        name="fashion-mnist",
        x_train=xtr.contiguous(),
        y_train=torch.from_numpy(arr["train_labels"].astype(np.int64)),
        x_test=xte.contiguous(),
        y_test=torch.from_numpy(arr["test_labels"].astype(np.int64)),
        num_classes=10,
        source=str(d),
        meta={"mean": float(mean), "std": float(std)},
    )


def load_digits(test_fraction: float = 0.2) -> DataBundle:
    """scikit-learn's digits (bundled with scikit-learn, no download), as ``[N, 1, 8, 8]``.

    The split is a fixed permutation (seed 0): 1437 train / 360 test samples by default.
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is a test dependency
        raise DataNotFoundError(f"scikit-learn is not installed, so digits is unavailable: {_HOW_TO_GET_DATA}") from e
    ds = _sk_load_digits()
    x = ds.images.astype(np.float32) / 16.0
    y = ds.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    te, tr = perm[:n_test], perm[n_test:]
    xtr = torch.from_numpy(x[tr]).unsqueeze(1)
    xte = torch.from_numpy(x[te]).unsqueeze(1)
    mean, std = xtr.mean(), xtr.std().clamp_min(1e-6)
    return DataBundle(
        name="digits",
        x_train=((xtr - mean) / std).contiguous(),
        y_train=torch.from_numpy(y[tr]),
        x_test=((xte - mean) / std).contiguous(),
        y_test=torch.from_numpy(y[te]),
        num_classes=10,
        source="sklearn.datasets.load_digits",
    )


def make_synthetic(n: int = 1000, d: int = 512, seed: int = 0, noise: float = 0.1, n_test: int = 1000) -> DataBundle:
    """The DiveBatch authors' convex prototype: logistic regression on uniform features.

    ``x ~ U(-1, 1)^d``, ``w* ~ N(0, I_d)``, label ``y = 1[x·w* + noise·ε > 0]``, ``ε ~ N(0, 1)``.
    The train set has ``n`` samples, the test set ``n_test`` from the same ``w*``.
    Deterministic in ``seed`` (NumPy PCG64), entirely offline. ``task == "binary"``: the model is
    one logit (``Linear(d, 1, bias=False)`` as in the prototype) with the logistic loss.
    """
    if n <= 0 or d <= 0:
        raise ValueError(f"synthetic data needs n > 0 and d > 0, got n={n}, d={d}")
    rng = np.random.default_rng(seed)
    w = rng.normal(0.0, 1.0, size=d)
    x = rng.uniform(-1.0, 1.0, size=(n + n_test, d))
    y = (x @ w + noise * rng.normal(0.0, 1.0, size=n + n_test) > 0).astype(np.int64)
    xt = torch.from_numpy(x.astype(np.float32))
    yt = torch.from_numpy(y)
    return DataBundle(
        name="synthetic",
        x_train=xt[:n].contiguous(),
        y_train=yt[:n].contiguous(),
        x_test=xt[n:].contiguous(),
        y_test=yt[n:].contiguous(),
        num_classes=2,
        task="binary",
        source=f"synthetic logistic regression n={n} d={d} seed={seed}",
        meta={"n": n, "d": d, "seed": seed, "noise": noise},
    )


def default_dataset_name(data_dir: str | os.PathLike | None = None) -> str:
    """``"fashion-mnist"`` when its files are present (in ``data_dir`` or Debian's folder), else ``"digits"``."""
    return "fashion-mnist" if fashion_mnist_available(data_dir) else "digits"


def load_dataset(name: str = "auto", data_dir: str | os.PathLike | None = None, seed: int = 0,
                 limit: int | None = None) -> DataBundle:
    """Load a dataset by name (see :data:`DATASETS`).

    ``"auto"``: Fashion-MNIST if found (``data_dir`` or Debian's folder), else digits.
    With an explicit ``data_dir`` and ``name`` ``"auto"``/``"fashion-mnist"``, the files must be
    there (no silent fallback). ``seed`` only affects ``"synthetic"``. ``limit`` truncates
    Fashion-MNIST (smoke tests).

    Raises:
        DataNotFoundError: the data is not there; the message says how to get it.
        ValueError: unknown name.
    """
    if name == "auto":
        name = "fashion-mnist" if data_dir is not None else default_dataset_name()
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir, limit=limit)
    if name == "digits":
        return load_digits()
    if name == "synthetic":
        return make_synthetic(seed=seed)
    raise ValueError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
