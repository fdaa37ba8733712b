"""Data sets: scikit-learn digits (embedded), MNIST, Fashion-MNIST and Tiny Shakespeare.

The behaviour-cloning sets of [`toreq.control`][toreq.control] (CartPole, Acrobot) load
through [`load_classification`][toreq.data.load_classification] too.

The digits ship inside scikit-learn. The other data sets are read from a data root, a folder
with the layout:

    <root>/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
    <root>/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
    <root>/tinyshakespeare/input.txt

The root is, in order: the `root=` argument, the `TOREQ_DATA` environment variable, or
`~/.cache/toreq` (see [`data_root`][toreq.data.data_root]). Every file is checked against its
SHA-256 digest ([`SHA256`][toreq.data.SHA256]) before it is parsed; a missing file is downloaded
from its public source ([`MIRRORS`][toreq.data.MIRRORS]) when `download=True`, into a temporary file
beside it that is verified and then atomically renamed, so a partial or wrong download never sits
under the final name. Every problem with the data raises [`DataError`][toreq.data.DataError], whose
message says where toreq looked, what it expected and what to do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import tempfile
import warnings
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "MIRRORS",
    "SHA256",
    "CharCorpus",
    "ClassificationData",
    "DataError",
    "data_root",
    "load_classification",
    "load_digits",
    "register_classification",
    "load_fashion_mnist",
    "load_mnist",
    "load_tiny_shakespeare",
    "read_idx",
]

_log = logging.getLogger(__name__)

ENV_VAR = "TOREQ_DATA"
"""Environment variable naming the data root when no `root=` is given."""

SHA256: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz":
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz":
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz":
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz":
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz":
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz":
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte.gz":
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz":
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
    "tinyshakespeare": {
        "input.txt":
            "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    },
}
"""SHA-256 of every data file (the official files), per data set folder and file name."""

MIRRORS: dict[str, list[str]] = {
    "mnist": [
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ],
    "fashion-mnist": [
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    ],
    "tinyshakespeare": [
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/",
    ],
}
"""Download sources per data set folder: base URLs, tried in order; a file's URL is the base
followed by its name. Point an entry elsewhere (a local mirror, a `file://` URL) to download
from there."""

_IDX_IMAGES, _IDX_LABELS = 2051, 2049  # IDX magic numbers: unsigned bytes, 3 resp. 1 dims
_IDX_SPLITS = {"train": "train", "test": "t10k"}  # split -> file name prefix

# (real path, size, mtime_ns) -> sha256 hex digest, so that repeated loads skip the hashing.
_DIGESTS: dict[tuple[str, int, int], str] = {}


class DataError(RuntimeError):
    """A data file is missing, cannot be downloaded, is corrupt or cannot be parsed.

    The message names the file(s), says what was expected and how to fix it.
    """


# ----------------------------------------------------------------------------- containers


@dataclass(frozen=True, eq=False)
class ClassificationData:
    """An image classification data set as flattened tensors.

    Attributes:
        name: the data set (`"digits"`, `"mnist"`, `"fashion_mnist"`, `"cartpole"`,
            `"acrobot"`).
        x_train: `float32` inputs of shape `(N, D)`, `D = C * H * W`, each image
            flattened in `(C, H, W)` order, values in `[0, 1]` (the control sets: scaled
            states, `image_shape` `(1, 1, D)`).
        y_train: `int64` labels of shape `(N,)` in `0 .. num_classes - 1`.
        x_test: the test inputs, as `x_train`.
        y_test: the test labels, as `y_train`.
        num_classes: number of classes.
        image_shape: `(C, H, W)`, so that a model can do `x.view(-1, *image_shape)`.

    Instances compare by identity (tensors have no single truth value).

    Raises:
        ValueError: on construction, when shapes, dtypes or labels are inconsistent.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    image_shape: tuple[int, int, int]

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.image_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError("image_shape must be (C, H, W) of positive ints, got "
                             f"{self.image_shape!r}")
        object.__setattr__(self, "image_shape", shape)
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {self.num_classes}")
        dim = math.prod(shape)
        for split in ("train", "test"):
            x, y = self.tensors(split)
            if x.dim() != 2 or x.shape[1] != dim or not x.is_floating_point():
                raise ValueError(f"x_{split} must be a floating (N, {dim}) tensor for image_shape "
                                 f"{shape}, got {x.dtype} {tuple(x.shape)}")
            if y.dim() != 1 or y.dtype != torch.int64 or y.shape[0] != x.shape[0]:
                raise ValueError(f"y_{split} must be an int64 ({x.shape[0]},) tensor, got "
                                 f"{y.dtype} {tuple(y.shape)}")
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(f"y_{split} has labels outside 0..{self.num_classes - 1}")

    @property
    def input_dim(self) -> int:
        """Number of input features `D = C * H * W`."""
        return int(self.x_train.shape[1])

    def tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """`(x, y)` of a split, `"train"` or `"test"`."""
        if split == "train":
            return self.x_train, self.y_train
        if split == "test":
            return self.x_test, self.y_test
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")

    def to_loader(self, split: str, batch_size: int, shuffle: bool = False,
                  generator: torch.Generator | None = None, **kwargs: Any) -> DataLoader:
        """A `DataLoader` of `(x, y)` batches over a split.

        Args:
            split: `"train"` or `"test"`.
            batch_size: samples per batch (the last one may be smaller unless
                `drop_last=True`).
            shuffle: reshuffle every epoch; pass `generator` for a reproducible order.
            generator: the random generator used for shuffling.
            **kwargs: passed on to `DataLoader` (`drop_last`, `num_workers`, ...).
        """
        x, y = self.tensors(split)
        return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle,
                          generator=generator, **kwargs)

    def to(self, device: torch.device | str) -> ClassificationData:
        """A copy with every tensor on `device` (e.g. a small data set kept on the GPU)."""
        return dataclasses.replace(
            self, x_train=self.x_train.to(device), y_train=self.y_train.to(device),
            x_test=self.x_test.to(device), y_test=self.y_test.to(device))

    def __repr__(self) -> str:
        return (f"ClassificationData(name={self.name!r}, train={tuple(self.x_train.shape)}, "
                f"test={tuple(self.x_test.shape)}, num_classes={self.num_classes}, "
                f"image_shape={self.image_shape})")


@dataclass(frozen=True, eq=False)
class CharCorpus:
    """A character-level text corpus with its vocabulary and a train/validation split.

    Attributes:
        text: the whole text.
        vocab: its distinct characters, sorted; a character's token id is its index here.
        train: `int64` token ids of the first part of the text.
        val: `int64` token ids of the rest (the validation split).

    Build one from any text with `from_text`. Instances compare by identity.
    """

    text: str
    vocab: str
    train: torch.Tensor
    val: torch.Tensor
    _table: np.ndarray = field(init=False, repr=False)       # code point -> id, -1 if absent
    _codepoints: np.ndarray = field(init=False, repr=False)  # id -> code point

    def __post_init__(self) -> None:
        if not self.vocab:
            raise ValueError("vocab is empty")
        if list(self.vocab) != sorted(set(self.vocab)):
            raise ValueError("vocab must be the sorted distinct characters")
        codepoints = _codepoints(self.vocab)
        table = np.full(int(codepoints.max()) + 1, -1, dtype=np.int64)
        table[codepoints] = np.arange(len(codepoints))
        object.__setattr__(self, "_codepoints", codepoints)
        object.__setattr__(self, "_table", table)
        for split in ("train", "val"):
            ids = getattr(self, split)
            if ids.dim() != 1 or ids.dtype != torch.int64:
                raise ValueError(f"{split} must be a 1-D int64 tensor, got {ids.dtype} "
                                 f"{tuple(ids.shape)}")

    @classmethod
    def from_text(cls, text: str, val_fraction: float = 0.1) -> CharCorpus:
        """A corpus over `text`: its first `1 - val_fraction` trains, the rest validates."""
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if not text:
            raise ValueError("text is empty")
        empty = torch.empty(0, dtype=torch.int64)
        corpus = cls(text, "".join(sorted(set(text))), empty, empty)
        ids = corpus.encode(text)
        n_train = int(len(text) * (1.0 - val_fraction))
        return dataclasses.replace(corpus, train=ids[:n_train].clone(), val=ids[n_train:].clone())

    @property
    def vocab_size(self) -> int:
        """Number of distinct characters (token ids are `0 .. vocab_size - 1`)."""
        return len(self.vocab)

    def encode(self, s: str) -> torch.Tensor:
        """Token ids (`int64`, shape `(len(s),)`) of a string.

        Raises:
            ValueError: when `s` holds characters outside the vocabulary (they are named).
        """
        cp = _codepoints(s)
        ids = np.full(cp.shape, -1, dtype=np.int64)
        known = cp < self._table.shape[0]
        ids[known] = self._table[cp[known]]
        unknown = ids < 0
        if unknown.any():
            chars = sorted({chr(c) for c in cp[unknown].tolist()})
            shown = ", ".join(repr(c) for c in chars[:20]) + (", ..." if len(chars) > 20 else "")
            raise ValueError(f"cannot encode characters not in the vocabulary "
                             f"({self.vocab_size} characters): {shown}")
        return torch.from_numpy(ids)

    def decode(self, ids: torch.Tensor | np.ndarray | Iterable[int]) -> str:
        """The string of a sequence of token ids (a tensor, an array or an iterable of ints).

        Raises:
            ValueError: for non-integer ids or ids outside `0 .. vocab_size - 1`.
        """
        if isinstance(ids, torch.Tensor):
            arr = ids.detach().cpu().numpy()
        else:
            arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids))
        arr = arr.reshape(-1)
        if arr.size == 0:
            return ""
        if arr.dtype.kind not in "iu":
            raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
        if int(arr.min()) < 0 or int(arr.max()) >= self.vocab_size:
            raise ValueError(f"token ids must be in 0..{self.vocab_size - 1}, got values in "
                             f"{int(arr.min())}..{int(arr.max())}")
        return self._codepoints[arr].astype("<u4").tobytes().decode("utf-32-le")

    def __repr__(self) -> str:
        return (f"CharCorpus(chars={len(self.text)}, vocab_size={self.vocab_size}, "
                f"train={self.train.numel()}, val={self.val.numel()})")


def _codepoints(s: str) -> np.ndarray:
    return np.frombuffer(s.encode("utf-32-le"), dtype="<u4").astype(np.int64)


# ----------------------------------------------------------------------------- files


def data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The data root: `root` if given, else `$TOREQ_DATA` if set, else `~/.cache/toreq`.

    Nothing is created here (a download creates the folders it needs).
    """
    return _resolve_root(root)[0]


def _resolve_root(root: str | os.PathLike[str] | None) -> tuple[Path, str]:
    """The data root and where it came from, for error messages."""
    if root is not None:
        return Path(root).expanduser(), "the root= argument"
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser(), f"the {ENV_VAR} environment variable"
    return Path.home() / ".cache" / "toreq", f"the default; neither root= nor {ENV_VAR} is set"


def _sha256(path: Path) -> str:
    """SHA-256 of a file, cached per (real path, size, mtime) in this process."""
    try:
        st = path.stat()
        key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
        digest = _DIGESTS.get(key)
        if digest is None:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            digest = _DIGESTS[key] = h.hexdigest()
    except OSError as error:
        raise DataError(f"cannot read {path}: {error}. Check its permissions, or delete it so "
                        "that it is downloaded again.") from error
    return digest


def _verify(path: Path, folder: str, name: str) -> None:
    expected = SHA256[folder][name]
    actual = _sha256(path)
    if actual != expected:
        raise DataError(
            f"{path} fails its sha256 check: expected {expected}, got {actual}. The file is "
            f"corrupt (e.g. an interrupted copy or download) or a different version of "
            f"{folder}/{name}. "
            "Delete it and load again with download=True to re-download it, or replace it with "
            "the official file.")


def _fetch(folder: str, name: str, root: str | os.PathLike[str] | None, download: bool) -> Path:
    """The verified local path of a data file, downloaded first if absent and allowed."""
    base, origin = _resolve_root(root)
    path = base / folder / name
    if path.is_file():
        _verify(path, folder, name)
        return path
    urls = [mirror + name for mirror in MIRRORS.get(folder, ())]
    advice = (f"Looked for {path} (data root {base}, from {origin}). To fix it, pass root= or "
              f"set {ENV_VAR} to a folder that holds {folder}/{name} "
              f"(sha256 {SHA256[folder][name]})")
    if not download:
        raise DataError(f"{path} does not exist and download=False. {advice}, or load with "
                        f"download=True while online (sources: {', '.join(urls) or 'none'}).")
    errors = []
    for url in urls:
        try:
            _download(url, path, SHA256[folder][name])
            return path
        except DataError as error:
            errors.append(f"  - {url}: {error}")
    tried = "\n".join(errors) if errors else "  (no download source configured in MIRRORS)"
    raise DataError(f"{path} does not exist and could not be downloaded; tried:\n{tried}\n"
                    f"{advice}, or go online and load again.")


def _download(url: str, dest: Path, expected: str) -> None:
    """Downloads `url` into a temporary file beside `dest`, verifies it, renames it."""
    import urllib.request
    from http.client import HTTPException

    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as error:
        raise DataError(f"cannot write to {dest.parent}: {error}") from error
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        request = urllib.request.Request(url, headers={"User-Agent": "toreq"})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=60) as response:
            bar = _progress(int(response.headers.get("Content-Length") or 0) or None, dest.name)
            try:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    h.update(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            finally:
                if bar is not None:
                    bar.close()
        actual = h.hexdigest()
        if actual != expected:
            raise DataError(f"wrong sha256: expected {expected}, got {actual}; the source "
                            "served a different or damaged file, nothing was kept")
        os.replace(tmp, dest)
        _log.info("downloaded %s to %s", url, dest)
    except (OSError, ValueError, HTTPException) as error:  # URLError is an OSError
        raise DataError(f"{type(error).__name__}: {error}") from error
    finally:
        tmp.unlink(missing_ok=True)
    _sha256(dest)  # cache the digest just checked


def _progress(total: int | None, desc: str) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency; the bar is optional
        return None
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, leave=False, disable=None)


# ----------------------------------------------------------------------------- IDX


def _gunzip(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            compressed = f.read()
    except OSError as error:
        raise DataError(f"cannot read {path}: {error}") from error
    chunks = []
    try:
        while compressed:  # every gzip member (the official files have one)
            d = zlib.decompressobj(wbits=31)  # gzip container; checks the CRC and size trailer
            chunks.append(d.decompress(compressed))
            if not d.eof:
                raise EOFError("compressed data ends before the end-of-stream marker")
            compressed = d.unused_data
    except (zlib.error, EOFError) as error:
        raise DataError(f"{path} is not a valid gzip file ({error}): it is truncated or corrupt; "
                        "delete it and download it again.") from error
    return b"".join(chunks)


def read_idx(path: str | os.PathLike[str], expected_magic: int) -> np.ndarray:
    """Reads a gzip-compressed IDX file of unsigned bytes into a read-only `uint8` array.

    `expected_magic` is 2051 for images (3 dimensions) or 2049 for labels (1 dimension).
    The gzip stream, the magic number, the dimensions and the data length are all checked;
    the file's sha256 is not (the loaders check it before).

    Raises:
        DataError: for a truncated or damaged gzip stream or an inconsistent IDX file.
    """
    path = Path(path)
    raw = _gunzip(path)
    if len(raw) < 4:
        raise DataError(f"{path}: {len(raw)} bytes is too short to be an IDX file")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise DataError(f"{path} has IDX magic number {magic}, expected {expected_magic} "
                        f"({'images' if expected_magic == _IDX_IMAGES else 'labels'}): it is not "
                        "the right IDX file (images and labels swapped?); replace it with the "
                        "official file.")
    if magic >> 8 != 0x08:
        raise DataError(f"{path}: IDX data type {magic >> 8:#04x} is not unsigned byte (0x08)")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: IDX header truncated ({len(raw)} bytes, needs {header})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if min(shape, default=0) < 1:
        raise DataError(f"{path}: invalid IDX dimensions {shape}")
    count = math.prod(shape)
    if len(raw) - header != count:
        raise DataError(f"{path} holds {len(raw) - header} data bytes but its header says "
                        f"{shape} = {count}: the file is truncated or corrupt; replace it.")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _read_idx_pair(images_path: str | os.PathLike[str], labels_path: str | os.PathLike[str],
                   num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """`(x, y)`: images flattened to float32 in [0, 1], int64 labels, consistency checked."""
    images = read_idx(images_path, _IDX_IMAGES)
    labels = read_idx(labels_path, _IDX_LABELS)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
                        f"{labels.shape[0]} labels: the two files do not belong together.")
    if int(labels.max()) >= num_classes:
        raise DataError(f"{labels_path}: label {int(labels.max())} outside 0..{num_classes - 1}")
    with warnings.catch_warnings():  # read-only buffers; both are copied by the conversions
        warnings.simplefilter("ignore", UserWarning)
        x = torch.from_numpy(images.reshape(images.shape[0], -1)).to(torch.float32).div_(255.0)
        y = torch.from_numpy(labels).to(torch.int64)
    return x, y


def _load_idx_set(name: str, folder: str, root: str | os.PathLike[str] | None,
                  download: bool) -> ClassificationData:
    files = {split: [_fetch(folder, f"{prefix}-{kind}-ubyte.gz", root, download)
                     for kind in ("images-idx3", "labels-idx1")]
             for split, prefix in _IDX_SPLITS.items()}  # every file verified before parsing
    x_train, y_train = _read_idx_pair(*files["train"])
    x_test, y_test = _read_idx_pair(*files["test"])
    if x_train.shape[1] != 28 * 28 or x_test.shape[1] != 28 * 28:
        raise DataError(f"{folder}: expected 28x28 images, got {x_train.shape[1]} and "
                        f"{x_test.shape[1]} pixels per image")
    return ClassificationData(name, x_train, y_train, x_test, y_test, 10, (1, 28, 28))


# ----------------------------------------------------------------------------- loaders


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> ClassificationData:
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes); nothing downloaded.

    Pixels (0..16) are divided by 16 into `[0, 1]`. The train/test split is stratified by
    class and deterministic in `seed` (`test_fraction=0.2`: 1,437 / 360 images).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    try:
        from sklearn.datasets import load_digits as sklearn_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise DataError("load_digits needs scikit-learn: pip install scikit-learn") from error
    bunch = sklearn_digits()
    x = (np.asarray(bunch.data, dtype=np.float64) / 16.0).astype(np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y)
    t = [torch.from_numpy(np.ascontiguousarray(a)) for a in (x_train, y_train, x_test, y_test)]
    return ClassificationData("digits", *t, num_classes=10, image_shape=(1, 8, 8))


def load_mnist(root: str | os.PathLike[str] | None = None,
               download: bool = True) -> ClassificationData:
    """MNIST handwritten digits: 60,000 training and 10,000 test images, 28x28, 10 classes.

    Read from `<root>/mnist/` (the official gzip IDX files; see
    [`data_root`][toreq.data.data_root]), and downloaded there first when absent and
    `download=True`. Pixels are divided by 255.

    Raises:
        DataError: a file is missing (`download=False`), cannot be downloaded, fails its
            sha256 check or cannot be parsed.
    """
    return _load_idx_set("mnist", "mnist", root, download)


def load_fashion_mnist(root: str | os.PathLike[str] | None = None,
                       download: bool = True) -> ClassificationData:
    """Fashion-MNIST (Zalando articles): 60,000 / 10,000 images, 28x28, 10 classes.

    Read from `<root>/fashion-mnist/` like [`load_mnist`][toreq.data.load_mnist].

    Raises:
        DataError: as [`load_mnist`][toreq.data.load_mnist].
    """
    return _load_idx_set("fashion_mnist", "fashion-mnist", root, download)


_CLASSIFICATION = ("digits", "mnist", "fashion_mnist")
# Data sets that other modules add by name (toreq.control registers its behaviour-cloning sets
# when the package is imported): this module imports none of them.
_REGISTERED: dict[str, Any] = {}


def register_classification(name: str, loader: Any) -> None:
    """Makes `load_classification(name, root, **kwargs)` call `loader(name, root, **kwargs)`."""
    _REGISTERED[name] = loader


def load_classification(name: str, root: str | os.PathLike[str] | None = None,
                        download: bool = True, **kwargs: Any) -> ClassificationData:
    """A classification data set by name: `"digits"`, `"mnist"`, `"fashion_mnist"`, or
    the behaviour-cloning sets `"cartpole"` and `"acrobot"`
    ([`load_control`][toreq.control.load_control]: generated in Gymnasium and cached under the
    data root; the `control` extra).

    `"fashion-mnist"` is accepted too. `root` and `download` do not apply to the
    embedded digits, `download` not to the control sets; `kwargs` go to the loader (e.g.
    `seed=` for the digits and the control sets).

    Raises:
        ValueError: for an unknown name (the message lists the valid ones).
        ImportError: a control set without Gymnasium installed.
    """
    key = name.strip().lower().replace("-", "_")
    if key == "digits":
        return load_digits(**kwargs)
    if key == "mnist":
        return load_mnist(root, download, **kwargs)
    if key == "fashion_mnist":
        return load_fashion_mnist(root, download, **kwargs)
    if key in _REGISTERED:
        return _REGISTERED[key](key, root, **kwargs)
    raise ValueError(f"unknown data set {name!r}; choose one of "
                     f"{', '.join((*_CLASSIFICATION, *_REGISTERED))}")


def load_tiny_shakespeare(root: str | os.PathLike[str] | None = None, download: bool = True,
                          val_fraction: float = 0.1) -> CharCorpus:
    """Tiny Shakespeare (1,115,394 characters, 65 distinct) as a character corpus.

    Read from `<root>/tinyshakespeare/input.txt` (see [`data_root`][toreq.data.data_root]), and
    downloaded there first when absent and `download=True`. The first `1 - val_fraction` of the text
    is `train`, the rest `val`.

    Raises:
        DataError: the file is missing, cannot be downloaded or fails its sha256 check.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    path = _fetch("tinyshakespeare", "input.txt", root, download)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read {path}: {error}") from error
    return CharCorpus.from_text(text, val_fraction)
