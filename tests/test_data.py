"""toreq.data: real data from the local copies, checksums, downloads and clear errors."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import pytest
import torch

from toreq import data
from toreq.data import DataError

SHARED = Path(os.environ.get("TOREQ_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")


def need(folder: str) -> Path:
    if not (SHARED / folder).is_dir():
        pytest.skip(f"no local copy of {folder} in {SHARED} (set TOREQ_DATA to one)")
    return SHARED


def test_digits_split():
    d = data.load_digits()
    assert d.x_train.shape == (1437, 64) and d.x_test.shape == (360, 64)
    assert d.x_train.dtype == torch.float32 and 0 <= float(d.x_train.min()) and float(d.x_train.max()) <= 1
    assert set(d.y_train.tolist()) == set(range(10)) == set(d.y_test.tolist())
    assert torch.equal(d.x_test, data.load_digits().x_test)
    assert not torch.equal(d.x_test, data.load_digits(seed=1).x_test)


@pytest.mark.parametrize("loader,folder", [(data.load_mnist, "mnist"),
                                           (data.load_fashion_mnist, "fashion-mnist")])
def test_idx_sets_from_local_copy(loader, folder):
    d = loader(need(folder), download=False)
    assert d.x_train.shape == (60000, 784) and d.x_test.shape == (10000, 784)
    assert d.image_shape == (1, 28, 28) and d.num_classes == 10
    assert int(d.y_train.min()) == 0 and int(d.y_train.max()) == 9
    assert 0.0 <= float(d.x_test.min()) and float(d.x_test.max()) == 1.0
    if folder == "mnist":
        assert d.y_train[:5].tolist() == [5, 0, 4, 1, 9]


def test_tiny_shakespeare():
    corpus = data.load_tiny_shakespeare(need("tinyshakespeare"), download=False)
    assert corpus.vocab_size == 65 and len(corpus.train) + len(corpus.val) == 1115394
    assert corpus.decode(corpus.encode("ROMEO: hi")) == "ROMEO: hi"
    assert corpus.decode(corpus.train[:9]) == corpus.text[:9]
    with pytest.raises(ValueError, match="not in the vocabulary"):
        corpus.encode("€")


def test_environment_variable_is_the_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("TOREQ_DATA", str(tmp_path))
    assert data.data_root() == tmp_path
    assert data.data_root("/elsewhere") == Path("/elsewhere")


def test_missing_file_says_where_it_looked(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path}/mnist/train-images-idx3-ubyte.gz does not exist.*TOREQ_DATA"):
        data.load_mnist(tmp_path, download=False)


def test_corrupt_file_fails_its_checksum(tmp_path):
    source = need("mnist") / "mnist" / "t10k-labels-idx1-ubyte.gz"
    (tmp_path / "mnist").mkdir()
    for name in data.SHA256["mnist"]:
        shutil.copy(SHARED / "mnist" / name, tmp_path / "mnist" / name)
    raw = bytearray(source.read_bytes())
    raw[100] ^= 0xFF
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="fails its sha256 check"):
        data.load_mnist(tmp_path, download=False)


def test_idx_reader_rejects_truncated_and_wrong_files(tmp_path):
    labels = gzip.decompress((need("mnist") / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes())
    truncated = tmp_path / "truncated.gz"
    truncated.write_bytes(gzip.compress(labels)[:-20])
    with pytest.raises(DataError, match="truncated or corrupt"):
        data.read_idx(truncated, 2049)
    short = tmp_path / "short.gz"
    short.write_bytes(gzip.compress(labels[:-10]))
    with pytest.raises(DataError, match="header says"):
        data.read_idx(short, 2049)
    with pytest.raises(DataError, match="magic number 2049, expected 2051"):
        data.read_idx(short, 2051)


def test_download_verifies_and_lands_atomically(tmp_path, monkeypatch):
    source = need("tinyshakespeare") / "tinyshakespeare"
    monkeypatch.setitem(data.MIRRORS, "tinyshakespeare", [source.as_uri() + "/"])
    corpus = data.load_tiny_shakespeare(tmp_path / "fresh")
    assert corpus.vocab_size == 65
    assert (tmp_path / "fresh" / "tinyshakespeare" / "input.txt").exists()

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "input.txt").write_text("not shakespeare")
    monkeypatch.setitem(data.MIRRORS, "tinyshakespeare", [bad.as_uri() + "/"])
    with pytest.raises(DataError, match="wrong sha256"):
        data.load_tiny_shakespeare(tmp_path / "other")
    assert list((tmp_path / "other" / "tinyshakespeare").iterdir()) == []
