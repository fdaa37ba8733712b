"""Data sets: scikit-learn digits (embedded), MNIST, Fashion-MNIST and Tiny Shakespeare.

The downloadable sets are looked for under a root folder: the ``root`` argument, else the
``TOREQ_DATA`` environment variable, else ``~/.cache/toreq``, with the layout
``<root>/mnist/*.gz``, ``<root>/fashion-mnist/*.gz``, ``<root>/tinyshakespeare/input.txt``.
Every file is checked against its SHA-256 digest before use; a missing file is downloaded
from its public source when ``download=True`` (into a temporary name, verified, then renamed,
so a partial download never sits under the real name).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CharCorpus", "ClassificationData", "DataError", "data_root", "load_classification",
    "load_digits", "load_fashion_mnist", "load_mnist", "load_tiny_shakespeare",
]


class DataError(RuntimeError):
    """A data file is missing, corrupt or unreadable; the message says where and what to do."""


# folder -> file -> sha256, and the public mirrors tried in order (tests may replace them).
SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
    "tinyshakespeare": {
        "input.txt": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    },
}
MIRRORS = {
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
    "fashion-mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
    "tinyshakespeare": ["https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/"],
}
_verified: dict[tuple[str, int, float], bool] = {}


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The folder data sets are read from: ``root``, else ``$TOREQ_DATA``, else ``~/.cache/toreq``."""
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get("TOREQ_DATA"):
        return Path(os.environ["TOREQ_DATA"]).expanduser()
    return Path.home() / ".cache" / "toreq"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify(path: Path, expected: str) -> None:
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime)
    if _verified.get(key):
        return
    actual = _sha256(path)
    if actual != expected:
        raise DataError(
            f"{path} fails its sha256 check (expected {expected}, got {actual}): the file is "
            "corrupt or a different version. Delete it and load again to re-download it, or "
            "replace it with the official file."
        )
    _verified[key] = True


def _download(folder: str, name: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for mirror in MIRRORS[folder]:
        url = mirror + name
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
            actual = _sha256(Path(tmp))
            if actual != SHA256[folder][name]:
                errors.append(f"{url}: wrong sha256 {actual}")
                continue
            os.replace(tmp, target)
            return
        except OSError as error:
            errors.append(f"{url}: {error}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise DataError(f"could not download {name}: " + "; ".join(errors))


def _file(folder: str, name: str, root: str | os.PathLike | None, download: bool) -> Path:
    path = data_root(root) / folder / name
    if not path.exists():
        advice = (f"Put the official file there (pass root= or set TOREQ_DATA to a folder "
                  f"holding {folder}/{name})")
        if not download:
            raise DataError(f"{path} does not exist and download=False. {advice}.")
        try:
            _download(folder, name, path)
        except DataError as error:
            raise DataError(f"{path} does not exist and {error}. {advice}, or go online.") from error
    _verify(path, SHA256[folder][name])
    return path


def read_idx(path: str | os.PathLike, expected_magic: int) -> np.ndarray:
    """Reads a gzip-compressed IDX file (2049: labels, 2051: images) into a uint8 array."""
    path = Path(path)
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path} is not a readable gzip file ({error}): it is truncated or "
                        "corrupt; delete it and load again") from error
    if len(raw) < 8:
        raise DataError(f"{path} is too short to be an IDX file")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise DataError(f"{path} has IDX magic number {magic}, expected {expected_magic}")
    dims = magic & 0xFF
    header = 4 + 4 * dims
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    if len(raw) != header + int(np.prod(shape)):
        raise DataError(f"{path} holds {len(raw) - header} data bytes but its header says "
                        f"{shape} = {int(np.prod(shape))}: the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


@dataclass(frozen=True)
class ClassificationData:
    """Flattened images in [0, 1] (float32) with int64 labels, split into train and test."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    image_shape: tuple[int, int, int]

    @property
    def input_dim(self) -> int:
        return self.x_train.shape[1]


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> ClassificationData:
    """scikit-learn's 8x8 digits (1,797 images, embedded), stratified split fixed by ``seed``."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    x = bunch.data.astype(np.float32) / 16.0
    x_train, x_test, y_train, y_test = train_test_split(
        x, bunch.target, test_size=test_fraction, random_state=seed, stratify=bunch.target)
    return ClassificationData("digits", torch.from_numpy(x_train), torch.from_numpy(y_train).long(),
                              torch.from_numpy(x_test), torch.from_numpy(y_test).long(), 10, (1, 8, 8))


def _load_idx_set(name: str, folder: str, root, download: bool) -> ClassificationData:
    def images(split):
        array = read_idx(_file(folder, f"{split}-images-idx3-ubyte.gz", root, download), 2051)
        return torch.from_numpy(array.reshape(array.shape[0], -1).astype(np.float32) / 255.0)

    def labels(split):
        array = read_idx(_file(folder, f"{split}-labels-idx1-ubyte.gz", root, download), 2049)
        return torch.from_numpy(array.astype(np.int64))

    x_train, y_train, x_test, y_test = images("train"), labels("train"), images("t10k"), labels("t10k")
    for x, y, split in ((x_train, y_train, "train"), (x_test, y_test, "t10k")):
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{name} {split}: {x.shape[0]} images but {y.shape[0]} labels")
    return ClassificationData(name, x_train, y_train, x_test, y_test, 10, (1, 28, 28))


def load_mnist(root: str | os.PathLike | None = None, download: bool = True) -> ClassificationData:
    """MNIST (60,000 training and 10,000 test images, 28x28)."""
    return _load_idx_set("mnist", "mnist", root, download)


def load_fashion_mnist(root: str | os.PathLike | None = None,
                       download: bool = True) -> ClassificationData:
    """Fashion-MNIST (60,000 training and 10,000 test images, 28x28)."""
    return _load_idx_set("fashion_mnist", "fashion-mnist", root, download)


def load_classification(name: str, root: str | os.PathLike | None = None,
                        download: bool = True) -> ClassificationData:
    """A classification set by name: ``digits``, ``mnist`` or ``fashion_mnist``."""
    key = name.replace("-", "_")
    if key == "digits":
        return load_digits()
    if key == "mnist":
        return load_mnist(root, download)
    if key == "fashion_mnist":
        return load_fashion_mnist(root, download)
    raise ValueError(f"unknown data set {name!r}; choose digits, mnist or fashion_mnist")


@dataclass(frozen=True)
class CharCorpus:
    """A character-level corpus: the text, its sorted vocabulary and train/validation ids."""

    text: str
    vocab: str
    train: Tensor
    val: Tensor

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, s: str) -> Tensor:
        index = {c: i for i, c in enumerate(self.vocab)}
        unknown = sorted(set(s) - set(index))
        if unknown:
            raise ValueError(f"characters not in the vocabulary: {unknown!r}")
        return torch.tensor([index[c] for c in s], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.vocab[int(i)] for i in ids)


def load_tiny_shakespeare(root: str | os.PathLike | None = None, download: bool = True,
                          val_fraction: float = 0.1) -> CharCorpus:
    """Tiny Shakespeare at character level; the last ``val_fraction`` of the text is held out."""
    text = _file("tinyshakespeare", "input.txt", root, download).read_text(encoding="utf-8")
    vocab = "".join(sorted(set(text)))
    lookup = np.zeros(max(map(ord, vocab)) + 1, dtype=np.int64)
    lookup[[ord(c) for c in vocab]] = np.arange(len(vocab))
    ids = torch.from_numpy(lookup[np.frombuffer(text.encode("ascii"), dtype=np.uint8)])
    split = int(len(ids) * (1 - val_fraction))
    return CharCorpus(text, vocab, ids[:split], ids[split:])
