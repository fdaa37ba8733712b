"""Data sets: scikit-learn digits (embedded), MNIST, Fashion-MNIST, CIFAR-10, CIFAR-100 and Tiny
Shakespeare.

The behaviour-cloning sets of [`toreq.control`][toreq.control] (CartPole, Acrobot) load
through [`load_classification`][toreq.data.load_classification] too.

The digits ship inside scikit-learn. The other data sets are read from a data root, a folder
with the layout:

    <root>/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
    <root>/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
    <root>/cifar-10/cifar-10-python.tar.gz
    <root>/cifar-100/cifar-100-python.tar.gz
    <root>/tinyshakespeare/input.txt

The root is, in order: the `root=` argument, the `TOREQ_DATA` environment variable, or
`~/.cache/toreq` (see [`data_root`][toreq.data.data_root]). Every file is checked against its
SHA-256 digest ([`SHA256`][toreq.data.SHA256]) before it is parsed; a missing file is downloaded
from its public source ([`MIRRORS`][toreq.data.MIRRORS]) when `download=True`, into a temporary file
beside it that is verified and then atomically renamed, so a partial or wrong download never sits
under the final name. Every problem with the data raises [`DataError`][toreq.data.DataError], whose
message says where toreq looked, what it expected and what to do.

The CIFAR archives (the official "python version") are read without extracting them. Their
batches are Python pickles, and unpickling runs whatever code a pickle names: they are
unpickled by an unpickler that refuses every global except the three numpy needs to rebuild an
array (`numpy.core.multiarray._reconstruct`, `numpy.ndarray`, `numpy.dtype`), so a file that
passes its checksum but was crafted to run code still cannot. Training-time augmentation (random
crops and flips) is [`RandomCropFlip`][toreq.data.RandomCropFlip], applied per batch by
[`fit`][toreq.train.fit]`(augment=...)`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import math
import os
import pickle
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from toreq.validation import check_choice, check_nonnegative_int

__all__ = [
    "MIRRORS",
    "SHA256",
    "CharCorpus",
    "ClassificationData",
    "DataError",
    "RandomCropFlip",
    "classification_names",
    "data_root",
    "load_cifar10",
    "load_cifar100",
    "load_classification",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
    "load_tiny_shakespeare",
    "read_idx",
    "register_classification",
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
    "cifar-10": {
        "cifar-10-python.tar.gz":
            "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
    },
    "cifar-100": {
        "cifar-100-python.tar.gz":
            "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
    },
    "tinyshakespeare": {
        "input.txt":
            "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    },
}
"""SHA-256 of every data file (the official files), per data set folder and file name.

The CIFAR site publishes MD5s only (`c58f30108f718f92721af3b95e74349a` for CIFAR-10,
`eb9058c3a382ffc7106e4002c42a8d85` for CIFAR-100); the SHA-256s here are the ones other loaders
of the same archives pin (Keras's `cifar10`/`cifar100`, torchvision's), so that every file is
checked with the same, collision-resistant hash. They were not measured on the real archives
here (those were not on the machine this loader was written on)."""

MIRRORS: dict[str, list[str]] = {
    "mnist": [
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ],
    "fashion-mnist": [
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    ],
    "cifar-10": ["https://www.cs.toronto.edu/~kriz/"],
    "cifar-100": ["https://www.cs.toronto.edu/~kriz/"],
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
        name: the data set (`"digits"`, `"mnist"`, `"fashion_mnist"`, `"cifar10"`,
            `"cifar100"`, `"cartpole"`, `"acrobot"`).
        x_train: `float32` inputs of shape `(N, D)`, `D = C * H * W`, each image
            flattened in `(C, H, W)` order, values in `[0, 1]` (CIFAR with `normalize=True`:
            standardised per channel; the control sets: scaled states, `image_shape`
            `(1, 1, D)`).
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


# ----------------------------------------------------------------------------- CIFAR

_CIFAR_SHAPE = (3, 32, 32)
_CIFAR_PIXELS = math.prod(_CIFAR_SHAPE)
# The only globals a pickled numpy array names (numpy 1 writes numpy.core, numpy 2 numpy._core).
# _reconstruct is taken from an array's own __reduce__, so no numpy-private module is imported.
_ARRAY_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): np.empty(0).__reduce__()[0],
    ("numpy._core.multiarray", "_reconstruct"): np.empty(0).__reduce__()[0],
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, numbers, bytes and numpy arrays; refuses every other global (a
    pickle that names a function can make the unpickler call it)."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ARRAY_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it names the global {module}.{name}") from None


def _unpickle_batch(path: Path, member: str, raw: bytes) -> Any:
    try:
        return _ArrayOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as error:  # damaged pickles fail in many ways (EOFError, KeyError, ...)
        raise DataError(
            f"{path}: {member} is not a CIFAR batch pickle ({type(error).__name__}: {error}); a "
            "batch holds only a dict of bytes, lists, ints and numpy arrays, and no other global "
            "is unpickled. The archive is not the official one: replace it.") from error


def _read_cifar_archive(path: Path, members: tuple[str, ...]) -> dict[str, Any]:
    """The unpickled `members` (names inside the archive) of a CIFAR tar.gz, read in one pass
    without extracting anything to disk."""
    batches: dict[str, Any] = {}
    try:
        with tarfile.open(path, "r:gz") as archive:
            for info in archive:
                if info.name in members and info.isfile():
                    raw = archive.extractfile(info).read()  # type: ignore[union-attr]
                    batches[info.name] = _unpickle_batch(path, info.name, raw)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path} is not a readable tar.gz archive ({type(error).__name__}: "
                        f"{error}): it is truncated or corrupt; delete it and download it "
                        "again.") from error
    missing = [m for m in members if m not in batches]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}: the official archive holds "
                        f"{', '.join(members)}; replace it with the official file.")
    return batches


def _cifar_batch(path: Path, member: str, batch: Any, label_key: bytes,
                 num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """`(images, labels)` of one unpickled batch: `uint8 (N, 3072)` and `int64 (N,)`, checked."""
    where = f"{path}: {member}"
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = list(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{where} holds {keys}, expected a dict with the keys b'data' and "
                        f"{label_key!r}")
    images = batch[b"data"]
    if (not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2
            or images.shape[0] < 1 or images.shape[1] != _CIFAR_PIXELS):
        got = (f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray)
               else type(images).__name__)
        raise DataError(f"{where}: b'data' is {got}, expected a uint8 array of shape "
                        f"(N, {_CIFAR_PIXELS}) (N >= 1 images of 3x32x32, channel-major)")
    try:
        labels = np.asarray(batch[label_key])
    except ValueError as error:  # ragged nested lists
        raise DataError(f"{where}: {label_key!r} is not a list of ints ({error})") from error
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or labels.shape[0] != images.shape[0]:
        raise DataError(f"{where}: {label_key!r} holds {labels.dtype} {labels.shape}, expected "
                        f"{images.shape[0]} integer labels, one per image")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise DataError(f"{where}: {label_key!r} has labels in {int(labels.min())}.."
                        f"{int(labels.max())}, outside 0..{num_classes - 1}")
    return images, labels.astype(np.int64)


def _load_cifar(name: str, folder: str, splits: dict[str, tuple[str, ...]], label_key: bytes,
                num_classes: int, root: str | os.PathLike[str] | None, download: bool,
                normalize: bool) -> ClassificationData:
    check_choice("normalize", normalize, (True, False))
    path = _fetch(folder, f"{folder}-python.tar.gz", root, download)  # verified before parsing
    batches = _read_cifar_archive(path, splits["train"] + splits["test"])
    images, labels = {}, {}
    for split, members in splits.items():
        parts = [_cifar_batch(path, m, batches[m], label_key, num_classes) for m in members]
        images[split] = np.concatenate([p[0] for p in parts])
        labels[split] = np.concatenate([p[1] for p in parts])
    x = {split: torch.from_numpy(a).to(torch.float32).div_(255.0) for split, a in images.items()}
    if normalize:
        mean, std = _channel_stats(images["train"], path)
        for t in x.values():  # both splits by the training statistics
            t.view(t.shape[0], 3, -1).sub_(mean[:, None]).div_(std[:, None])
    return ClassificationData(name, x["train"], torch.from_numpy(labels["train"]), x["test"],
                              torch.from_numpy(labels["test"]), num_classes, _CIFAR_SHAPE)


def _channel_stats(images: np.ndarray, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) standard deviation of `uint8 (N, 3 * H * W)` images
    in units of 1/255, exact: from each channel's histogram of the 256 byte values."""
    values = np.arange(256, dtype=np.float64) / 255.0
    channels = images.reshape(images.shape[0], 3, -1)
    mean, std = np.empty(3), np.empty(3)
    for c in range(3):
        counts = np.bincount(channels[:, c].ravel(), minlength=256)
        mean[c] = counts @ values / counts.sum()
        std[c] = math.sqrt(counts @ (values - mean[c]) ** 2 / counts.sum())
    if not std.all():
        raise DataError(f"{path}: a channel of the training images is constant (std {std}), so "
                        "it cannot be standardised (normalize=True)")
    return torch.from_numpy(mean).float(), torch.from_numpy(std).float()


# ----------------------------------------------------------------------------- augmentation


@dataclass(frozen=True)
class RandomCropFlip:
    """The standard CIFAR training augmentation, on a batch of flattened images.

    Each image is padded with `padding` zeros on every side and cropped back to its `H x W` at
    a uniformly random offset, then, with `flip=True`, mirrored left to right with probability
    1/2. The zeros are those of the input: black for pixels in `[0, 1]`, the channel mean for
    standardised images (`normalize=True`).

    `augment(x, generator)` takes `x` of shape `(N, C * H * W)`, flattened in `(C, H, W)` order
    as in [`ClassificationData`][toreq.data.ClassificationData], and returns a new tensor of the
    same shape, dtype and device. The draws come from `generator` (the global generator when
    `None`), on the CPU whatever the device: per image a row offset, then per image a column
    offset (each in `0 .. 2 * padding`), then per image whether it is mirrored. Augment the
    training batches only: pass it to [`fit`][toreq.train.fit]`(augment=...)`, which never
    augments the evaluation.

    Attributes:
        image_shape: `(C, H, W)` of the images (the data's `image_shape`).
        padding: zeros added on each side before cropping (4 for CIFAR's 32x32).
        flip: also mirror half of the images at random.

    Raises:
        ValueError: on construction for a bad `image_shape` or `padding`; on a call for an `x`
            that is not a `(N, C * H * W)` batch.
    """

    image_shape: tuple[int, int, int]
    padding: int = 4
    flip: bool = True

    def __post_init__(self) -> None:
        shape = tuple(self.image_shape)
        if len(shape) != 3 or not all(isinstance(s, int) and s >= 1 for s in shape):
            raise ValueError(f"image_shape must be (C, H, W) of positive ints, got "
                             f"{self.image_shape!r}")
        object.__setattr__(self, "image_shape", shape)
        check_nonnegative_int("padding", self.padding)
        check_choice("flip", self.flip, (True, False))

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        c, h, w = self.image_shape
        if x.dim() != 2 or x.shape[1] != c * h * w:
            raise ValueError(f"x must be a (N, {c * h * w}) batch of images {self.image_shape} "
                             f"flattened, got shape {tuple(x.shape)}")
        n, pad = x.shape[0], self.padding
        top = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        left = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        mirrored = (torch.rand(n, generator=generator) < 0.5 if self.flip
                    else torch.zeros(n, dtype=torch.bool))
        steps = torch.arange(w)
        rows = top[:, None] + torch.arange(h)  # (n, h): rows of the padded image to keep
        cols = left[:, None] + torch.where(mirrored[:, None], w - 1 - steps, steps)  # (n, w)
        padded = F.pad(x.reshape(n, c, h, w), (pad, pad, pad, pad))
        images = torch.arange(n, device=x.device)[:, None, None, None]
        planes = torch.arange(c, device=x.device)[None, :, None, None]
        out = padded[images, planes, rows.to(x.device)[:, None, :, None],
                     cols.to(x.device)[:, None, None, :]]
        return out.reshape(n, c * h * w)


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


def load_cifar10(root: str | os.PathLike[str] | None = None, download: bool = True,
                 normalize: bool = False) -> ClassificationData:
    """CIFAR-10: 50,000 training and 10,000 test colour images, 32x32, 10 classes.

    Read from `<root>/cifar-10/cifar-10-python.tar.gz` (the official "python version"; see
    [`data_root`][toreq.data.data_root]), downloaded there first when absent and
    `download=True`, and parsed without extracting it: its batches `data_batch_1` ..
    `data_batch_5` are the training split, `test_batch` the test split. Each image is the
    batch's 3,072 bytes in channel-major order (red, green, blue planes of 32x32), so `x`
    holds them flattened in `(C, H, W)` order, divided by 255, and `image_shape` is
    `(3, 32, 32)`. The batches are unpickled with every global refused but numpy's array
    globals (see the module's introduction).

    `normalize=True` standardises each channel, in both splits, by the mean and standard
    deviation (population) of that channel over all the training pixels, computed exactly from
    the training images when loading rather than hard-coded (on the official training set the
    values usually quoted are mean `(0.4914, 0.4822, 0.4465)` and std `(0.2470, 0.2435,
    0.2616)`; not checked here, the real archive was not on the machine this loader was written
    on). For the standard training augmentation see
    [`RandomCropFlip`][toreq.data.RandomCropFlip].

    Raises:
        DataError: the archive is missing (`download=False`), cannot be downloaded, fails its
            sha256 check, or holds anything but the official batches (a damaged archive or
            pickle, a pickle naming another global, wrong shapes, labels outside 0..9).
    """
    splits = {"train": tuple(f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)),
              "test": ("cifar-10-batches-py/test_batch",)}
    return _load_cifar("cifar10", "cifar-10", splits, b"labels", 10, root, download, normalize)


def load_cifar100(root: str | os.PathLike[str] | None = None, download: bool = True,
                  label_type: str = "fine", normalize: bool = False) -> ClassificationData:
    """CIFAR-100: 50,000 / 10,000 colour images, 32x32, 100 classes in 20 superclasses.

    Read from `<root>/cifar-100/cifar-100-python.tar.gz` like
    [`load_cifar10`][toreq.data.load_cifar10] (its batches `train` and `test`).
    `label_type="fine"` labels the 100 classes (`fine_labels`), `"coarse"` the 20 superclasses
    (`coarse_labels`). `normalize` as for CIFAR-10, with this set's own training statistics.

    Raises:
        ValueError: `label_type` is neither `"fine"` nor `"coarse"`.
        DataError: as [`load_cifar10`][toreq.data.load_cifar10] (labels outside 0..99, resp.
            0..19).
    """
    check_choice("label_type", label_type, ("fine", "coarse"))
    splits = {"train": ("cifar-100-python/train",), "test": ("cifar-100-python/test",)}
    label_key, num_classes = ((b"fine_labels", 100) if label_type == "fine"
                              else (b"coarse_labels", 20))
    return _load_cifar("cifar100", "cifar-100", splits, label_key, num_classes, root, download,
                       normalize)


_CLASSIFICATION = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100")
# Data sets that other modules add by name (toreq.control registers its behaviour-cloning sets
# when the package is imported): this module imports none of them.
_REGISTERED: dict[str, Any] = {}


def register_classification(name: str, loader: Any) -> None:
    """Makes `load_classification(name, root, **kwargs)` call `loader(name, root, **kwargs)`."""
    _REGISTERED[name] = loader


def classification_names() -> tuple[str, ...]:
    """The names [`load_classification`][toreq.data.load_classification] accepts: the data sets
    of this module, then those registered (`toreq train --dataset` offers these)."""
    return (*_CLASSIFICATION, *_REGISTERED)


def load_classification(name: str, root: str | os.PathLike[str] | None = None,
                        download: bool = True, **kwargs: Any) -> ClassificationData:
    """A classification data set by name: `"digits"`, `"mnist"`, `"fashion_mnist"`,
    `"cifar10"`, `"cifar100"`, or the behaviour-cloning sets `"cartpole"` and `"acrobot"`
    ([`load_control`][toreq.control.load_control]: generated in Gymnasium and cached under the
    data root; the `control` extra).

    `"fashion-mnist"` is accepted too. `root` and `download` do not apply to the
    embedded digits, `download` not to the control sets; `kwargs` go to the loader (e.g.
    `seed=` for the digits and the control sets, `normalize=` for CIFAR, `label_type=` for
    CIFAR-100).

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
    if key == "cifar10":
        return load_cifar10(root, download, **kwargs)
    if key == "cifar100":
        return load_cifar100(root, download, **kwargs)
    if key in _REGISTERED:
        return _REGISTERED[key](key, root, **kwargs)
    raise ValueError(f"unknown data set {name!r}; choose one of "
                     f"{', '.join(classification_names())}")


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
