"""toreq.export: exported inference against eager relaxation, save/load, ONNX, errors, CLI."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from toreq.cli import main
from toreq.data import load_digits
from toreq.export import export_model, to_onnx
from toreq.nn import EPMLP, ConvEP, LoopedMLP, ModernEqProp, ToroidalMLP
from toreq.presets import build_trainer, get_preset, run_description
from toreq.train import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = {
    "looped": lambda: LoopedMLP(64, 24, 10, recurrent_scale=0.5),
    "epmlp": lambda: EPMLP(64, [24], 10),
    "toroidal": lambda: ToroidalMLP(64, 16, 10, num_layers=2),
    "modern": lambda: ModernEqProp(64, 24, 10),
    "conv": lambda: ConvEP((1, 8, 8), [4, 8], 10),
}
LAYERED = ["looped", "epmlp", "toroidal"]
STEPS = 16


@pytest.fixture(scope="module")
def x():
    return load_digits().x_test[:7]


def make(name: str):
    torch.manual_seed(0)
    return MODELS[name]().eval()


def eager(model, x, steps, tol):
    """The model's own relaxation (the compiled kernel or the eager Python loop)."""
    with torch.no_grad():
        net = model.network(x)
        result = model.relax(x, net, max_steps=steps, tol=tol)
        return model.output(result.states, net), result.steps


def toreq_ops(program) -> list[str]:
    return [str(node.target) for node in program.graph.nodes
            if node.op == "call_function" and "toreq" in str(node.target)]


@pytest.mark.parametrize("tol", [0.0, 1e-4], ids=["fixed_steps", "to_tolerance"])
@pytest.mark.parametrize("name", list(MODELS))
def test_decomposed_program_matches_eager(name, tol, x):
    model = make(name)
    program = export_model(model, x[:3], steps=STEPS, tol=tol)
    assert toreq_ops(program) == []
    out, steps = program.module()(x)  # another batch size than the example's: dynamic batch
    expected, expected_steps = eager(model, x, STEPS, tol)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(steps, expected_steps)
    if tol > 0:  # samples stop at different steps: the masking, not the cap, ended them
        assert len(set(steps.tolist())) > 1 and (steps < STEPS).any()


@pytest.mark.parametrize("name", ["epmlp", "conv"])
def test_default_program_computes_the_models_forward(name, x):
    model = make(name)
    out, steps = export_model(model, x[:2]).module()(x)
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)
    assert torch.equal(steps, model.last_steps)


def test_conv_ep_exports_from_image_shaped_input(x):
    model = make("conv")
    images = x.view(-1, 1, 8, 8)
    out, _ = export_model(model, images[:2], steps=STEPS, tol=0.0).module()(images)
    torch.testing.assert_close(out, eager(model, x, STEPS, 0.0)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", LAYERED)
def test_kept_relax_op_matches_eager(name, x):
    model = make(name)
    program = export_model(model, x[:3], steps=STEPS, tol=1e-4, decompose=False)
    assert toreq_ops(program) == ["toreq.relax.default"]
    out, steps = program.module()(x)
    expected, expected_steps = eager(model, x, STEPS, 1e-4)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert torch.equal(steps, expected_steps)


@pytest.mark.parametrize("decompose", [True, False])
def test_program_survives_save_and_load(decompose, x, tmp_path):
    model = make("epmlp")
    path = tmp_path / "epmlp.pt2"
    torch.export.save(export_model(model, x[:2], steps=STEPS, tol=1e-4, decompose=decompose),
                      path)
    out, steps = torch.export.load(path).module()(x)
    expected, expected_steps = eager(model, x, STEPS, 1e-4)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(steps, expected_steps)


def test_decomposed_program_runs_without_toreq(x, tmp_path):
    model = make("looped")
    path = tmp_path / "looped.pt2"
    torch.export.save(export_model(model, x[:2], steps=STEPS, tol=1e-4), path)
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch\n"
            f"out, steps = torch.export.load({str(path)!r}).module()("
            f"torch.load({str(tmp_path / 'x.pt')!r}))\n"
            "assert 'toreq' not in sys.modules\n"
            f"torch.save((out, steps), {str(tmp_path / 'out.pt')!r})\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    out, steps = torch.load(tmp_path / "out.pt")
    expected, expected_steps = eager(model, x, STEPS, 1e-4)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(steps, expected_steps)


def test_export_traces_eval_mode_and_restores_the_mode(x):
    model = make("looped").train()
    vectors = {k: v.clone() for k, v in model.state_dict().items()}
    export_model(model, x[:2], steps=STEPS)
    assert model.training
    # in training mode spectral normalisation would have run a power-iteration step
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in vectors.items())


@pytest.mark.parametrize("name,tol", [("epmlp", 1e-4), ("conv", 0.0), ("modern", 1e-4)])
def test_onnx_matches_eager(name, tol, x, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed "
                              "(pip install 'toreq[test]' installs it)")
    pytest.importorskip("onnxscript", reason="torch.onnx.export needs onnxscript")
    model = make(name)
    path = tmp_path / f"{name}.onnx"
    to_onnx(model, x[:2], path, steps=STEPS, tol=tol)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x"]
    out, steps = session.run(["output", "steps"], {"x": x.numpy()})
    expected, expected_steps = eager(model, x, STEPS, tol)
    torch.testing.assert_close(torch.from_numpy(out), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(torch.from_numpy(steps), expected_steps)


@pytest.mark.parametrize("call,error,match", [
    (lambda m, x: export_model(torch.nn.Linear(64, 10), x), TypeError,
     "model must be a toreq.nn.EquilibriumModel, got Linear"),
    (lambda m, x: export_model(m, x.long()), TypeError, "example_x must be a floating-point"),
    (lambda m, x: export_model(m, x[:1]), ValueError, "batch >= 2"),
    (lambda m, x: export_model(m, x[0]), ValueError, r"shape \(batch, ...\)"),
    (lambda m, x: export_model(m, x, steps=0), ValueError, "steps must be an int >= 1, got 0"),
    (lambda m, x: export_model(m, x, steps=2.5), ValueError, "steps must be an int >= 1"),
    (lambda m, x: export_model(m, x, tol=-1e-3), ValueError, "tol must be a finite float >= 0"),
    (lambda m, x: export_model(m, x, tol=float("nan")), ValueError, "tol must be a finite"),
])
def test_bad_arguments_raise_clear_errors(call, error, match, x):
    with pytest.raises(error, match=match):
        call(make("looped"), x[:3])


def test_kept_relax_op_needs_a_layered_model(x):
    with pytest.raises(ValueError, match="ModernEqProp does not use"):
        export_model(make("modern"), x[:3], decompose=False)


def test_cli_exports_a_checkpoint(x, tmp_path, capsys):
    preset = dataclasses.replace(get_preset("digits-looped"), hidden=16)
    model, trainer, _ = build_trainer(preset, 64, 10, seed=3)
    save_checkpoint(tmp_path / "run.pt", trainer, 1, [],
                    about=run_description(preset, "digits", model, seed=3))
    out_path = tmp_path / "looped.pt2"
    assert main(["export", "--checkpoint", str(tmp_path / "run.pt"),
                 "--output", str(out_path), "--steps", "10", "--tol", "0"]) == 0
    assert "largest |exported - eager| on 256 test samples" in capsys.readouterr().out
    out, steps = torch.export.load(out_path).module()(x)
    torch.testing.assert_close(out, eager(model.eval(), x, 10, 0.0)[0], rtol=1e-5, atol=1e-6)
    assert (steps == 10).all()
    with pytest.raises(SystemExit) as stop:
        main(["export", "--checkpoint", str(tmp_path / "run.pt"), "--output", "model.bin"])
    assert stop.value.code == 2
    assert "argument --output: expected a file name ending in .pt2, .onnx or .safetensors, got " \
           "'model.bin'" in capsys.readouterr().err
