"""toreq.ops: every kernel against its pure-PyTorch reference, opcheck, compile, bad input."""

from __future__ import annotations

import pytest
import torch

from toreq.ops import (
    Coupling,
    hebbian_update,
    hebbian_update_reference,
    layered_couplings,
    max_pool2d,
    max_pool2d_reference,
    relax,
    relax_reference,
)
from toreq.ops._dispatch import has_kernel

from op_problems import make_problem


def assert_same_result(result, expected, dtype):
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    assert len(result.states) == len(expected.states)
    for got, want in zip(result.states, expected.states):
        torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(result.steps, expected.steps)
    torch.testing.assert_close(result.residual, expected.residual, **tol)


# --------------------------------------------------------------------------- relax vs reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["looped", "tied", "untied", "ring"])
@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("schedule", ["sync", "async"])
def test_free_phase_matches_reference(dtype, kind, batch, schedule):
    p = make_problem(kind, batch, dtype)
    for damping, activation in [(0.0, "hard_sigmoid"), (0.4, "tanh"), (0.2, "sigmoid"),
                                (0.1, "steep_sigmoid")]:
        kw = dict(activation=activation, damping=damping, max_steps=25, schedule=schedule)
        got = relax(p["states"], p["couplings"], p["drives"], **kw)
        want = relax_reference(p["states"], p["couplings"], p["drives"], **kw)
        assert_same_result(got, want, dtype)
        assert got.steps.tolist() == [25] * batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weights", ["contiguous", "strided rows", "no unit stride"])
def test_single_sample_matches_reference(dtype, weights):
    """One sample relaxing: the CPU kernel's matrix-vector loops (both weight layouts: a forward
    coupling reads rows of W, tied feedback rows of W^T), split over threads, with widths that
    are not multiples of the vector width; a weight with no unit stride takes the GEMM path."""
    p = make_problem("wide", 1, dtype, readout=True, loss="cross_entropy")
    if weights != "contiguous":
        # the same values in a larger buffer: rows of stride 2*n, or columns of stride 2
        step = (1, 2) if weights == "no unit stride" else None
        couplings = []
        for c in p["couplings"]:
            rows, cols = c.weight.shape
            big = torch.zeros(rows, 2 * cols, dtype=dtype)
            view = big[:, ::2] if step else big[:, :cols]
            view.copy_(c.weight)
            couplings.append(c._replace(weight=view))
        p["couplings"] = couplings
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for beta in (0.0, 0.5):
            kw = dict(activation="tanh", damping=0.2, max_steps=12, beta=beta,
                      loss="cross_entropy", target=p["target"],
                      readout_weight=p["readout_weight"], readout_bias=p["readout_bias"])
            got = relax(p["states"], p["couplings"], p["drives"], **kw)
            want = relax_reference(p["states"], p["couplings"], p["drives"], **kw)
            assert_same_result(got, want, dtype)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["narrow", "narrow_untied"])
@pytest.mark.parametrize("batch,threads", [(2, 1), (37, 1), (37, 2), (403, 2)])
def test_narrow_couplings_match_reference(dtype, kind, batch, threads):
    """Couplings with a 10-unit side take the CPU kernel's loops at any batch (both weight
    layouts, blocks of rows with a remainder, split over threads at batch 403), beside a wide
    coupling on its GEMM into the same layer; with tol > 0 samples converge at different steps,
    and the rows still relaxing are gathered, their per-sample drives too."""
    p = make_problem(kind, batch, dtype, readout=True, loss="cross_entropy")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # tol > 0 in float64 only: a float32 residual within round-off of tol can stop a sample
        # one step apart from the reference (seen once in CI, at batch 403 on two threads).
        cases = [(0.0, 0.0), (0.5, 0.0)] + ([(0.0, 1e-4)] if dtype == torch.float64 else [])
        for beta, tol in cases:
            kw = dict(activation="tanh", damping=0.2, max_steps=30, beta=beta, tol=tol,
                      loss="cross_entropy", target=p["target"],
                      readout_weight=p["readout_weight"], readout_bias=p["readout_bias"])
            got = relax(p["states"], p["couplings"], p["drives"], **kw)
            want = relax_reference(p["states"], p["couplings"], p["drives"], **kw)
            assert_same_result(got, want, dtype)
            if tol and batch > 2:
                assert len(set(got.steps.tolist())) > 1, "every sample stopped at one step"
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["looped", "tied", "untied"])
@pytest.mark.parametrize("loss,readout", [("mse", False), ("mse", True), ("cross_entropy", True),
                                          ("cross_entropy", False), ("gradient", False)])
@pytest.mark.parametrize("beta", [0.5, -0.5])
@pytest.mark.parametrize("nudge_position", ["inside", "outside"])
def test_nudged_phase_matches_reference(dtype, kind, loss, readout, beta, nudge_position):
    p = make_problem(kind, 5, dtype, readout=readout, loss=loss)
    kw = dict(activation="tanh", damping=0.25, max_steps=15, schedule="async", beta=beta,
              loss=loss, target=p["target"], readout_weight=p.get("readout_weight"),
              readout_bias=p.get("readout_bias"), nudge_position=nudge_position)
    got = relax(p["states"], p["couplings"], p["drives"], **kw)
    want = relax_reference(p["states"], p["couplings"], p["drives"], **kw)
    assert_same_result(got, want, dtype)
    free = relax(p["states"], p["couplings"], p["drives"], **{**kw, "beta": 0.0})
    assert not torch.allclose(got.states[-1], free.states[-1]), "the nudge had no effect"
    if nudge_position == "outside":  # a different step from the inside nudge
        inside = relax(p["states"], p["couplings"], p["drives"], **{**kw, "nudge_position": "inside"})
        assert not torch.allclose(got.states[-1], inside.states[-1])


def test_class_labels_are_one_hot_targets():
    p = make_problem("tied", 6, torch.float64, readout=True, loss="cross_entropy")
    labels = p["target"].argmax(dim=1)
    kw = dict(beta=0.3, loss="cross_entropy", readout_weight=p["readout_weight"], max_steps=10)
    by_label = relax(p["states"], p["couplings"], p["drives"], target=labels, **kw)
    by_rows = relax(p["states"], p["couplings"], p["drives"], target=p["target"], **kw)
    assert_same_result(by_label, by_rows, torch.float64)


def test_tolerance_stops_each_sample_at_the_expected_step():
    # With no coupling the state moves geometrically toward rho(d) = d: with damping g the
    # change at step t is (1 - g) g^(t-1) |s0 - d|, so the first step below tol is known.
    d = torch.tensor([[0.2, 0.6], [0.5, 0.5], [0.3, 0.4]], dtype=torch.float64)
    s0 = d.clone()
    s0[0, 1] += 0.3   # distance 0.3 -> 0.5 * 0.5^(t-1) * 0.3 < 0.01 first at t = 5
    s0[1, 0] -= 0.4   # distance 0.4 -> first at t = 6   (0.4 * 0.5^t: 0.00625 at t = 6)
    zero = torch.zeros(2, 2, dtype=torch.float64)
    result = relax([s0], [Coupling(zero, 0, 0)], [d], damping=0.5, tol=0.01, max_steps=50)
    assert result.steps.tolist() == [5, 6, 1]
    assert (result.residual < 0.01).all()
    torch.testing.assert_close(result.residual[2], torch.tensor(0.0, dtype=torch.float64))
    capped = relax([s0], [Coupling(zero, 0, 0)], [d], damping=0.5, tol=0.01, max_steps=3)
    assert capped.steps.tolist() == [3, 3, 1]
    assert capped.residual[0] == pytest.approx(0.5 * 0.25 * 0.3)
    reference = relax_reference([s0], [Coupling(zero, 0, 0)], [d], damping=0.5, tol=0.01,
                                max_steps=50)
    assert_same_result(result, reference, torch.float64)


@pytest.mark.parametrize("kind", ["looped", "tied", "untied"])
@pytest.mark.parametrize("schedule", ["sync", "async"])
def test_early_stop_matches_reference_per_sample(kind, schedule):
    p = make_problem(kind, 9, torch.float64)
    kw = dict(activation="tanh", damping=0.3, max_steps=200, tol=1e-6, schedule=schedule)
    got = relax(p["states"], p["couplings"], p["drives"], **kw)
    want = relax_reference(p["states"], p["couplings"], p["drives"], **kw)
    assert_same_result(got, want, torch.float64)
    assert (got.steps < 200).all() and len(set(got.steps.tolist())) > 1


@pytest.mark.parametrize("loss,readout", [("mse", False), ("cross_entropy", True),
                                          ("gradient", False)])
def test_early_stop_in_the_nudged_phase_matches_reference(loss, readout):
    # Samples start at graded distances from the free equilibrium, so they converge at many
    # different steps and the kernel drops converged rows (with their drives and targets)
    # from its working set several times.
    batch = 33
    p = make_problem("tied", batch, torch.float64, readout=readout, loss=loss)
    free = relax(p["states"], p["couplings"], p["drives"], activation="tanh", max_steps=500,
                 tol=1e-12)
    distance = torch.logspace(-8, 0, batch, dtype=torch.float64)[:, None]
    states = [f + distance * (s - f) for f, s in zip(free.states, p["states"])]
    kw = dict(activation="tanh", damping=0.2, max_steps=300, tol=1e-9, beta=0.3, loss=loss,
              target=p["target"], readout_weight=p.get("readout_weight"),
              readout_bias=p.get("readout_bias"))
    got = relax(states, p["couplings"], p["drives"], **kw)
    want = relax_reference(states, p["couplings"], p["drives"], **kw)
    assert_same_result(got, want, torch.float64)
    assert (got.steps < 300).all() and len(set(got.steps.tolist())) >= 4


@pytest.mark.parametrize("kind", ["looped", "tied", "untied", "ring"])
def test_free_state_is_a_fixed_point(kind):
    p = make_problem(kind, 4, torch.float64)
    result = relax(p["states"], p["couplings"], p["drives"], activation="tanh", damping=0.2,
                   max_steps=2000, tol=1e-12, schedule="async")
    assert (result.residual < 1e-12).all()
    s = result.states
    for layer, state in enumerate(s):
        pre = p["drives"][layer] + sum(
            s[c.source] @ (c.weight if c.transposed else c.weight.T)
            for c in p["couplings"] if c.target == layer)
        # A damped step moves by (1 - damping) * |F(s) - s|, which is below tol.
        torch.testing.assert_close(torch.tanh(pre), state, atol=1e-11, rtol=0)


def test_noncontiguous_inputs_give_the_same_result():
    p = make_problem("tied", 6, torch.float32, readout=True, loss="cross_entropy")
    kw = dict(beta=0.5, loss="cross_entropy", target=p["target"], max_steps=12,
              readout_weight=p["readout_weight"])
    want = relax(p["states"], p["couplings"], p["drives"], **kw)
    states = [s.T.contiguous().T for s in p["states"]]
    couplings = [Coupling(c.weight.T.contiguous().T, c.target, c.source, c.transposed)
                 for c in p["couplings"]]
    drives = [torch.cat([d, d], dim=-1)[..., ::2] if d.dim() == 2 else d for d in p["drives"]]
    drives[0] = p["drives"][0].repeat(1, 2)[:, : p["drives"][0].shape[1]]
    assert not states[0].is_contiguous() and not couplings[0].weight.is_contiguous()
    got = relax(states, couplings, drives, **{**kw, "readout_weight": kw["readout_weight"].T.contiguous().T})
    assert_same_result(got, want, torch.float32)


def test_relax_does_not_modify_inputs_or_build_a_graph():
    p = make_problem("tied", 3, torch.float64)
    weights = [c.weight.requires_grad_() for c in p["couplings"]]
    before = [s.clone() for s in p["states"]]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        result = relax(p["states"], p["couplings"], p["drives"], max_steps=20)
    assert saved == []
    assert all(not s.requires_grad and s.grad_fn is None for s in result.states)
    for s, b in zip(p["states"], before):
        assert torch.equal(s, b)
    assert weights[0].grad is None


def test_zero_steps_returns_the_initial_state():
    p = make_problem("tied", 2, torch.float64)
    result = relax(p["states"], p["couplings"], p["drives"], max_steps=0)
    for s, s0 in zip(result.states, p["states"]):
        assert torch.equal(s, s0)
    assert result.steps.tolist() == [0, 0] and torch.isinf(result.residual).all()


# --------------------------------------------------------------------------- reduced precision
# float16 and bfloat16 states are updated in float32 and rounded once per step, so a relaxation
# differs from the float32 one by a few rounding errors of the dtype (unit roundoff 2^-8 for
# bfloat16, 2^-11 for float16) on states of magnitude <= 1, damped by the contraction: the
# tolerances below are about 8 units of roundoff.
REDUCED_ATOL = {torch.bfloat16: 3e-2, torch.float16: 4e-3}


def _cast_problem(problem, dtype):
    cast = {k: v.to(dtype) for k, v in problem.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point()}
    return {**problem, **cast,
            "states": [s.to(dtype) for s in problem["states"]],
            "drives": [None if d is None else d.to(dtype) for d in problem["drives"]],
            "couplings": [c._replace(weight=c.weight.to(dtype)) for c in problem["couplings"]]}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["looped", "tied", "wide"])
@pytest.mark.parametrize("loss,readout,beta", [("mse", False, 0.0), ("mse", False, 0.5),
                                               ("cross_entropy", True, -0.5),
                                               ("gradient", False, 0.5)])
@pytest.mark.parametrize("batch", [1, 6])
def test_reduced_precision_matches_float32(dtype, kind, loss, readout, beta, batch):
    """The op in float16/bfloat16 against the float32 reference on the same (rounded) inputs."""
    p = _cast_problem(make_problem(kind, batch, torch.float32, readout=readout, loss=loss), dtype)
    p32 = _cast_problem(p, torch.float32)
    kw = dict(activation="tanh", damping=0.25, max_steps=15, schedule="async", beta=beta,
              loss=loss)
    extra = lambda q: dict(target=q["target"], readout_weight=q.get("readout_weight"),
                           readout_bias=q.get("readout_bias"))
    got = relax(p["states"], p["couplings"], p["drives"], **kw, **extra(p))
    want = relax_reference(p32["states"], p32["couplings"], p32["drives"], **kw, **extra(p32))
    for g, w in zip(got.states, want.states):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), w, rtol=0, atol=REDUCED_ATOL[dtype])
    assert got.residual.dtype == torch.float32  # the convergence test runs in float32
    assert got.steps.tolist() == [15] * batch


# A tol at the dtype's resolution near 1 (a state stuck between two rounded values alternates
# between them, by one unit, and a smaller tol is never met there).
REDUCED_TOL = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_converges_to_tolerance(dtype):
    """The convergence test compares float32 changes of the stored states with tol, so every
    sample stops, at a state within the dtype's tolerance of the float32 fixed point."""
    p = _cast_problem(make_problem("tied", 8, torch.float32), dtype)
    tol = REDUCED_TOL[dtype]
    free = relax(p["states"], p["couplings"], p["drives"], max_steps=200, tol=tol)
    assert free.residual.dtype == torch.float32
    assert (free.residual < tol).all() and int(free.steps.max()) < 200
    p32 = _cast_problem(p, torch.float32)
    fixed = relax_reference(p32["states"], p32["couplings"], p32["drives"], max_steps=200,
                            tol=1e-7)
    for g, w in zip(free.states, fixed.states):
        torch.testing.assert_close(g.float(), w, rtol=0, atol=REDUCED_ATOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shared_pre", [False, True])
def test_reduced_precision_hebbian_matches_float32(dtype, shared_pre):
    post_n, pre_n, post_f, pre_f = (t.to(dtype) for t in _phases(16, 5, 3, torch.float32))
    if shared_pre:
        pre_f = pre_n
    kw = dict(post_activation="tanh", pre_activation="sigmoid")
    grad_w, grad_b = hebbian_update(post_n, pre_n, post_f, pre_f, 0.5, **kw)
    want_w, want_b = hebbian_update_reference(*(t.float() for t in (post_n, pre_n, post_f, pre_f)),
                                              0.5, **kw)
    assert grad_w.dtype == grad_b.dtype == dtype
    # one rounding of each activity and of the result, relative to the update's scale
    scale = want_w.abs().max().item()
    torch.testing.assert_close(grad_w.float(), want_w, rtol=0, atol=8 * REDUCED_ATOL[dtype] * scale)
    torch.testing.assert_close(grad_b.float(), want_b, rtol=0,
                               atol=8 * REDUCED_ATOL[dtype] * want_b.abs().max().item())


def test_autocast_relaxes_in_the_autocast_dtype():
    """Under torch.autocast the op casts its float32 inputs to the autocast dtype: the same
    result as the explicit bfloat16 call; the Hebbian update is then computed in float32."""
    p = make_problem("tied", 5, torch.float32, loss="mse")
    kw = dict(activation="tanh", max_steps=10, beta=0.5, loss="mse")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = relax(p["states"], p["couplings"], p["drives"], target=p["target"], **kw)
        grad_w, _ = hebbian_update(got.states[1], got.states[0], p["states"][1], p["states"][0],
                                   0.5)
    b = _cast_problem(p, torch.bfloat16)
    want = relax(b["states"], b["couplings"], b["drives"], target=b["target"], **kw)
    for g, w in zip(got.states, want.states):
        assert g.dtype == torch.bfloat16 and torch.equal(g, w)
    assert grad_w.dtype == torch.float32
    torch.testing.assert_close(grad_w, hebbian_update_reference(
        got.states[1].float(), got.states[0].float(), p["states"][1], p["states"][0], 0.5)[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_opcheck_reduced_precision(dtype):
    p = _cast_problem(make_problem("tied", 3, torch.float32, readout=True, loss="cross_entropy"),
                      dtype)
    args, kwargs = _relax_args(p)
    torch.library.opcheck(torch.ops.toreq.relax.default, args, kwargs)
    post_n, pre_n, post_f, pre_f = (t.to(dtype) for t in _phases(4, 5, 3, torch.float32))
    torch.library.opcheck(torch.ops.toreq.hebbian_update.default,
                          (post_n, pre_n, post_f, pre_f, 0.5, "tanh", "identity"))


# --------------------------------------------------------------------------- autograd stance
GRAPH_ERROR = "builds no graph; use toreq.ops.(relax|hebbian_update) or an estimator"


@pytest.mark.parametrize("argument", ["states", "drives", "weights", "target", "readout_weight"])
def test_relax_op_rejects_tensors_that_require_grad(argument):
    """torch.ops.toreq.relax called directly (batch > 1) with a tensor that requires grad: a
    clear error naming it, not a failing GEMM inside the kernel; under no_grad it runs."""
    p = make_problem("tied", 4, torch.float32, readout=True, loss="cross_entropy")
    args, kwargs = _relax_args(p)
    states, drives, weights = (list(a) for a in args[:3])
    name = {"states": "states[0]", "drives": "drives[0]", "weights": "weights[0]",
            "target": "target", "readout_weight": "readout_weight"}[argument]
    if argument in ("states", "drives", "weights"):
        chosen = {"states": states, "drives": drives, "weights": weights}[argument]
        chosen[0] = chosen[0].clone().requires_grad_()
    else:
        kwargs[argument] = kwargs[argument].clone().requires_grad_()
    with pytest.raises(RuntimeError, match=GRAPH_ERROR) as error:
        torch.ops.toreq.relax(states, drives, weights, *args[3:], **kwargs)
    assert f"{name} requires grad" in str(error.value)
    with torch.no_grad():
        out, steps, _ = torch.ops.toreq.relax(states, drives, weights, *args[3:], **kwargs)
    want = relax(p["states"], p["couplings"], p["drives"], **{k: v for k, v in kwargs.items()
                                                             if k != "readout_weight"},
                 readout_weight=p["readout_weight"])
    for g, w in zip(out, want.states):
        torch.testing.assert_close(g, w)
    # opcheck's autograd registration test: the op has a kernel at the Autograd key
    torch.library.opcheck(torch.ops.toreq.relax.default, (states, drives, weights, *args[3:]),
                          kwargs, test_utils="test_autograd_registration")


def test_hebbian_ops_reject_tensors_that_require_grad():
    post_n, pre_n, post_f, pre_f = _phases(6, 5, 3, torch.float32)
    pre_n.requires_grad_()
    with pytest.raises(RuntimeError, match=GRAPH_ERROR + r" \(pre_nudged requires grad"):
        torch.ops.toreq.hebbian_update(post_n, pre_n, post_f, pre_f, 0.5)
    grad_w, grad_b = torch.zeros(5, 3), torch.zeros(5)
    with pytest.raises(RuntimeError, match=GRAPH_ERROR):
        torch.ops.toreq.hebbian_update_(post_n, pre_n, post_f, pre_f, 0.5, "identity",
                                        "identity", grad_w, grad_b)
    with torch.no_grad():
        got_w, got_b = torch.ops.toreq.hebbian_update(post_n, pre_n, post_f, pre_f, 0.5)
    want_w, want_b = hebbian_update_reference(post_n, pre_n.detach(), post_f, pre_f, 0.5)
    torch.testing.assert_close(got_w, want_w)
    torch.testing.assert_close(got_b, want_b)
    # the wrapper detaches, so it runs with grad mode on
    torch.testing.assert_close(hebbian_update(post_n, pre_n, post_f, pre_f, 0.5)[0], want_w)
    torch.library.opcheck(torch.ops.toreq.hebbian_update.default,
                          (post_n, pre_n, post_f, pre_f, 0.5, "identity", "identity"),
                          test_utils="test_autograd_registration")
    torch.library.opcheck(torch.ops.toreq.hebbian_update_.default,
                          (post_n, pre_n, post_f, pre_f, 0.5, "identity", "identity", grad_w,
                           grad_b), test_utils="test_autograd_registration")


# --------------------------------------------------------------------------- hebbian vs reference
def _phases(batch, n_post, n_pre, dtype, seed=0):
    torch.manual_seed(seed)
    return [torch.randn(batch, n, dtype=dtype) for n in (n_post, n_pre, n_post, n_pre)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 6])
@pytest.mark.parametrize("post_activation,pre_activation",
                         [("identity", "identity"), ("tanh", "hard_sigmoid"), ("sigmoid", "tanh")])
@pytest.mark.parametrize("shared_pre", [False, True])
def test_hebbian_matches_reference(dtype, batch, post_activation, pre_activation, shared_pre):
    post_n, pre_n, post_f, pre_f = _phases(batch, 5, 3, dtype)
    if shared_pre:
        pre_f = pre_n
    kw = dict(post_activation=post_activation, pre_activation=pre_activation)
    grad_w, grad_b = hebbian_update(post_n, pre_n, post_f, pre_f, 0.3, **kw)
    want_w, want_b = hebbian_update_reference(post_n, pre_n, post_f, pre_f, 0.3, **kw)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else {}
    torch.testing.assert_close(grad_w, want_w, **tol)
    torch.testing.assert_close(grad_b, want_b, **tol)
    # Accumulating into existing gradients adds the same update.
    acc_w, acc_b = torch.ones(5, 3, dtype=dtype), torch.ones(5, dtype=dtype)
    hebbian_update(post_n, pre_n, post_f, pre_f, 0.3, grad_weight=acc_w, grad_bias=acc_b, **kw)
    torch.testing.assert_close(acc_w, want_w + 1, **tol)
    torch.testing.assert_close(acc_b, want_b + 1, **tol)


def test_hebbian_is_the_difference_of_the_energy_gradients():
    """-1/(beta B) (dPhi/dtheta at the nudged phase - at the free phase), Phi by autograd."""
    torch.manual_seed(1)
    post_n, pre_n, post_f, pre_f = _phases(4, 5, 3, torch.float64)
    weight = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)

    def energy_gradients(post, pre):
        phi = (torch.tanh(post) @ weight * torch.sigmoid(pre)).sum() + (torch.tanh(post) @ bias).sum()
        return torch.autograd.grad(phi, (weight, bias))

    beta = 0.2
    (w_n, b_n), (w_f, b_f) = energy_gradients(post_n, pre_n), energy_gradients(post_f, pre_f)
    # Phi above pairs row i of post with row i of pre through W: sum_b post_b^T W pre_b.
    grad_w, grad_b = hebbian_update(post_n, pre_n, post_f, pre_f, beta, post_activation="tanh",
                                    pre_activation="sigmoid")
    torch.testing.assert_close(grad_w, -(w_n - w_f) / (beta * 4))
    torch.testing.assert_close(grad_b, -(b_n - b_f) / (beta * 4))


def test_hebbian_in_place_without_bias():
    post_n, pre_n, post_f, pre_f = _phases(3, 4, 2, torch.float64)
    acc = torch.zeros(4, 2, dtype=torch.float64)
    out_w, out_b = hebbian_update(post_n, pre_n, post_f, pre_f, 1.0, grad_weight=acc)
    assert out_w is acc and out_b is None
    torch.testing.assert_close(acc, hebbian_update_reference(post_n, pre_n, post_f, pre_f, 1.0)[0])


# --------------------------------------------------------------------------- opcheck and compile
def _relax_args(problem, **overrides):
    c = problem["couplings"]
    kwargs = dict(activation="tanh", damping=0.1, max_steps=5, tol=0.0, schedule="async",
                  beta=0.3, loss=problem["loss"], target=problem["target"],
                  readout_weight=problem.get("readout_weight"),
                  readout_bias=problem.get("readout_bias"))
    kwargs.update(overrides)
    args = (problem["states"], problem["drives"], [x.weight for x in c], [x.target for x in c],
            [x.source for x in c], [x.transposed for x in c])
    return args, kwargs


@pytest.mark.parametrize("kind,readout,loss", [("looped", False, "mse"), ("tied", True, "cross_entropy"),
                                               ("untied", False, "gradient")])
def test_opcheck_relax(kind, readout, loss):
    p = make_problem(kind, 3, torch.float64, readout=readout, loss=loss)
    args, kwargs = _relax_args(p)
    torch.library.opcheck(torch.ops.toreq.relax.default, args, kwargs)
    args, kwargs = _relax_args(p, nudge_position="outside")
    torch.library.opcheck(torch.ops.toreq.relax.default, args, kwargs)


@pytest.mark.parametrize("shared_pre", [False, True])
def test_opcheck_hebbian(shared_pre):
    post_n, pre_n, post_f, pre_f = _phases(4, 5, 3, torch.float64)
    if shared_pre:
        pre_f = pre_n
    torch.library.opcheck(torch.ops.toreq.hebbian_update.default,
                          (post_n, pre_n, post_f, pre_f, 0.5, "tanh", "identity"))
    grad_w, grad_b = torch.zeros(5, 3, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    torch.library.opcheck(torch.ops.toreq.hebbian_update_.default,
                          (post_n, pre_n, post_f, pre_f, 0.5, "tanh", "identity", grad_w, grad_b))


def test_compiled_eqprop_step_matches_eager():
    """A whole EqProp gradient computation compiles with fullgraph=True (no graph breaks)."""
    p = make_problem("tied", 4, torch.float32, readout=False)
    weights = [p["couplings"][0].weight, p["couplings"][2].weight]

    def eqprop_grads(x_drive, target):
        drives = [x_drive, None, None]
        couplings = layered_couplings(weights)
        free = relax(p["states"], couplings, drives, max_steps=8)
        nudged = relax(free.states, couplings, drives, max_steps=4, beta=0.5, target=target)
        return [hebbian_update(nudged.states[i + 1], nudged.states[i], free.states[i + 1],
                               free.states[i], 0.5)[0] for i in range(2)]

    eager = eqprop_grads(p["drives"][0], p["target"])
    compiled = torch.compile(eqprop_grads, fullgraph=True, backend="aot_eager")(p["drives"][0], p["target"])
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- bad input
BAD_RELAX = [
    ("states", lambda a, k: ([a[0][0].unsqueeze(0)] + a[0][1:],), "states\\[0\\] must be 2-D"),
    ("states", lambda a, k: ([a[0][0].float()] + a[0][1:],), "states\\[0\\] .*float32|states\\[1\\] has dtype"),
    ("states", lambda a, k: ([a[0][0], a[0][1][:2], a[0][2]],), "states\\[1\\] has batch 2"),
    ("drives", lambda a, k: ((a[1][:1]),), "drives must be empty or hold one entry"),
    ("drives", lambda a, k: ([a[1][0][:, :2]] + a[1][1:],), "drives\\[0\\] must have shape"),
    ("weights", lambda a, k: ([a[2][0].T] + a[2][1:],), "weights\\[0\\] couples layer 0"),
    ("targets", lambda a, k: ([7] + a[3][1:],), "targets\\[0\\] = 7 is not a layer index"),
    ("sources", lambda a, k: ([-1] + a[4][1:],), "sources\\[0\\] = -1"),
    ("transposed", lambda a, k: (a[5][:-1],), "equal lengths"),
]
BAD_RELAX_KW = [
    (dict(activation="relu"), "activation must be one of"),
    (dict(damping=1.0), "damping is the weight of the old state"),
    (dict(damping=-0.1), "damping"),
    (dict(max_steps=-1), "max_steps must be >= 0"),
    (dict(tol=-1e-3), "tol must be finite and >= 0"),
    (dict(tol=float("nan")), "tol must be finite"),
    (dict(beta=float("inf")), "beta must be finite"),
    (dict(schedule="random"), "schedule must be 'sync' or 'async'"),
    (dict(loss="hinge"), "loss must be 'mse', 'cross_entropy' or 'gradient'"),
    (dict(target=None), "target is required"),
    (dict(target=torch.zeros(3, 2, dtype=torch.float64)), "target must have shape \\(3, 4\\)"),
    (dict(readout_weight=torch.zeros(4, 2, dtype=torch.float64)), "readout_weight must have shape"),
    (dict(readout_bias=torch.zeros(2, dtype=torch.float64)), "readout_bias must have shape \\(4,\\)"),
    (dict(readout_weight=torch.zeros(4, 5, dtype=torch.float32)), "readout_weight has dtype"),
]


@pytest.mark.parametrize("argument,mutate,message", BAD_RELAX)
def test_relax_rejects_bad_arguments(argument, mutate, message):
    p = make_problem("tied", 3, torch.float64, readout=True, loss="cross_entropy")
    args, kwargs = _relax_args(p)
    index = ["states", "drives", "weights", "targets", "sources", "transposed"].index(argument)
    args = list(args)
    args[index] = mutate(args, kwargs)[0]
    with pytest.raises(RuntimeError, match=message):
        torch.ops.toreq.relax(*args, **kwargs)


@pytest.mark.parametrize("override,message", BAD_RELAX_KW)
def test_relax_rejects_bad_options(override, message):
    p = make_problem("tied", 3, torch.float64, readout=True, loss="cross_entropy")
    args, kwargs = _relax_args(p, **override)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.toreq.relax(*args, **kwargs)


def test_relax_names_a_non_finite_input():
    p = make_problem("tied", 3, torch.float64)
    p["drives"][0][1, 2] = float("nan")
    with pytest.raises(RuntimeError, match="step 1 in 1 of 3 samples because drives\\[0\\] holds NaN"):
        relax(p["states"], p["couplings"], p["drives"], max_steps=5)


def test_relax_reports_divergence_from_finite_inputs():
    # Finite but huge readout weights overflow the logits: softmax(inf) is NaN.
    p = make_problem("tied", 2, torch.float32, readout=True, loss="cross_entropy")
    huge = torch.full_like(p["readout_weight"], 3e38)
    with pytest.raises(RuntimeError, match="diverged .* although every input is finite. Lower beta"):
        relax(p["states"], p["couplings"], p["drives"], beta=0.5, loss="cross_entropy",
              target=p["target"], readout_weight=huge, max_steps=5)


@pytest.mark.parametrize("call,message", [
    (lambda t: hebbian_update(t[0][:, :, None], *t[1:], 0.1), "post_nudged .*must be 2-D"),
    (lambda t: hebbian_update(t[0], t[1], t[2][:, :2], t[3], 0.1), "post_free has shape"),
    (lambda t: hebbian_update(t[0], t[1][:2], t[2], t[3], 0.1), "pre_nudged has batch 2"),
    (lambda t: hebbian_update(t[0], t[1], t[2], t[3][:, :1], 0.1), "pre_free has shape"),
    (lambda t: hebbian_update(t[0], t[1].float(), t[2], t[3], 0.1), "pre_nudged has dtype"),
    (lambda t: hebbian_update(*t, 0.0), "beta must be finite and non-zero"),
    (lambda t: hebbian_update(*t, float("nan")), "beta must be finite and non-zero"),
    (lambda t: hebbian_update(*t, 0.1, post_activation="relu"), "post_activation must be one of"),
    (lambda t: hebbian_update(*(x[:0] for x in t), 0.1), "the batch is empty"),
    (lambda t: hebbian_update(*t, 0.1, grad_weight=torch.zeros(3, 5, dtype=torch.float64)),
     "grad_weight must have shape \\(5, 3\\)"),
    (lambda t: hebbian_update(*t, 0.1, grad_weight=torch.zeros(5, 3)), "grad_weight must be Double"),
    (lambda t: hebbian_update(*t, 0.1, grad_weight=torch.zeros(5, 3, dtype=torch.float64),
                              grad_bias=torch.zeros(3, dtype=torch.float64)), "grad_bias must have shape"),
    (lambda t: hebbian_update(*(x.long() for x in t), 0.1), "float32, float64, float16 or bfloat16"),
])
def test_hebbian_rejects_bad_arguments(call, message):
    with pytest.raises(RuntimeError, match=message):
        call(_phases(4, 5, 3, torch.float64))


# --------------------------------------------------------------------------- max_pool2d
def _pool_inputs(shape, dtype, seed=0, ties=False):
    torch.manual_seed(seed)
    if ties:  # few distinct values: most windows hold a tie
        return torch.randint(-2, 3, shape).to(dtype)
    return torch.randn(shape, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,size", [((3, 4, 8, 8), 2), ((2, 3, 7, 9), 2), ((2, 2, 9, 7), 3),
                                        ((1, 1, 5, 5), 1), ((5, 2, 4, 6), 4), ((64, 3, 6, 6), 2)])
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_matches_max_pool2d(dtype, shape, size, ties):
    assert has_kernel("max_pool2d", "cpu")
    z = _pool_inputs(shape, dtype, ties=ties)
    values, indices = torch.ops.toreq.max_pool2d(z, size)
    want_values, want_indices = max_pool2d_reference(z, size)
    assert values.dtype == dtype and indices.dtype == torch.long
    assert torch.equal(values, want_values)
    assert torch.equal(indices, want_indices)  # the first maximum of each window on ties


def test_max_pool_takes_nan_and_infinities_as_max_pool2d_does():
    z = torch.randn(2, 3, 6, 6)
    z[0, 0, 0, 1] = float("nan")  # one NaN in a window
    z[0, 1, 2, 2] = z[0, 1, 3, 3] = float("nan")  # two: the last one wins
    z[1, 0, :2, :2] = float("-inf")  # a window of -inf: its first element
    z[1, 2, 4, 5] = float("inf")
    for size in (2, 3):
        values, indices = max_pool2d(z, size)
        want_values, want_indices = max_pool2d_reference(z, size)
        torch.testing.assert_close(values, want_values, equal_nan=True, rtol=0, atol=0)
        assert torch.equal(indices, want_indices)


def test_max_pool_reads_non_contiguous_input():
    z = torch.randn(3, 8, 10, 4).permute(0, 3, 1, 2)  # (3, 4, 8, 10), channels last in memory
    for got, want in zip(max_pool2d(z, 2), max_pool2d_reference(z, 2)):
        assert torch.equal(got, want)


def test_max_pool_gradient_goes_to_the_argmax():
    """Through the op's registered autograd (the wrapper's path on one thread)."""
    z = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: max_pool2d(t, 2)[0], (z,))
    grad = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    (got,) = torch.autograd.grad(max_pool2d(z, 2)[0], z, grad)
    (want,) = torch.autograd.grad(max_pool2d_reference(z, 2)[0], z, grad)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_max_pool_opcheck(dtype):
    z = torch.randn(2, 3, 6, 7, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.toreq.max_pool2d.default, (z, 2))
    torch.library.opcheck(torch.ops.toreq.max_pool2d.default, (z.detach(), 3))


def test_traced_programs_pool_with_the_reference():
    """torch.export sees plain ATen (the wrapper calls F.max_pool2d while tracing)."""

    class Pool(torch.nn.Module):
        def forward(self, z):
            return max_pool2d(z, 2)[0]

    program = torch.export.export(Pool(), (torch.randn(2, 3, 4, 4),))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("toreq" in t for t in targets), targets
    z = torch.randn(2, 3, 4, 4)
    assert torch.equal(program.module()(z), max_pool2d_reference(z, 2)[0])


@pytest.mark.parametrize("args,message", [
    ((torch.randn(3, 4, 4), 2), "input must be 4-D"),
    ((torch.randint(0, 3, (1, 1, 4, 4)), 2), "input must be float32, float64"),
    ((torch.randn(1, 1, 4, 4), 0), "size must be >= 1, got 0"),
    ((torch.randn(1, 1, 4, 3), 4), r"height and width \(4, 3\) must be at least size = 4"),
])
def test_max_pool_rejects_bad_input_with_a_clear_message(args, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.toreq.max_pool2d(*args)


def test_function_transforms_pool_with_the_reference():
    z, tangent = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    values, derivative = torch.func.jvp(lambda t: max_pool2d(t, 2)[0], (z,), (tangent,))
    _, indices = max_pool2d_reference(z, 2)
    assert torch.equal(values, max_pool2d_reference(z, 2)[0])
    assert torch.equal(derivative, tangent.flatten(2).gather(2, indices.flatten(2)).view_as(values))
