"""toreq.data's CIFAR-10 and CIFAR-100 loaders and RandomCropFlip.

The real archives were not on the machine these tests were written on, so every archive here is
generated in the official format: a tar.gz holding the official member names, each a Python 2
cPickle (protocol 2) of a dict with byte-string keys, whose b'data' is a numpy uint8 array of
shape (N, 3072) pickled as numpy 1 pickles it (the global numpy.core.multiarray._reconstruct).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest
import torch

from toreq import data
from toreq.cli import main
from toreq.data import DataError, RandomCropFlip
from toreq.nn import EPMLP
from toreq.train import EqPropTrainer, evaluate, fit

CIFAR10 = "cifar-10-batches-py/"
CIFAR100 = "cifar-100-python/"


# ----------------------------------------------------------------------------- official format


def py2_pickle(obj: object) -> bytes:
    """`obj` as Python 2's cPickle.dump(obj, f, 2) writes it: bytes as str (SHORT_BINSTRING /
    BINSTRING, which `encoding='bytes'` reads back as bytes), ints as BININT, a numpy array by
    numpy 1's __reduce__ (`_reconstruct`, then its state with the dtype's)."""

    def emit(o: object) -> bytes:
        if isinstance(o, dict):
            return b"}(" + b"".join(emit(k) + emit(v) for k, v in o.items()) + b"u"
        if isinstance(o, list):
            return b"](" + b"".join(emit(v) for v in o) + b"e"
        if isinstance(o, tuple):
            return b"(" + b"".join(emit(v) for v in o) + b"t"
        if o is None:
            return b"N"
        if isinstance(o, bool):
            return b"\x88" if o else b"\x89"
        if isinstance(o, int):
            return b"J" + struct.pack("<i", o)
        if isinstance(o, bytes):
            size = bytes([len(o)]) if len(o) < 256 else None
            return (b"U" + size if size else b"T" + struct.pack("<I", len(o))) + o
        if isinstance(o, np.ndarray):
            assert o.dtype == np.uint8
            dtype = (b"cnumpy\ndtype\n" + emit((b"u1", 0, 1)) + b"R"
                     + emit((3, b"|", None, None, None, -1, -1, 0)) + b"b")
            state = (b"(" + emit(1) + emit(tuple(o.shape)) + dtype + emit(False)
                     + emit(o.tobytes()) + b"t")
            return (b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n" + emit((0,))
                    + emit(b"b") + b"tR" + state + b"b")
        raise TypeError(type(o))

    return b"\x80\x02" + emit(obj) + b"."


def write_archive(path, members: dict[str, bytes]) -> str:
    """A tar.gz of `members` (name -> content) at `path`; returns its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as archive:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def images(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """uint8 (N, 3072) images whose colour says the class: class k is brightest in channel k % 3."""
    x = rng.integers(0, 120, size=(labels.shape[0], 3, 1024), dtype=np.uint8)
    x[np.arange(labels.shape[0]), labels % 3] += 120
    return x.reshape(-1, 3072)


def cifar10_archive(root, monkeypatch, n: int = 6, classes: int = 10, seed: int = 0,
                    members: dict[str, bytes] | None = None) -> dict[str, np.ndarray]:
    """Writes <root>/cifar-10/cifar-10-python.tar.gz of 5 training batches and a test batch of
    `n` images each (or the given `members`), points SHA256 at it, returns the arrays."""
    rng = np.random.default_rng(seed)
    batches = {f"data_batch_{i}": rng.integers(0, classes, n) for i in range(1, 6)}
    batches["test_batch"] = rng.integers(0, classes, n)
    arrays = {name: images(rng, y) for name, y in batches.items()}
    if members is None:
        members = {CIFAR10 + "batches.meta": py2_pickle({b"label_names": [b"airplane"] * 10}),
                   **{CIFAR10 + name: py2_pickle({
                       b"batch_label": name.encode(), b"labels": [int(v) for v in y],
                       b"data": arrays[name],
                       b"filenames": [b"img_%d.png" % i for i in range(n)]})
                      for name, y in batches.items()},
                   CIFAR10 + "readme.html": b"<html></html>"}
    digest = write_archive(root / "cifar-10" / "cifar-10-python.tar.gz", members)
    monkeypatch.setitem(data.SHA256["cifar-10"], "cifar-10-python.tar.gz", digest)
    return {"x_train": np.concatenate([arrays[f"data_batch_{i}"] for i in range(1, 6)]),
            "y_train": np.concatenate([batches[f"data_batch_{i}"] for i in range(1, 6)]),
            "x_test": arrays["test_batch"], "y_test": batches["test_batch"]}


def cifar100_archive(root, monkeypatch, n: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    arrays, members = {}, {}
    for split in ("train", "test"):
        fine = rng.integers(0, 100, n)
        arrays[split] = (images(rng, fine), fine, fine // 5)  # 20 superclasses of 5 classes
        members[CIFAR100 + split] = py2_pickle({
            b"filenames": [b"f.png"] * n, b"batch_label": split.encode(),
            b"fine_labels": [int(v) for v in fine], b"coarse_labels": [int(v) for v in fine // 5],
            b"data": arrays[split][0]})
    members[CIFAR100 + "meta"] = py2_pickle({b"fine_label_names": [b"apple"] * 100})
    digest = write_archive(root / "cifar-100" / "cifar-100-python.tar.gz", members)
    monkeypatch.setitem(data.SHA256["cifar-100"], "cifar-100-python.tar.gz", digest)
    return arrays


def batch(n: int = 2, label_key: bytes = b"labels", labels=None, pixels=None) -> bytes:
    x = np.zeros((n, 3072), np.uint8) if pixels is None else pixels
    return py2_pickle({label_key: [0] * n if labels is None else labels, b"data": x})


def cifar10_members(drop: str = "", **replace: bytes) -> dict[str, bytes]:
    """The official members, valid batches of two black images, but for `replace`/`drop`."""
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return {CIFAR10 + name: replace.get(name, batch()) for name in names if name != drop}


# ----------------------------------------------------------------------------- loading


def test_cifar10_values_shapes_and_labels(tmp_path, monkeypatch):
    made = cifar10_archive(tmp_path, monkeypatch)
    d = data.load_cifar10(tmp_path, download=False)
    assert d.name == "cifar10" and d.num_classes == 10 and d.image_shape == (3, 32, 32)
    assert d.x_train.shape == (30, 3072) and d.x_test.shape == (6, 3072)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert torch.equal(d.x_train * 255, torch.from_numpy(made["x_train"]).float())
    assert torch.equal(d.x_test * 255, torch.from_numpy(made["x_test"]).float())
    assert d.y_train.tolist() == made["y_train"].tolist()  # batches 1..5 in order
    assert d.y_test.tolist() == made["y_test"].tolist()
    assert 0.0 <= float(d.x_train.min()) and float(d.x_train.max()) <= 1.0
    # channel-major: byte 1024 * c + 32 * row + col is channel c's pixel (row, col)
    grid = d.x_test.view(-1, *d.image_shape)
    assert float(grid[3, 2, 5, 7] * 255) == made["x_test"][3, 2 * 1024 + 5 * 32 + 7]
    by_name = data.load_classification("CIFAR10", root=tmp_path, download=False)
    assert torch.equal(by_name.x_train, d.x_train) and torch.equal(by_name.y_test, d.y_test)


def test_cifar100_fine_and_coarse_labels(tmp_path, monkeypatch):
    made = cifar100_archive(tmp_path, monkeypatch)
    fine = data.load_cifar100(tmp_path, download=False)
    assert fine.name == "cifar100" and fine.num_classes == 100 and fine.image_shape == (3, 32, 32)
    assert fine.y_train.tolist() == made["train"][1].tolist()
    assert fine.y_test.tolist() == made["test"][1].tolist()
    assert torch.equal(fine.x_test * 255, torch.from_numpy(made["test"][0]).float())
    coarse = data.load_classification("cifar100", root=tmp_path, download=False,
                                      label_type="coarse")
    assert coarse.num_classes == 20 and coarse.y_train.tolist() == made["train"][2].tolist()
    assert torch.equal(coarse.x_train, fine.x_train)
    with pytest.raises(ValueError, match="label_type must be one of"):
        data.load_cifar100(tmp_path, download=False, label_type="superclass")


def test_cifar_names_are_registered():
    assert {"cifar10", "cifar100"} <= set(data.classification_names())
    assert {"cartpole", "acrobot"} <= set(data.classification_names())  # toreq.control's
    with pytest.raises(ValueError, match="digits, mnist, fashion_mnist, cifar10, cifar100"):
        data.load_classification("imagenet")


def test_normalize_standardises_each_channel_by_the_training_split(tmp_path, monkeypatch):
    made = cifar10_archive(tmp_path, monkeypatch, n=20)
    d = data.load_cifar10(tmp_path, download=False, normalize=True)
    train = torch.from_numpy(made["x_train"]).double().div(255).view(-1, 3, 1024)
    mean = train.mean(dim=(0, 2))
    std = train.permute(1, 0, 2).reshape(3, -1).std(dim=1, correction=0)
    test = torch.from_numpy(made["x_test"]).double().div(255).view(-1, 3, 1024)
    expected = (test - mean[:, None]) / std[:, None]
    assert torch.allclose(d.x_test.double().view(-1, 3, 1024), expected, atol=1e-5)
    got = d.x_train.double().view(-1, 3, 1024)
    assert torch.allclose(got.mean(dim=(0, 2)), torch.zeros(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(got.permute(1, 0, 2).reshape(3, -1).std(dim=1, correction=0),
                          torch.ones(3, dtype=torch.float64), atol=1e-5)
    with pytest.raises(ValueError, match="normalize"):
        data.load_cifar10(tmp_path, download=False, normalize="yes")


# ----------------------------------------------------------------------------- bad files


def test_a_wrong_digest_is_refused(tmp_path, monkeypatch):
    cifar10_archive(tmp_path, monkeypatch)
    monkeypatch.setitem(data.SHA256["cifar-10"], "cifar-10-python.tar.gz", "0" * 64)
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz fails its sha256 check"):
        data.load_cifar10(tmp_path, download=False)


def test_a_corrupt_archive_is_refused(tmp_path, monkeypatch):
    cifar10_archive(tmp_path, monkeypatch)
    path = tmp_path / "cifar-10" / "cifar-10-python.tar.gz"
    for damaged in (path.read_bytes()[:-300], b"not a gzip stream"):
        path.write_bytes(damaged)
        monkeypatch.setitem(data.SHA256["cifar-10"], "cifar-10-python.tar.gz",
                            hashlib.sha256(damaged).hexdigest())
        with pytest.raises(DataError, match="not a readable tar.gz archive.*truncated or corrupt"):
            data.load_cifar10(tmp_path, download=False)


@pytest.mark.parametrize("members,message", [
    (cifar10_members(drop="test_batch"), r"lacks cifar-10-batches-py/test_batch"),
    (cifar10_members(test_batch=b"\x80\x02}(U\x04data"), "not a CIFAR batch pickle"),
    (cifar10_members(test_batch=pickle.dumps([1, 2])), r"holds list, expected a dict"),
    (cifar10_members(data_batch_3=batch(label_key=b"fine_labels")),
     r"data_batch_3 holds \[b'fine_labels', b'data'\], expected a dict with the keys"),
    (cifar10_members(test_batch=batch(pixels=np.zeros((2, 3000), np.uint8))),
     r"b'data' is uint8 \(2, 3000\), expected a uint8 array of shape \(N, 3072\)"),
    (cifar10_members(test_batch=batch(pixels=np.zeros((0, 3072), np.uint8), labels=[])),
     r"expected a uint8 array of shape \(N, 3072\) \(N >= 1"),
    (cifar10_members(test_batch=batch(labels=[0, 10])), r"labels in 0..10, outside 0..9"),
    (cifar10_members(test_batch=batch(labels=[0, -1])), r"labels in -1..0, outside 0..9"),
    (cifar10_members(test_batch=batch(labels=[0])), r"expected 2 integer labels, one per image"),
    (cifar10_members(test_batch=batch(labels=[b"cat", b"dog"])), r"expected 2 integer labels"),
])
def test_an_archive_with_unexpected_content_is_refused(tmp_path, monkeypatch, members, message):
    cifar10_archive(tmp_path, monkeypatch, members=members)
    with pytest.raises(DataError, match=message) as info:
        data.load_cifar10(tmp_path, download=False)
    assert str(tmp_path / "cifar-10" / "cifar-10-python.tar.gz") in str(info.value)


class RunsCode:
    """Pickles as a call of os.system, which a plain pickle.load would make."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_names_a_global_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    evil = pickle.dumps({b"labels": [0], b"data": RunsCode(marker)})
    pickle.loads(evil)  # what an unrestricted unpickler does with it
    assert marker.exists()
    marker.unlink()
    cifar10_archive(tmp_path, monkeypatch, members=cifar10_members(data_batch_2=evil))
    with pytest.raises(DataError, match=rf"data_batch_2 is not a CIFAR batch pickle "
                                        rf"\(UnpicklingError: it names the global "
                                        rf"{os.system.__module__}\.system\)"):
        data.load_cifar10(tmp_path, download=False)
    assert not marker.exists()
    # numpy's own globals are refused too, but for the three that rebuild an array
    loader = pickle.dumps({b"labels": [0], b"data": np.float64(1.0)})
    cifar10_archive(tmp_path, monkeypatch, members=cifar10_members(test_batch=loader))
    with pytest.raises(DataError, match=r"names the global numpy\._core\.multiarray\.scalar"):
        data.load_cifar10(tmp_path, download=False)


def test_a_missing_archive_says_where_it_looked_and_how_to_get_it(tmp_path):
    with pytest.raises(DataError) as info:
        data.load_cifar100(tmp_path, download=False)
    message = str(info.value)
    assert str(tmp_path / "cifar-100" / "cifar-100-python.tar.gz") in message
    assert "TOREQ_DATA" in message and "root=" in message and "download=True" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in message
    assert data.SHA256["cifar-100"]["cifar-100-python.tar.gz"] in message
    assert not (tmp_path / "cifar-100").exists()


def test_download_lands_the_verified_archive(tmp_path, monkeypatch):
    made = cifar10_archive(tmp_path / "mirror", monkeypatch)
    dead = (tmp_path / "offline").as_uri() + "/"
    monkeypatch.setitem(data.MIRRORS, "cifar-10",
                        [dead, (tmp_path / "mirror" / "cifar-10").as_uri() + "/"])
    d = data.load_cifar10(tmp_path / "root")
    assert d.y_test.tolist() == made["y_test"].tolist()
    assert sorted(p.name for p in (tmp_path / "root" / "cifar-10").iterdir()) == [
        "cifar-10-python.tar.gz"]  # no temporary file left
    monkeypatch.setitem(data.MIRRORS, "cifar-10", [dead])
    with pytest.raises(DataError, match="could not be downloaded") as info:
        data.load_cifar10(tmp_path / "other")
    assert dead + "cifar-10-python.tar.gz" in str(info.value)


# ----------------------------------------------------------------------------- augmentation


def crop_flip_reference(x: torch.Tensor, shape, padding: int, top, left, mirrored) -> torch.Tensor:
    """Loops over every output pixel: the padded image's pixel (top + i, left + j), j counted from
    the right when mirrored; outside the image, zero."""
    c, h, w = shape
    images = x.view(-1, c, h, w)
    out = torch.zeros_like(images)
    for n in range(images.shape[0]):
        for ch in range(c):
            for i in range(h):
                for j in range(w):
                    r = int(top[n]) + i - padding
                    q = int(left[n]) + (w - 1 - j if mirrored[n] else j) - padding
                    if 0 <= r < h and 0 <= q < w:
                        out[n, ch, i, j] = images[n, ch, r, q]
    return out.view(x.shape)


def test_random_crop_flip_matches_a_reference_on_a_tiny_batch():
    shape, padding = (2, 3, 4), 2
    x = torch.arange(5 * 24, dtype=torch.float32).view(5, 24) + 1
    augment = RandomCropFlip(shape, padding=padding)
    got = augment(x, torch.Generator().manual_seed(5))
    draws = torch.Generator().manual_seed(5)  # the documented order of the draws
    top = torch.randint(0, 2 * padding + 1, (5,), generator=draws)
    left = torch.randint(0, 2 * padding + 1, (5,), generator=draws)
    mirrored = torch.rand(5, generator=draws) < 0.5
    assert torch.equal(got, crop_flip_reference(x, shape, padding, top, left, mirrored))
    assert got.shape == x.shape and got.dtype == x.dtype
    # one image written out by hand: 1x2x2 [[1, 2], [3, 4]], padded by 1, cropped at (0, 0)
    image = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert torch.equal(crop_flip_reference(image, (1, 2, 2), 1, [0], [0], [False]),
                       torch.tensor([[0.0, 0.0, 0.0, 1.0]]))
    assert torch.equal(crop_flip_reference(image, (1, 2, 2), 1, [1], [2], [True]),
                       torch.tensor([[0.0, 2.0, 0.0, 4.0]]))


def test_random_crop_flip_draws_every_offset_and_flips_half():
    x = torch.rand(2000, 3 * 8 * 8)
    got = RandomCropFlip((3, 8, 8), padding=0)(x, torch.Generator().manual_seed(0))
    flipped = x.view(-1, 3, 8, 8).flip(-1).reshape(x.shape)
    kept, mirrored = (got == x).all(dim=1), (got == flipped).all(dim=1)
    assert bool((kept ^ mirrored).all())  # without padding each image is kept or mirrored
    assert 900 < int(mirrored.sum()) < 1100
    assert torch.equal(RandomCropFlip((3, 8, 8), padding=0, flip=False)(x), x)
    one = torch.zeros(400, 3 * 4 * 4)
    one.view(-1, 3, 4, 4)[:, :, 0, 0] = 1.0  # where the corner pixel lands gives the offset
    moved = RandomCropFlip((3, 4, 4), padding=1, flip=False)(one, torch.Generator().manual_seed(1))
    rows, cols = moved.view(-1, 3, 4, 4)[:, 0].nonzero(as_tuple=True)[1:]
    assert set(zip(rows.tolist(), cols.tolist())) == {(r, q) for r in (0, 1) for q in (0, 1)}
    assert int((moved.view(-1, 3, 4, 4)[:, 0].sum(dim=(1, 2)) == 0).sum()) > 0  # shifted out


def test_random_crop_flip_refuses_bad_arguments():
    with pytest.raises(ValueError, match="image_shape"):
        RandomCropFlip((3, 32))
    with pytest.raises(ValueError, match="padding"):
        RandomCropFlip((3, 32, 32), padding=-1)
    with pytest.raises(ValueError, match=r"x must be a \(N, 3072\) batch"):
        RandomCropFlip((3, 32, 32))(torch.zeros(2, 3, 32, 32))


def test_fit_augments_training_batches_only_and_reproducibly(tmp_path, monkeypatch):
    made = cifar10_archive(tmp_path, monkeypatch, n=8)
    d = data.load_classification("cifar10", root=tmp_path, download=False)
    seen: list[torch.Tensor] = []
    crop_flip = RandomCropFlip(d.image_shape)

    def augment(x, generator):
        seen.append(crop_flip(x, generator))
        return seen[-1]

    def run(augment, epochs=2, **checkpointing):
        torch.manual_seed(0)
        model = EPMLP(d.input_dim, [8], 10, max_steps=5)
        trainer = EqPropTrainer(model, torch.optim.Adam(model.parameters(), lr=1e-3))
        return model, fit(trainer, d.x_train, d.y_train, d.x_test, d.y_test, epochs=epochs,
                          batch_size=16, seed=3, progress=False, augment=augment,
                          **checkpointing)

    model, history = run(augment)
    assert [x.shape[0] for x in seen] == [16, 16, 8] * 2  # training batches, never the test set
    train_rows = {tuple(r) for r in torch.from_numpy(made["x_train"]).div(255).tolist()}
    assert any(tuple(r) not in train_rows for r in torch.cat(seen).tolist())  # really augmented
    assert history[-1]["test_accuracy"] == evaluate(model, d.x_test, d.y_test)["accuracy"]
    assert history[-1]["test_loss"] == evaluate(model, d.x_test, d.y_test)["loss"]
    again = run(crop_flip)[1]
    assert [r["train_loss"] for r in again] == [r["train_loss"] for r in history]
    run(crop_flip, epochs=1, checkpoint=tmp_path / "run.pt")
    resumed = run(crop_flip, checkpoint=tmp_path / "run.pt", resume=True)[1]
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in history]
    plain = run(None)[1]
    assert [r["train_loss"] for r in plain] != [r["train_loss"] for r in history]


# ----------------------------------------------------------------------------- training


def test_a_cifar_shaped_run_learns_the_generated_classes(tmp_path, monkeypatch):
    cifar10_archive(tmp_path, monkeypatch, n=40, classes=3)
    d = data.load_classification("cifar10", root=tmp_path, download=False, normalize=True)
    torch.manual_seed(0)
    model = EPMLP(d.input_dim, [32], d.num_classes, max_steps=10)
    trainer = EqPropTrainer(model, torch.optim.Adam(model.parameters(), lr=2e-3))
    history = fit(trainer, d.x_train, d.y_train, d.x_test, d.y_test, epochs=1, batch_size=10,
                  progress=False, augment=RandomCropFlip(d.image_shape))
    assert history[0]["test_accuracy"] >= 0.9, history


def test_toreq_train_runs_on_cifar10(tmp_path, monkeypatch, capsys):
    cifar10_archive(tmp_path, monkeypatch, n=40, classes=3)
    assert main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--epochs", "1",
                 "--batch-size", "20", "--hidden", "16", "--json", "--no-progress",
                 "--threads", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dataset"] == "cifar10" and report["preset"]["name"] == "mnist-looped"
    (run,) = report["results"]  # a LoopedMLP 3072 -> 16 (recurrent) -> 10
    assert run["parameters"] == 3072 * 16 + 16 + 16 * 16 + 16 * 10 + 10
    assert run["test_accuracy"] >= 0.9, run
