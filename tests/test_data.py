"""toreq.data: real data from the local copies, checksums, downloads and clear errors."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from toreq import data
from toreq.data import CharCorpus, ClassificationData, DataError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shared() -> Path:
    """The folder with local copies of the data sets: $TOREQ_DATA, else <repo>/../shared/data."""
    return Path(os.environ.get("TOREQ_DATA") or REPO.parent / "shared" / "data")


def need(shared: Path, folder: str) -> Path:
    if not (shared / folder).is_dir():
        pytest.skip(f"no local copy of {folder}/ in {shared} (set TOREQ_DATA to a folder with it)")
    return shared


@pytest.fixture(scope="module")
def digits() -> ClassificationData:
    return data.load_digits()


@pytest.fixture(scope="module")
def mnist(shared) -> ClassificationData:
    return data.load_mnist(need(shared, "mnist"), download=False)


@pytest.fixture(scope="module")
def fashion(shared) -> ClassificationData:
    return data.load_fashion_mnist(need(shared, "fashion-mnist"), download=False)


@pytest.fixture(scope="module")
def shakespeare(shared) -> CharCorpus:
    return data.load_tiny_shakespeare(need(shared, "tinyshakespeare"), download=False)


def _write_idx(path: Path, magic: int, shape: tuple[int, ...], payload: bytes) -> Path:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in shape)
    path.write_bytes(gzip.compress(header + payload))
    return path


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ----------------------------------------------------------------------------- digits


def test_digits_split(digits):
    assert digits.name == "digits" and digits.num_classes == 10 and digits.image_shape == (1, 8, 8)
    assert digits.x_train.shape == (1437, 64) and digits.x_test.shape == (360, 64)
    assert digits.input_dim == 64
    assert digits.x_train.dtype == digits.x_test.dtype == torch.float32
    assert digits.y_train.dtype == digits.y_test.dtype == torch.int64
    both = torch.cat([digits.x_train, digits.x_test])
    assert float(both.min()) == 0.0 and float(both.max()) == 1.0
    assert torch.equal(both * 16, (both * 16).round())  # pixels 0..16 divided by 16
    train_counts = torch.bincount(digits.y_train, minlength=10)
    test_counts = torch.bincount(digits.y_test, minlength=10)
    assert (train_counts > 0).all() and (test_counts > 0).all()
    # stratified: each class is split 80/20 to within one sample
    total = train_counts + test_counts
    assert int(total.sum()) == 1797
    assert ((test_counts.double() - 0.2 * total.double()).abs() <= 1).all()


def test_digits_split_is_deterministic_in_seed(digits):
    again = data.load_digits(seed=0)
    assert torch.equal(again.x_train, digits.x_train) and torch.equal(again.y_test, digits.y_test)
    other = data.load_digits(seed=1)
    assert other.x_test.shape == digits.x_test.shape
    assert not torch.equal(other.x_test, digits.x_test)
    half = data.load_digits(test_fraction=0.5)
    assert half.x_train.shape[0] + half.x_test.shape[0] == 1797
    assert abs(half.x_test.shape[0] - 898.5) <= 1
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="test_fraction"):
            data.load_digits(test_fraction=bad)


def test_classification_data_helpers(digits):
    batches = list(digits.to_loader("test", batch_size=100))
    assert [len(x) for x, _ in batches] == [100, 100, 100, 60]
    assert torch.equal(torch.cat([x for x, _ in batches]), digits.x_test)

    def order(seed):
        loader = digits.to_loader("train", 64, shuffle=True,
                                  generator=torch.Generator().manual_seed(seed))
        return torch.cat([y for _, y in loader])

    assert torch.equal(order(3), order(3)) and not torch.equal(order(3), order(4))
    assert sorted(order(3).tolist()) == sorted(digits.y_train.tolist())
    with pytest.raises(ValueError, match="split"):
        digits.to_loader("val", 8)
    moved = digits.to("cpu")
    assert moved is not digits and torch.equal(moved.x_train, digits.x_train)
    assert moved != digits and digits == digits  # identity comparison, no tensor truth value
    assert "(1437, 64)" in repr(digits)
    images = digits.x_train.view(-1, *digits.image_shape)
    assert images.shape == (1437, 1, 8, 8)


def test_classification_data_rejects_inconsistent_tensors():
    x, y = torch.rand(4, 4), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="image_shape"):
        ClassificationData("t", x, y, x, y, 4, (1, 3, 3))
    with pytest.raises(ValueError, match="int64"):
        ClassificationData("t", x, y.int(), x, y, 4, (1, 2, 2))
    with pytest.raises(ValueError, match="outside"):
        ClassificationData("t", x, y, x, y, 3, (1, 2, 2))


def test_load_classification_by_name(shared):
    d = data.load_classification("digits", seed=1)
    assert d.name == "digits" and torch.equal(d.x_test, data.load_digits(seed=1).x_test)
    with pytest.raises(ValueError, match="digits, mnist, fashion_mnist"):
        data.load_classification("imagenet")
    # "fashion-mnist" and "fashion_mnist" name the same loader (checked without parsing it)
    for name in ("fashion-mnist", "Fashion_MNIST"):
        with pytest.raises(DataError, match="fashion-mnist"):
            data.load_classification(name, root=shared / "nowhere", download=False)


# ----------------------------------------------------------------------------- MNIST


def test_mnist(mnist):
    assert mnist.name == "mnist" and mnist.num_classes == 10 and mnist.image_shape == (1, 28, 28)
    assert mnist.x_train.shape == (60000, 784) and mnist.x_test.shape == (10000, 784)
    assert mnist.x_train.dtype == torch.float32 and mnist.y_train.dtype == torch.int64
    assert mnist.y_train[:5].tolist() == [5, 0, 4, 1, 9]
    assert mnist.y_test[:5].tolist() == [7, 2, 1, 0, 4]
    assert torch.bincount(mnist.y_train).tolist() == [5923, 6742, 5958, 6131, 5842,
                                                      5421, 5918, 6265, 5851, 5949]
    assert float(mnist.x_train.min()) == 0.0 and float(mnist.x_train.max()) == 1.0
    assert torch.equal(mnist.x_test * 255, (mnist.x_test * 255).round())  # bytes / 255
    # the well-known normalisation constants of MNIST
    assert abs(float(mnist.x_train.mean()) - 0.1307) < 1e-4
    assert abs(float(mnist.x_train.std()) - 0.3081) < 1e-4
    assert mnist.x_train.view(-1, *mnist.image_shape)[0, 0, :4, :4].abs().sum() == 0  # corner


def test_fashion_mnist(fashion):
    assert fashion.name == "fashion_mnist" and fashion.image_shape == (1, 28, 28)
    assert fashion.x_train.shape == (60000, 784) and fashion.x_test.shape == (10000, 784)
    assert fashion.y_train[:5].tolist() == [9, 0, 0, 3, 0]
    assert torch.bincount(fashion.y_train).tolist() == [6000] * 10
    assert torch.bincount(fashion.y_test).tolist() == [1000] * 10
    assert float(fashion.x_test.min()) == 0.0 and float(fashion.x_test.max()) == 1.0
    assert abs(float(fashion.x_train.mean()) - 0.2860) < 1e-4


def test_verification_is_cached_per_file(shared, mnist, monkeypatch):
    path = shared / "mnist" / "t10k-labels-idx1-ubyte.gz"

    class NoHashing:
        @staticmethod
        def sha256():
            raise AssertionError("hashed again")

    monkeypatch.setattr(data, "hashlib", NoHashing)
    data._verify(path, "mnist", "t10k-labels-idx1-ubyte.gz")  # served from the cache


# ----------------------------------------------------------------------------- Shakespeare


def test_tiny_shakespeare(shakespeare):
    c = shakespeare
    assert c.vocab_size == 65 and list(c.vocab) == sorted(set(c.vocab))
    assert c.vocab.startswith("\n !$&',-.3:;?ABC") and c.vocab.endswith("xyz")
    assert len(c.text) == 1115394
    assert c.train.shape == (1003854,) and c.val.shape == (111540,)
    assert c.train.dtype == c.val.dtype == torch.int64
    assert c.decode(c.train[:14]) == "First Citizen:"
    assert c.decode(torch.cat([c.train, c.val])) == c.text
    assert torch.equal(c.encode(c.text[-1000:]), c.val[-1000:])
    assert c.decode(c.encode("ROMEO: hi")) == "ROMEO: hi"
    assert c.decode([0, 1]) == "\n " and c.decode(np.array([2])) == "!" and c.decode([]) == ""
    with pytest.raises(ValueError, match="not in the vocabulary.*'ü', '€'"):
        c.encode("tü€")
    with pytest.raises(ValueError, match="0..64"):
        c.decode([65])
    with pytest.raises(ValueError, match="0..64"):
        c.decode([-1])


def test_char_corpus_from_text():
    c = CharCorpus.from_text("abcabcabca", val_fraction=0.2)
    assert c.vocab == "abc" and c.val.tolist() == [2, 0]
    assert c.train.tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    with pytest.raises(ValueError, match="val_fraction"):
        CharCorpus.from_text("abc", val_fraction=1.0)


# ----------------------------------------------------------------------------- bad files


def test_corrupt_file_fails_its_checksum(shared, tmp_path):
    source = need(shared, "tinyshakespeare") / "tinyshakespeare" / "input.txt"
    (tmp_path / "tinyshakespeare").mkdir()
    copy = tmp_path / "tinyshakespeare" / "input.txt"
    shutil.copyfile(source, copy)
    assert data.load_tiny_shakespeare(tmp_path, download=False).vocab_size == 65  # caches it
    raw = bytearray(copy.read_bytes())
    raw[1000] ^= 0x01
    copy.write_bytes(bytes(raw))
    st = copy.stat()
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # surely a new mtime
    with pytest.raises(DataError, match="sha256") as info:
        data.load_tiny_shakespeare(tmp_path, download=False)
    message = str(info.value)
    assert str(copy) in message and data.SHA256["tinyshakespeare"]["input.txt"] in message
    assert "corrupt" in message and "Delete" in message


def test_corrupt_mnist_labels_fail_before_parsing(shared, tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in data.SHA256["mnist"]:
        os.symlink(need(shared, "mnist") / "mnist" / name, folder / name)
    bad = folder / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(bad.read_bytes())
    raw[-100] ^= 0xFF
    bad.unlink()
    bad.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz fails its sha256 check"):
        data.load_mnist(tmp_path, download=False)


def test_idx_reader_rejects_damaged_files(shared, tmp_path):
    source = need(shared, "mnist") / "mnist" / "t10k-labels-idx1-ubyte.gz"
    labels = gzip.decompress(source.read_bytes())
    ok = _write_idx(tmp_path / "ok.gz", 2049, (3,), b"\x01\x02\x03")
    assert data.read_idx(ok, 2049).tolist() == [1, 2, 3]
    truncated = tmp_path / "truncated.gz"
    truncated.write_bytes(gzip.compress(labels)[:-20])
    with pytest.raises(DataError, match="not a valid gzip file.*truncated or corrupt"):
        data.read_idx(truncated, 2049)
    not_gzip = tmp_path / "plain.gz"
    not_gzip.write_bytes(labels)
    with pytest.raises(DataError, match="not a valid gzip file"):
        data.read_idx(not_gzip, 2049)
    short = tmp_path / "short.gz"
    short.write_bytes(gzip.compress(labels[:-10]))
    with pytest.raises(DataError, match=r"9990 data bytes but its header says \(10000,\)"):
        data.read_idx(short, 2049)
    with pytest.raises(DataError, match="magic number 2049, expected 2051"):
        data.read_idx(short, 2051)
    with pytest.raises(DataError, match="header truncated"):
        data.read_idx(_write_idx(tmp_path / "hdr.gz", 2051, (), b"\x00\x00\x00\x01"), 2051)


def test_images_and_labels_must_match(tmp_path):
    images = _write_idx(tmp_path / "i.gz", 2051, (3, 2, 2), bytes(range(12)))
    labels = _write_idx(tmp_path / "l.gz", 2049, (2,), b"\x00\x01")
    with pytest.raises(DataError, match="3 images but .* 2 labels"):
        data._read_idx_pair(images, labels)
    labels = _write_idx(tmp_path / "l.gz", 2049, (3,), b"\x00\x01\x0a")
    with pytest.raises(DataError, match="label 10 outside 0..9"):
        data._read_idx_pair(images, labels)
    labels = _write_idx(tmp_path / "l.gz", 2049, (3,), b"\x00\x01\x09")
    x, y = data._read_idx_pair(images, labels)
    assert x.shape == (3, 4) and x.dtype == torch.float32 and y.tolist() == [0, 1, 9]
    assert torch.allclose(x[2], torch.tensor([8.0, 9.0, 10.0, 11.0]) / 255)


def test_missing_file_says_where_it_looked(tmp_path, monkeypatch):
    with pytest.raises(DataError) as info:
        data.load_mnist(tmp_path, download=False)
    message = str(info.value)
    assert str(tmp_path / "mnist" / "train-images-idx3-ubyte.gz") in message
    assert "TOREQ_DATA" in message and "root=" in message and "download=True" in message
    monkeypatch.setenv("TOREQ_DATA", str(tmp_path / "env"))
    with pytest.raises(DataError, match="environment variable") as info:
        data.load_tiny_shakespeare(download=False)
    assert str(tmp_path / "env" / "tinyshakespeare" / "input.txt") in str(info.value)
    assert not (tmp_path / "env").exists()  # nothing created without a download


# ----------------------------------------------------------------------------- downloads


def test_download_falls_back_verifies_and_lands(shared, tmp_path, monkeypatch, mnist):
    source = need(shared, "mnist") / "mnist"
    dead = (tmp_path / "no-such-mirror").as_uri() + "/"
    monkeypatch.setitem(data.MIRRORS, "mnist", [dead, source.as_uri() + "/"])
    root = tmp_path / "fresh"
    fetched = data.load_mnist(root)
    assert torch.equal(fetched.y_train, mnist.y_train) and torch.equal(fetched.x_test, mnist.x_test)
    assert _leftovers(root / "mnist") == sorted(data.SHA256["mnist"])  # no temporary files
    for name, digest in data.SHA256["mnist"].items():
        data._DIGESTS.clear()
        assert data._sha256(root / "mnist" / name) == digest


def test_download_of_wrong_bytes_keeps_nothing(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "input.txt").write_text("not shakespeare")
    monkeypatch.setitem(data.MIRRORS, "tinyshakespeare", [mirror.as_uri() + "/"])
    with pytest.raises(DataError, match="wrong sha256") as info:
        data.load_tiny_shakespeare(tmp_path / "root")
    assert (mirror / "input.txt").as_uri() in str(info.value)
    assert _leftovers(tmp_path / "root" / "tinyshakespeare") == []


def test_download_offline_explains_what_to_do(tmp_path, monkeypatch):
    urls = [(tmp_path / "a").as_uri() + "/", (tmp_path / "b").as_uri() + "/"]
    monkeypatch.setitem(data.MIRRORS, "fashion-mnist", urls)
    with pytest.raises(DataError) as info:
        data.load_fashion_mnist(tmp_path / "root")
    message = str(info.value)
    assert "could not be downloaded" in message
    assert all(u + "train-images-idx3-ubyte.gz" in message for u in urls)
    assert str(tmp_path / "root" / "fashion-mnist" / "train-images-idx3-ubyte.gz") in message
    assert "TOREQ_DATA" in message and "online" in message
    assert _leftovers(tmp_path / "root" / "fashion-mnist") == []


# ----------------------------------------------------------------------------- data root


def test_data_root_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("TOREQ_DATA", str(tmp_path))
    assert data.data_root() == tmp_path
    assert data.data_root(tmp_path / "explicit") == tmp_path / "explicit"  # root= wins
    monkeypatch.delenv("TOREQ_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.data_root() == tmp_path / "home" / ".cache" / "toreq"


def test_environment_variable_is_honoured_by_loaders(shared, monkeypatch):
    monkeypatch.setenv("TOREQ_DATA", str(need(shared, "tinyshakespeare")))
    assert data.load_tiny_shakespeare(download=False).vocab_size == 65
