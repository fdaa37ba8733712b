r"""Export of a trained model's inference: `torch.export` programs and ONNX files.

A model's prediction is the fixed point of `s <- F(x, s)`, found by
[`toreq.ops.relax`][toreq.ops.relax.relax] (a C++ op whose loop stops each sample at its own
convergence) or, for the models whose step is PyTorch code, by the Python loop
[`toreq.ops.iterate`][toreq.ops.iteration.iterate]. Neither can be captured as it runs eagerly:
`torch.export` needs static control flow, and a program holding `toreq::relax` runs only where toreq
is installed, which rules ONNX out. [`export_model`][toreq.export.export_model] therefore builds an
[`Inference`][toreq.export.Inference] module that relaxes with the static solver
([`toreq.solvers.Static`][toreq.solvers.Static]: the same loop in its static mode), the model's own
differentiable one-step map `model.step(x, states, net)` (plain ATen ops) unrolled a fixed number of
times:

* `tol == 0`: exactly `steps` steps, `s^{k+1} = F(x, s^k)` from rest, as `model.relax`
  with `tol=0, max_steps=steps` computes it;
* `tol > 0`: `steps` is the cap, and a sample freezes once its largest state change falls
    below `tol`,

    $$
    \delta_b^k = \max_l \max_j |F(x, s^k)_{l,bj} - s^k_{l,bj}|, \qquad
    s_b^{k+1} = \begin{cases} F(x, s^k)_b & a_b^k \\ s_b^k & \text{otherwise}
    \end{cases}, \qquad
    a_b^{k+1} = a_b^k \wedge \lnot(\delta_b^k < \mathrm{tol}),
    $$

    $a^0 = 1$, $n_b = \sum_k a_b^k$ the updates sample `b` received. Samples never interact,
    so this gives the same per-sample states and step counts as the eager loop that stops early;
    it always costs `steps` steps.

The program returns `(output, steps)`: the model's prediction read from the final states
(`model.output`) and the int64 `(batch,)` step counts. The batch dimension is dynamic.

`decompose=False` keeps `toreq::relax` as one custom op in the program (its fake kernel lets
`torch.export` trace it): the program is smaller and relaxes with the compiled kernel, but
loading and running it needs `import toreq` first, which registers the op.

What cannot be exported, and why:

* ONNX of a `decompose=False` program: ONNX has no `toreq::relax`.
* `decompose=False` for models whose dynamics is not a coupling list (ModernEqProp, ConvEP):
  they have no op to keep.
* Training: nudged phases and EqProp's gradients are not part of the program (inference only).
* The eager loop's `RuntimeError` on a NaN or Inf state: raising on tensor values is
  data-dependent control flow. A decomposed program lets a diverged state run on into the
  output, where it shows as NaN or Inf.
* Training-mode parametrizations: the model is traced in `eval()` mode, where spectral
  normalisation uses its stored singular vectors instead of updating them each call.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from toreq.nn.equilibrium import EquilibriumModel
from toreq.solvers import CompiledRelax, PhaseSettings, Static

__all__ = ["Inference", "export_model", "to_onnx"]


class Inference(nn.Module):
    """A model's free-phase inference with static control flow: `x -> (output, steps)`.

    Args:
        model: the trained [`toreq.nn.EquilibriumModel`][toreq.nn.equilibrium.EquilibriumModel].
        steps: the number of relaxation steps (`tol == 0`) or their cap (`tol > 0`).
        tol: the per-sample tolerance; 0 runs exactly `steps` steps.
        decompose: relax through `model.step` in ATen ops (True) or through the model's
            `toreq::relax` op (False; layered models only).
    """

    def __init__(self, model: EquilibriumModel, steps: int, tol: float, decompose: bool) -> None:
        super().__init__()
        self.model, self.steps, self.tol, self.decompose = model, steps, tol, decompose

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        net = self.model.network(x)
        solver = Static() if self.decompose else CompiledRelax()
        result = self.model.solve(x, net, self.model.init_states(x, net), None,
                                  PhaseSettings(self.steps, self.tol), phase="free",
                                  solver=solver)
        return self.model.output(result.states, net), result.steps

    def extra_repr(self) -> str:
        return f"steps={self.steps}, tol={self.tol}, decompose={self.decompose}"


def _inference(model: EquilibriumModel, example_x: Tensor, steps: int | None, tol: float | None,
               decompose: bool) -> Inference:
    """Checks the arguments of [`export_model`][toreq.export.export_model] and
    [`to_onnx`][toreq.export.to_onnx]; builds the module."""
    if not isinstance(model, EquilibriumModel):
        raise TypeError(f"model must be a toreq.nn.EquilibriumModel, got {type(model).__name__}")
    if not isinstance(example_x, Tensor) or not example_x.is_floating_point():
        raise TypeError("example_x must be a floating-point tensor of shape (batch, ...), got "
                        f"{type(example_x).__name__}"
                        + (f" of dtype {example_x.dtype}" if isinstance(example_x, Tensor) else ""))
    if example_x.dim() < 2 or example_x.shape[0] < 2:
        # torch.export treats a size of 1 as a constant, so a batch of one cannot stay dynamic
        raise ValueError("example_x must have shape (batch, ...) with batch >= 2 (the exported "
                         f"batch dimension is dynamic), got {tuple(example_x.shape)}")
    steps = model.max_steps if steps is None else steps
    tol = model.tol if tol is None else tol
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not (isinstance(tol, (int, float)) and tol >= 0.0 and tol != float("inf")):
        raise ValueError(f"tol must be a finite float >= 0, got {tol!r}")
    if not decompose and not hasattr(model, "relax_with_op"):
        raise ValueError(f"decompose=False keeps the toreq::relax op, which "
                         f"{type(model).__name__} does not use (its step is PyTorch code); "
                         "export it with decompose=True")
    return Inference(model, steps, float(tol), decompose)


def export_model(model: EquilibriumModel, example_x: Tensor, *, steps: int | None = None,
                 tol: float | None = None,
                 decompose: bool = True) -> torch.export.ExportedProgram:
    """Exports `model`'s inference `x -> (output, steps)` with `torch.export`.

    Args:
        model: a trained [`toreq.nn.EquilibriumModel`][toreq.nn.equilibrium.EquilibriumModel];
            traced in `eval()` mode (its mode is restored afterwards).
        example_x: an input batch `(batch, ...)` with `batch >= 2`, of the dtype and device
            the program will run with; the batch dimension stays dynamic.
        steps: the number of relaxation steps, or their cap when `tol > 0`; default
            `model.max_steps`.
        tol: the per-sample tolerance (see the module docstring); 0 runs exactly `steps`
            steps; default `model.tol`, so that by default the program computes `model(x)`.
        decompose: write the relaxation in ATen ops (True, runs without toreq) or keep the
            `toreq::relax` op (False: layered models only, loading needs `import toreq`).

    Returns:
        The `torch.export.ExportedProgram`; `program.module()(x)` runs it, and
            `torch.export.save` / `torch.export.load` store it.
    """
    module = _inference(model, example_x, steps, tol, decompose)
    batch = torch.export.Dim("batch", min=1)
    dynamic = {"x": {0: batch}}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.export.export(module, (example_x,), dynamic_shapes=dynamic)
    finally:
        model.train(was_training)


def to_onnx(model: EquilibriumModel, example_x: Tensor, path: str | os.PathLike, *,
            steps: int | None = None, tol: float | None = None) -> None:
    """Writes `model`'s inference `x -> (output, steps)` to an ONNX file at `path`.

    The relaxation is decomposed into ATen ops (as [`export_model`][toreq.export.export_model] with
    `decompose=True`), then converted by `torch.onnx.export` (its `torch.export` based exporter,
    which needs the `onnx` and `onnxscript` packages). The graph's input is named `x`, its outputs
    `output` and `steps`; the batch dimension is dynamic. Arguments as for
    [`export_model`][toreq.export.export_model].
    """
    program = export_model(model, example_x, steps=steps, tol=tol, decompose=True)
    torch.onnx.export(program, (example_x,), os.fspath(path), input_names=["x"],
                      output_names=["output", "steps"], dynamo=True, verbose=False)
