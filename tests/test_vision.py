"""The EqProp vision transformer (PatchTransformer): patches and shapes, bad input, EqProp
gradients against BPTT and implicit differentiation, and learning the digits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from toreq.data import load_digits
from toreq.diagnostics import compare, estimator_gradients
from toreq.nn import EquilibriumBlock, PatchTransformer

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (2, 4, 6)  # (C, H, W): with patch 2, a 2 x 3 grid of 8-pixel patches


def tiny(eqprop="both", **options) -> PatchTransformer:
    torch.manual_seed(0)
    return PatchTransformer(SHAPE, 3, patch_size=2, d_model=4, n_layers=2, n_heads=2, d_ff=6,
                            eqprop=eqprop, **options)


def images(batch=3, seed=0) -> torch.Tensor:
    return torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(seed))


def test_patches_are_the_image_tiles_in_row_major_order():
    model, x = tiny(), images()
    patches = model.patches(x)
    assert model.num_patches == 6 and patches.shape == (3, 6, 2 * 2 * 2)
    for row in range(2):
        for col in range(3):
            tile = x[:, :, 2 * row:2 * row + 2, 2 * col:2 * col + 2].flatten(1)  # (C, p, p)
            torch.testing.assert_close(patches[:, 3 * row + col], tile, rtol=0, atol=0)
    torch.testing.assert_close(model.patches(x.flatten(1)), patches, rtol=0, atol=0)


@pytest.mark.parametrize("eqprop", ["none", "attention", "ffn", "both"])
def test_shapes_sublayers_and_rebuilding_from_config(eqprop):
    model, x = tiny(eqprop).eval(), images()
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (3, 3)
        torch.testing.assert_close(model(x.flatten(1)), logits, rtol=0, atol=0)
    per_block = {"none": 0, "attention": 1, "ffn": 1, "both": 2}[eqprop]
    assert len(model.equilibrium_blocks()) == 2 * per_block
    assert not any(block.attention.causal for block in model.blocks)  # bidirectional
    twin = PatchTransformer(**model.config).eval()
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(twin(x), logits, rtol=0, atol=0)


def test_every_patch_reaches_the_logits_of_the_eqprop_model():
    # bidirectional attention and mean pooling: changing any one patch changes the logits
    model, x = tiny("both").eval(), images()
    with torch.no_grad():
        before = model(x)
        for row, col in ((0, 0), (1, 2)):
            changed = x.clone()
            changed[:, :, 2 * row:2 * row + 2, 2 * col:2 * col + 2] += 1.0
            assert (model(changed) - before).abs().max() > 1e-4


def test_bad_input_raises():
    with pytest.raises(ValueError, match=r"image_shape must be \(C, H, W\)"):
        PatchTransformer((28, 28), 10, patch_size=7)
    with pytest.raises(ValueError, match="patch_size=3 must divide the image's height 4"):
        PatchTransformer(SHAPE, 3, patch_size=3)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        PatchTransformer(SHAPE, 0, patch_size=2)
    with pytest.raises(ValueError, match="eqprop must be one of .* n_layers=2"):
        PatchTransformer(SHAPE, 3, patch_size=2, eqprop=["both"])
    with pytest.raises(ValueError, match=r"d_model \(4\) must be divisible by n_heads \(3\)"):
        PatchTransformer(SHAPE, 3, patch_size=2, d_model=4, n_heads=3)
    model = tiny()
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 2, 4, 6\) or \(batch, 48\)"):
        model(torch.zeros(3, 1, 4, 6))
    with pytest.raises(ValueError, match=r"x must have shape .* got \(3, 47\)"):
        model(torch.zeros(3, 47))
    with pytest.raises(ValueError, match="x must be a floating tensor"):
        model(torch.zeros(3, 48, dtype=torch.long))
    with pytest.raises(ValueError, match="the input x contains NaN"):
        model(torch.full((3, 48), float("nan")))


@pytest.mark.parametrize("attention_mode", ["symmetric", "nonsymmetric"])
def test_eqprop_gradients_match_bptt_and_implicit(attention_mode):
    # every parameter: EqProp's inside the equilibrium sublayers, autograd's outside them, fed by
    # the input gradients EqProp passes down; exact (O(beta^2)) when every sublayer is symmetric
    model = tiny("both", attention_mode=attention_mode).double().eval()
    x, y = images().double(), torch.tensor([0, 2, 1])
    grads = {m: estimator_gradients(model, x, y, m, loss_fn=F.cross_entropy)
             for m in ("eqprop", "bptt", "implicit")}
    names = [n for n, _ in model.named_parameters()]
    assert sorted(grads["eqprop"]) == sorted(["input", *names])
    for name, ep in grads["eqprop"].items():
        bptt = grads["bptt"][name]
        assert bptt.abs().max() > 0, name
        assert compare(grads["implicit"][name], bptt).relative_error < 1e-9, name
        if attention_mode == "symmetric":
            assert compare(ep, bptt).relative_error < 1e-6, name
    if attention_mode == "nonsymmetric":  # the vector-field approximation: close, not equal
        flat = {m: torch.cat([g.flatten() for g in grads[m].values()]) for m in grads}
        assert 0.5 < compare(flat["eqprop"], flat["bptt"]).cosine < 1 - 1e-6


def test_eqprop_vision_transformer_learns_the_digits():
    data = load_digits()
    torch.manual_seed(0)
    model = PatchTransformer(data.image_shape, data.num_classes, patch_size=4, d_model=32,
                             n_layers=1, n_heads=2, d_ff=64, eqprop="both",
                             block_options=dict(tol=1e-3))
    assert all(isinstance(b, EquilibriumBlock) for b in model.equilibrium_blocks())

    def accuracy() -> float:
        model.eval()
        with torch.no_grad():
            correct = (model(data.x_test).argmax(1) == data.y_test).double().mean()
        model.train()
        return float(correct)

    before = accuracy()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(8):
        order = torch.randperm(len(data.x_train), generator=generator)
        for i in range(0, len(order), 32):
            idx = order[i:i + 32]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    after = accuracy()
    print(f"digits test accuracy {before:.3f} -> {after:.3f}")
    # measured: 0.931; with the equilibrium sublayers' EqProp vectors zeroed (only the readout,
    # LayerNorms and the embeddings through the residual stream learn) 0.794
    assert before < 0.2 and after >= 0.88, (before, after)


def test_mnist_example_quick_run_learns(tmp_path):
    """examples/vit_mnist.py --quick end to end on the real MNIST files: one epoch on 6,000
    images reaches 42.5% on 1,000 test images here (chance: 10%), and writes its results."""
    repo = Path(__file__).resolve().parents[1]
    root = Path(os.environ.get("TOREQ_DATA") or repo.parent / "shared" / "data")
    if not (root / "mnist").is_dir():
        pytest.skip(f"no local copy of mnist/ in {root} (set TOREQ_DATA to a folder with it)")
    subprocess.run([sys.executable, str(repo / "examples" / "vit_mnist.py"), "--quick",
                    "--data-dir", str(root), "--out", str(tmp_path)], check=True,
                   capture_output=True, text=True, timeout=300)
    results = json.loads((tmp_path / "results.json").read_text())
    (run,) = results["runs"]
    assert results["test_set_size"] == 1000 and run["eqprop"] == "both"
    assert run["test_accuracy"] >= 0.3
    assert "| eqprop='both' | " in (tmp_path / "results.md").read_text()
