"""toreq's CUDA kernels against the CPU kernels and the pure-PyTorch references.

Every test here needs a CUDA device *and* a build of toreq with its CUDA kernels; elsewhere the
whole module is skipped. Problems are built on the CPU with a fixed seed and copied to the GPU,
so the CPU kernel, the CUDA kernel and the references all see the same numbers.
"""

from __future__ import annotations

import pytest
import torch

from toreq.ops import (
    Coupling,
    hebbian_update,
    hebbian_update_reference,
    max_pool2d_reference,
    relax,
    relax_reference,
)
from toreq.ops._dispatch import has_kernel

from op_problems import make_problem

HAS_CUDA_KERNELS = (
    torch.cuda.is_available()
    and has_kernel("relax", "cuda")
    and has_kernel("hebbian_update", "cuda")
    and has_kernel("hebbian_update_", "cuda")
    and has_kernel("max_pool2d", "cuda")
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not HAS_CUDA_KERNELS,
                       reason="needs a CUDA device and a toreq build with its CUDA kernels"),
]


@pytest.fixture(autouse=True)
def _ieee_matmul():
    """cuBLAS in full float32 precision (no TF32), so GPU and CPU GEMMs agree to rounding."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(saved)


def _tolerances(dtype: torch.dtype) -> dict:
    # GEMMs summed in another order, FMA contraction and the device's tanh/exp differ from the
    # CPU by a few ulps; the contracting dynamics keep those from growing.
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-11)


def to_device(problem: dict, device="cuda") -> dict:
    moved = {}
    for key, value in problem.items():
        if isinstance(value, torch.Tensor):
            moved[key] = value.to(device)
        elif key == "couplings":
            moved[key] = [Coupling(c.weight.to(device), c.target, c.source, c.transposed)
                          for c in value]
        elif isinstance(value, list):
            moved[key] = [None if v is None else v.to(device) for v in value]
        else:
            moved[key] = value
    return moved


def run_relax(problem: dict, fn=relax, **kwargs):
    return fn(problem["states"], problem["couplings"], problem["drives"], **kwargs)


def nudge_kwargs(problem: dict) -> dict:
    return dict(loss=problem["loss"], target=problem["target"],
                readout_weight=problem.get("readout_weight"),
                readout_bias=problem.get("readout_bias"))


def assert_same_result(result, expected, dtype, device):
    """Equal step counts, and states and residuals equal up to rounding, compared on `device`."""
    tol = _tolerances(dtype)
    assert len(result.states) == len(expected.states)
    for got, want in zip(result.states, expected.states):
        assert got.device == torch.device(device) and got.dtype == dtype and got.is_contiguous()
        torch.testing.assert_close(got, want.to(got.device), **tol)
    assert result.steps.device == torch.device(device) and result.steps.dtype == torch.long
    assert result.steps.cpu().tolist() == expected.steps.cpu().tolist()
    assert result.residual.device == torch.device(device) and result.residual.dtype == dtype
    torch.testing.assert_close(result.residual, expected.residual.to(result.residual.device),
                               **tol)


def check_relax_parity(problem: dict, dtype: torch.dtype, device="cuda", **kwargs):
    """The CUDA kernel against the CPU kernel and against the reference run on the GPU.

    `problem` and the tensors in `kwargs` are on the CPU; they are copied to `device`.
    """
    on_gpu = to_device(problem, device)
    gpu_kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                  for k, v in kwargs.items()}
    got = run_relax(on_gpu, **gpu_kwargs)
    assert_same_result(got, run_relax(problem, **kwargs), dtype, device)
    assert_same_result(got, run_relax(on_gpu, relax_reference, **gpu_kwargs), dtype, device)
    return got


# --------------------------------------------------------------------------- relax
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["looped", "tied", "untied", "ring"])
@pytest.mark.parametrize("batch", [1, 7, 33])
@pytest.mark.parametrize("schedule", ["sync", "async"])
def test_free_phase_matches_cpu_and_reference(dtype, kind, batch, schedule):
    p = make_problem(kind, batch, dtype)
    for damping, activation in [(0.0, "hard_sigmoid"), (0.4, "tanh"), (0.2, "sigmoid"),
                                (0.1, "steep_sigmoid")]:
        got = check_relax_parity(p, dtype, activation=activation, damping=damping, max_steps=25,
                                 schedule=schedule)
        assert got.steps.tolist() == [25] * batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("schedule", ["sync", "async"])
def test_wide_layers_and_large_batch(dtype, schedule):
    # 300 and 257 units take a block several passes per row; 4099 rows exceed the kernel's
    # block count, so blocks also take several rows.
    p = make_problem("wide", 4099, dtype, readout=True, loss="cross_entropy")
    check_relax_parity(p, dtype, activation="sigmoid", damping=0.3, max_steps=11,
                       schedule=schedule, beta=0.4, **nudge_kwargs(p))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["looped", "tied", "untied"])
@pytest.mark.parametrize("loss,readout", [("mse", False), ("mse", True), ("cross_entropy", True),
                                          ("cross_entropy", False), ("gradient", False)])
@pytest.mark.parametrize("damping", [0.0, 0.25])
@pytest.mark.parametrize("schedule", ["sync", "async"])
@pytest.mark.parametrize("nudge_position", ["inside", "outside"])
def test_nudged_phase_matches_cpu_and_reference(dtype, kind, loss, readout, damping, schedule,
                                                nudge_position):
    p = make_problem(kind, 5, dtype, readout=readout, loss=loss)
    for beta in (0.5, -0.5):
        got = check_relax_parity(p, dtype, activation="tanh", damping=damping, max_steps=15,
                                 schedule=schedule, beta=beta, nudge_position=nudge_position,
                                 **nudge_kwargs(p))
        free = run_relax(to_device(p), activation="tanh", damping=damping, max_steps=15,
                         schedule=schedule)
        assert not torch.allclose(got.states[-1], free.states[-1]), "the nudge had no effect"


def test_class_labels_are_one_hot_targets():
    p = to_device(make_problem("tied", 6, torch.float64, readout=True, loss="cross_entropy"))
    labels = p["target"].argmax(dim=1)
    kw = dict(beta=0.3, loss="cross_entropy", readout_weight=p["readout_weight"], max_steps=10)
    by_label = run_relax(p, target=labels, **kw)
    by_rows = run_relax(p, target=p["target"], **kw)
    assert_same_result(by_label, by_rows, torch.float64, "cuda")


@pytest.mark.parametrize("kind", ["looped", "tied", "untied", "ring"])
@pytest.mark.parametrize("schedule", ["sync", "async"])
@pytest.mark.parametrize("batch", [1, 9])
def test_early_stop_matches_cpu_and_reference_per_sample(kind, schedule, batch):
    p = make_problem(kind, batch, torch.float64)
    got = check_relax_parity(p, torch.float64, activation="tanh", damping=0.3, max_steps=200,
                             tol=1e-6, schedule=schedule)
    assert (got.steps < 200).all()
    if batch > 1:
        assert len(set(got.steps.tolist())) > 1


def test_early_stop_across_check_windows_is_exact():
    # No coupling, damping 1/2, drive d = 1/2 and s0 = d + 2^-a: the state halves its distance to
    # d each step, exactly, so step t changes it by 2^-(a+t), which drops below tol = 2^-20 first
    # at t = 21 - a. The chosen a put the stops inside, at the end of and past the kernel's
    # 8-step check windows; steps run after a sample stopped must leave it untouched.
    exponents = [None, 16, 13, 12, 5, 4]  # None: s0 = d, converged at step 1
    expected_steps = [1, 5, 8, 9, 16, 17]
    d = torch.full((len(exponents), 1), 0.5, dtype=torch.float64)
    offsets = torch.tensor([[0.0 if a is None else 2.0 ** -a] for a in exponents],
                           dtype=torch.float64)
    s0 = d + offsets
    zero = torch.zeros(1, 1, dtype=torch.float64)
    for device in ("cpu", "cuda"):
        args = ([s0.to(device)], [Coupling(zero.to(device), 0, 0)], [d.to(device)])
        result = relax(*args, damping=0.5, tol=2.0 ** -20, max_steps=50)
        assert result.steps.tolist() == expected_steps, device
        want_residual = [0.0] + [2.0 ** -21] * (len(exponents) - 1)
        assert result.residual.tolist() == want_residual, device
        want_state = [0.5] + [0.5 + 2.0 ** -21] * (len(exponents) - 1)
        assert result.states[0].squeeze(1).tolist() == want_state, device
        capped = relax(*args, damping=0.5, tol=2.0 ** -20, max_steps=9)
        assert capped.steps.tolist() == [1, 5, 8, 9, 9, 9], device


def test_zero_steps_and_empty_batch():
    p = to_device(make_problem("tied", 2, torch.float64))
    result = run_relax(p, max_steps=0)
    for s, s0 in zip(result.states, p["states"]):
        assert torch.equal(s, s0) and s.device == s0.device
    assert result.steps.tolist() == [0, 0] and torch.isinf(result.residual).all()
    empty = to_device(make_problem("tied", 0, torch.float64))
    result = run_relax(empty, max_steps=5)
    assert [s.shape for s in result.states] == [s.shape for s in empty["states"]]
    assert result.steps.shape == (0,) and result.residual.shape == (0,)


def test_noncontiguous_inputs_give_the_same_result():
    p = make_problem("tied", 6, torch.float32, readout=True, loss="cross_entropy")
    kw = dict(beta=0.5, max_steps=12, **nudge_kwargs(p))
    want = run_relax(p, **kw)
    g = to_device(p)
    states = [s.T.contiguous().T for s in g["states"]]
    couplings = [Coupling(c.weight.T.contiguous().T, c.target, c.source, c.transposed)
                 for c in g["couplings"]]
    drives = [g["drives"][0].repeat(1, 2)[:, : g["drives"][0].shape[1]]] + g["drives"][1:]
    assert not states[0].is_contiguous() and not couplings[0].weight.is_contiguous()
    assert not drives[0].is_contiguous()
    got = relax(states, couplings, drives, beta=0.5, max_steps=12,
                **{**nudge_kwargs(g), "readout_weight": g["readout_weight"].T.contiguous().T})
    assert_same_result(got, want, torch.float32, "cuda")


def test_relax_does_not_modify_inputs():
    p = to_device(make_problem("tied", 3, torch.float64))
    before = [s.clone() for s in p["states"]]
    result = run_relax(p, max_steps=20)
    for s, b, out in zip(p["states"], before, result.states):
        assert torch.equal(s, b) and out.data_ptr() != s.data_ptr()


def test_relax_runs_on_the_current_stream():
    p = make_problem("untied", 17, torch.float32, readout=True, loss="mse")
    want = run_relax(p, beta=0.2, max_steps=20, **nudge_kwargs(p))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        # Made, used and read on the side stream: correct only if every kernel of the op is
        # ordered on it (the default stream is not synchronised with it here).
        g = to_device(p)
        got = run_relax(g, beta=0.2, max_steps=20, **nudge_kwargs(g))
        states = [s.cpu() for s in got.states]
        steps, residual = got.steps.cpu(), got.residual.cpu()
    stream.synchronize()
    for a, b in zip(states, want.states):
        torch.testing.assert_close(a, b, **_tolerances(torch.float32))
    assert steps.tolist() == want.steps.tolist()
    torch.testing.assert_close(residual, want.residual, **_tolerances(torch.float32))


# --------------------------------------------------------------------------- non-finite states
def test_relax_names_a_non_finite_input():
    p = make_problem("tied", 3, torch.float64)
    p["drives"][0][1, 2] = float("nan")
    message = "step 1 in 1 of 3 samples because drives\\[0\\] holds NaN"
    with pytest.raises(RuntimeError, match=message):
        run_relax(to_device(p), max_steps=5)
    with pytest.raises(RuntimeError, match=message):
        run_relax(p, max_steps=5)


def _shift_register(chain: int, dtype=torch.float64):
    """A looped layer whose state turns NaN at step chain + 1, in the samples with drive 0.

    Units 0..chain-1 form a shift register (unit i+1 copies unit i, hard sigmoid, no damping):
    unit 0 is driven to its per-sample drive, so a drive of 0 travels down the chain and unit
    chain-1 first holds 0 after step `chain`. The last unit reads unit chain-1 through an
    infinite weight: inf * 0.5 = inf saturates it to 1, but inf * 0 = NaN at the next step.
    """
    n = chain + 1
    w = torch.zeros(n, n, dtype=dtype)
    for i in range(chain - 1):
        w[i + 1, i] = 1.0
    w[chain, chain - 1] = float("inf")
    drive0 = torch.tensor([0.0, 0.5, 0.0], dtype=dtype)
    drive = torch.zeros(3, n, dtype=dtype)
    drive[:, 0] = drive0
    states = torch.full((3, n), 0.5, dtype=dtype)
    return [states], [Coupling(w, 0, 0)], [drive]


@pytest.mark.parametrize("chain", [1, 7, 8, 15, 16])
def test_non_finite_state_is_reported_at_its_step(chain):
    # Steps 2, 8, 9, 16 and 17: inside, at the end of and just after the kernel's 8-step check
    # windows; the message must name the first step, as the CPU kernel's does.
    states, couplings, drives = _shift_register(chain)
    message = (f"state became NaN or Inf at step {chain + 1} in 2 of 3 samples because a weight "
               "coupling into layer 0 holds NaN or Inf values")
    with pytest.raises(RuntimeError, match=message):
        relax(states, couplings, drives, max_steps=40)  # the CPU kernel: the expected message
    gpu = to_device(dict(states=states, couplings=couplings, drives=drives))
    with pytest.raises(RuntimeError, match=message):
        run_relax(gpu, max_steps=40)
    # A NaN after the last step is never reached.
    result = run_relax(gpu, max_steps=chain)
    assert result.steps.tolist() == [chain] * 3


def test_relax_reports_divergence_from_finite_inputs():
    # Finite but huge readout weights overflow the logits: softmax(inf) is NaN.
    p = to_device(make_problem("tied", 2, torch.float32, readout=True, loss="cross_entropy"))
    huge = torch.full_like(p["readout_weight"], 3e38)
    with pytest.raises(RuntimeError, match="diverged .* although every input is finite. Lower beta"):
        run_relax(p, beta=0.5, loss="cross_entropy", target=p["target"], readout_weight=huge,
                  max_steps=5)


# --------------------------------------------------------------------------- hebbian_update
def _phases(batch, n_post, n_pre, dtype, seed=0):
    torch.manual_seed(seed)
    return [torch.randn(batch, n, dtype=dtype) for n in (n_post, n_pre, n_post, n_pre)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 5, 3), (6, 5, 3), (37, 300, 129)])
@pytest.mark.parametrize("post_activation,pre_activation",
                         [("identity", "identity"), ("tanh", "hard_sigmoid"), ("sigmoid", "tanh"),
                          ("hard_sigmoid", "sigmoid")])
@pytest.mark.parametrize("shared_pre", [False, True])
def test_hebbian_matches_cpu_and_reference(dtype, shape, post_activation, pre_activation,
                                           shared_pre):
    batch, n_post, n_pre = shape
    phases = _phases(batch, n_post, n_pre, dtype)
    if shared_pre:
        phases[3] = phases[1]
    gpu = [t.cuda() for t in phases]
    if shared_pre:
        gpu[3] = gpu[1]  # the same tensor, so the one-GEMM path is taken
    kw = dict(post_activation=post_activation, pre_activation=pre_activation)
    tol = _tolerances(dtype)
    grad_w, grad_b = hebbian_update(*gpu, 0.3, **kw)
    assert grad_w.device.type == "cuda" and grad_w.dtype == dtype and grad_w.shape == (n_post, n_pre)
    cpu_w, cpu_b = hebbian_update(*phases, 0.3, **kw)
    ref_w, ref_b = hebbian_update_reference(*gpu, 0.3, **kw)
    for want_w, want_b in ((cpu_w, cpu_b), (ref_w, ref_b)):
        torch.testing.assert_close(grad_w, want_w.cuda(), **tol)
        torch.testing.assert_close(grad_b, want_b.cuda(), **tol)
    # Accumulating into existing gradients adds the same update, with and without a bias.
    acc_w = torch.ones(n_post, n_pre, dtype=dtype, device="cuda")
    acc_b = torch.ones(n_post, dtype=dtype, device="cuda")
    out_w, out_b = hebbian_update(*gpu, 0.3, grad_weight=acc_w, grad_bias=acc_b, **kw)
    assert out_w is acc_w and out_b is acc_b
    torch.testing.assert_close(acc_w, cpu_w.cuda() + 1, **tol)
    torch.testing.assert_close(acc_b, cpu_b.cuda() + 1, **tol)
    only_w = torch.zeros(n_post, n_pre, dtype=dtype, device="cuda")
    hebbian_update(*gpu, 0.3, grad_weight=only_w, **kw)
    torch.testing.assert_close(only_w, cpu_w.cuda(), **tol)


@pytest.mark.parametrize("post_activation,pre_activation", [("tanh", "sigmoid"),
                                                            ("identity", "hard_sigmoid")])
def test_hebbian_strided_inputs(post_activation, pre_activation):
    # Transposed and sliced activities: the CUDA kernels read them through their strides.
    phases = _phases(9, 7, 4, torch.float64, seed=3)
    strided = [t.cuda().T.contiguous().T for t in phases[:2]] + [
        t.cuda().repeat_interleave(2, dim=1)[:, ::2] for t in phases[2:]]
    assert not any(t.is_contiguous() for t in strided)
    kw = dict(post_activation=post_activation, pre_activation=pre_activation)
    got = hebbian_update(*strided, -0.7, **kw)
    want = hebbian_update(*phases, -0.7, **kw)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b.cuda(), **_tolerances(torch.float64))


# --------------------------------------------------------------------------- opcheck
def _relax_args(problem, **overrides):
    c = problem["couplings"]
    kwargs = dict(activation="tanh", damping=0.1, max_steps=5, tol=0.0, schedule="async",
                  beta=0.3, **nudge_kwargs(problem))
    kwargs.update(overrides)
    args = (problem["states"], problem["drives"], [x.weight for x in c], [x.target for x in c],
            [x.source for x in c], [x.transposed for x in c])
    return args, kwargs


@pytest.mark.parametrize("kind,readout,loss", [("looped", False, "mse"),
                                               ("tied", True, "cross_entropy"),
                                               ("untied", False, "gradient")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_relax(kind, readout, loss, dtype):
    p = to_device(make_problem(kind, 3, dtype, readout=readout, loss=loss))
    args, kwargs = _relax_args(p)
    torch.library.opcheck(torch.ops.toreq.relax.default, args, kwargs)
    args, kwargs = _relax_args(p, tol=1e-3, schedule="sync", max_steps=20)
    torch.library.opcheck(torch.ops.toreq.relax.default, args, kwargs)


@pytest.mark.parametrize("shared_pre", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_hebbian(shared_pre, dtype):
    post_n, pre_n, post_f, pre_f = (t.cuda() for t in _phases(4, 5, 3, dtype))
    if shared_pre:
        pre_f = pre_n
    torch.library.opcheck(torch.ops.toreq.hebbian_update.default,
                          (post_n, pre_n, post_f, pre_f, 0.5, "tanh", "identity"))
    grad_w = torch.zeros(5, 3, dtype=dtype, device="cuda")
    grad_b = torch.zeros(5, dtype=dtype, device="cuda")
    torch.library.opcheck(torch.ops.toreq.hebbian_update_.default,
                          (post_n, pre_n, post_f, pre_f, 0.5, "tanh", "identity", grad_w, grad_b))


# --------------------------------------------------------------------------- devices
def test_mixed_devices_are_rejected():
    p = to_device(make_problem("tied", 3, torch.float64))
    p["drives"][0] = p["drives"][0].cpu()
    with pytest.raises(RuntimeError, match="drives\\[0\\] is on cpu but states\\[0\\] is on cuda"):
        run_relax(p, max_steps=3)
    phases = [t.cuda() for t in _phases(4, 5, 3, torch.float64)]
    phases[2] = phases[2].cpu()
    with pytest.raises(RuntimeError, match="post_free is on cpu but post_nudged is on cuda"):
        torch.ops.toreq.hebbian_update(*phases, 0.5, "identity", "identity")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_non_default_device():
    # The kernels must launch on the inputs' device (and its current stream), not the current
    # device, which stays cuda:0 here.
    assert torch.cuda.current_device() == 0
    p = make_problem("untied", 5, torch.float64, readout=True, loss="cross_entropy")
    got = check_relax_parity(p, torch.float64, device="cuda:1", activation="tanh", damping=0.2,
                             max_steps=40, tol=1e-7, schedule="async", beta=0.3,
                             **nudge_kwargs(p))
    assert all(s.device == torch.device("cuda:1") for s in got.states)
    phases = _phases(6, 5, 3, torch.float64)
    on_1 = [t.to("cuda:1") for t in phases]
    grad_w, grad_b = hebbian_update(*on_1, 0.4, post_activation="tanh")
    assert grad_w.device == torch.device("cuda:1")
    want_w, want_b = hebbian_update(*phases, 0.4, post_activation="tanh")
    torch.testing.assert_close(grad_w.cpu(), want_w)
    torch.testing.assert_close(grad_b.cpu(), want_b)
    acc = torch.zeros(5, 3, dtype=torch.float64, device="cuda:1")
    hebbian_update(*on_1, 0.4, post_activation="tanh", grad_weight=acc)
    torch.testing.assert_close(acc.cpu(), want_w)
    assert torch.cuda.current_device() == 0


# --------------------------------------------------------------------------- reduced precision
# The same bounds as tests/test_ops.py: about 8 units of the dtype's roundoff on states <= 1.
REDUCED_ATOL = {torch.bfloat16: 3e-2, torch.float16: 4e-3}


def cast_problem(problem: dict, dtype: torch.dtype) -> dict:
    return {key: (value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point()
                  else [c._replace(weight=c.weight.to(dtype)) for c in value] if key == "couplings"
                  else [None if v is None else v.to(dtype) for v in value] if isinstance(value, list)
                  else value)
            for key, value in problem.items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["looped", "tied", "wide"])
@pytest.mark.parametrize("loss,readout,beta", [("mse", False, 0.0), ("mse", False, 0.5),
                                               ("cross_entropy", True, -0.5),
                                               ("gradient", False, 0.5)])
def test_reduced_precision_matches_float32_and_cpu(dtype, kind, loss, readout, beta):
    """float16/bfloat16 on the GPU against the float32 reference (same rounded inputs) and the
    CPU kernel in the same dtype, which runs the same element code (relax_element.h)."""
    p = cast_problem(make_problem(kind, 33, torch.float32, readout=readout, loss=loss), dtype)
    kw = dict(activation="tanh", damping=0.25, max_steps=30, schedule="async", beta=beta)
    got = run_relax(to_device(p), **kw, **nudge_kwargs(to_device(p)))
    p32 = cast_problem(p, torch.float32)
    want = run_relax(p32, relax_reference, **kw, **nudge_kwargs(p32))
    cpu = run_relax(p, **kw, **nudge_kwargs(p))
    assert got.residual.dtype == torch.float32 and got.steps.cpu().tolist() == [30] * 33
    for g, w, c in zip(got.states, want.states, cpu.states):
        assert g.dtype == dtype and g.is_cuda
        torch.testing.assert_close(g.cpu().float(), w, rtol=0, atol=REDUCED_ATOL[dtype])
        torch.testing.assert_close(g.cpu().float(), c.float(), rtol=0, atol=REDUCED_ATOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_opcheck_reduced_precision(dtype):
    p = to_device(cast_problem(make_problem("tied", 5, torch.float32, readout=True,
                                            loss="cross_entropy"), dtype))
    c = p["couplings"]
    torch.library.opcheck(
        torch.ops.toreq.relax.default,
        (p["states"], p["drives"], [x.weight for x in c], [x.target for x in c],
         [x.source for x in c], [x.transposed for x in c]),
        dict(activation="tanh", max_steps=30, beta=0.3, loss="cross_entropy", target=p["target"],
             readout_weight=p["readout_weight"], readout_bias=p["readout_bias"]))


def test_autocast_relaxes_in_the_autocast_dtype():
    p = to_device(make_problem("tied", 9, torch.float32, loss="mse"))
    kw = dict(activation="tanh", max_steps=30, beta=0.5, **nudge_kwargs(p))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = run_relax(p, **kw)
    b = cast_problem(p, torch.bfloat16)
    want = run_relax(b, **{**kw, **nudge_kwargs(b)})
    for g, w in zip(got.states, want.states):
        assert g.dtype == torch.bfloat16 and torch.equal(g, w)


# --------------------------------------------------------------------------- autograd stance
def test_ops_reject_tensors_that_require_grad_on_cuda():
    p = to_device(make_problem("tied", 6, torch.float32))
    weights = [c.weight.clone().requires_grad_() for c in p["couplings"]]
    c = p["couplings"]
    args = (p["states"], p["drives"], weights, [x.target for x in c], [x.source for x in c],
            [x.transposed for x in c])
    with pytest.raises(RuntimeError, match="relax builds no graph; use toreq.ops.relax or an "
                                           "estimator"):
        torch.ops.toreq.relax(*args)
    with torch.no_grad():
        out = torch.ops.toreq.relax(*args)
    want = run_relax(p)
    for g, w in zip(out[0], want.states):
        torch.testing.assert_close(g, w)
    torch.library.opcheck(torch.ops.toreq.relax.default, args,
                          test_utils="test_autograd_registration")
    phases = [t.cuda() for t in (torch.randn(6, 5), torch.randn(6, 3), torch.randn(6, 5),
                                 torch.randn(6, 3))]
    phases[0].requires_grad_()
    with pytest.raises(RuntimeError, match="hebbian_update builds no graph"):
        torch.ops.toreq.hebbian_update(*phases, 0.5)


# --------------------------------------------------------------------------- CUDA graphs
def test_graph_replay_matches_eager_launches(tmp_path):
    """Relaxations of >= 24 steps capture a check window as a CUDA graph and replay it; a
    process with TOREQ_CUDA_GRAPHS=0 launches every kernel instead: the results are identical
    (the same kernels on the same data, in the same order)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "relax_once.py"
    script.write_text(
        "import sys, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from op_problems import make_problem\n"
        "from toreq.ops import Coupling, relax\n"
        "results = []\n"
        "for kind, loss, readout, beta, tol in [('tied', 'cross_entropy', True, 0.5, 0.0),\n"
        "                                       ('untied', 'mse', False, -0.3, 1e-5),\n"
        "                                       ('looped', 'gradient', False, 0.2, 0.0)]:\n"
        "    p = make_problem(kind, 37, torch.float32, readout=readout, loss=loss)\n"
        "    cuda = lambda t: None if t is None else t.cuda()\n"
        "    r = relax([s.cuda() for s in p['states']],\n"
        "              [Coupling(c.weight.cuda(), c.target, c.source, c.transposed)\n"
        "               for c in p['couplings']], [cuda(d) for d in p['drives']],\n"
        "              activation='tanh', max_steps=61, tol=tol, beta=beta, loss=loss,\n"
        "              target=cuda(p['target']), readout_weight=cuda(p.get('readout_weight')),\n"
        "              readout_bias=cuda(p.get('readout_bias')))\n"
        "    results.append(([s.cpu() for s in r.states], r.steps.cpu(), r.residual.cpu()))\n"
        "torch.save(results, sys.argv[1])\n")
    outputs = {}
    for graphs in ("1", "0"):
        out = tmp_path / f"graphs{graphs}.pt"
        env = dict(os.environ, TOREQ_CUDA_GRAPHS=graphs)
        subprocess.run([sys.executable, str(script), str(out)], check=True, env=env, timeout=300)
        outputs[graphs] = torch.load(out)
    for (s1, steps1, res1), (s0, steps0, res0) in zip(outputs["1"], outputs["0"]):
        assert torch.equal(steps1, steps0) and torch.equal(res1, res0)
        assert all(torch.equal(a, b) for a, b in zip(s1, s0))


def test_graph_replay_runs_on_the_current_stream():
    """The captured path on a side stream of the caller's (not the default stream)."""
    p = make_problem("untied", 17, torch.float32, readout=True, loss="cross_entropy")
    want = run_relax(p, beta=0.2, max_steps=40, **nudge_kwargs(p))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        g = to_device(p)
        got = run_relax(g, beta=0.2, max_steps=40, **nudge_kwargs(g))
        states = [s.cpu() for s in got.states]
        steps = got.steps.cpu()
    stream.synchronize()
    for a, b in zip(states, want.states):
        torch.testing.assert_close(a, b, **_tolerances(torch.float32))
    assert steps.tolist() == want.steps.tolist()


# --------------------------------------------------------------------------- max_pool2d
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("size", [2, 3])
def test_cuda_kernel_matches_the_cpu_and_the_reference(dtype, size):
    z = torch.randint(-2, 3, (4, 5, 11, 12)).to(dtype)  # ties in most windows
    z[0, 0, 0, 0] = float("nan")
    got_values, got_indices = torch.ops.toreq.max_pool2d(z.cuda(), size)
    for want_values, want_indices in (torch.ops.toreq.max_pool2d(z, size),
                                      max_pool2d_reference(z.cuda(), size)):
        torch.testing.assert_close(got_values.cpu(), want_values.cpu(), equal_nan=True, rtol=0,
                                   atol=0)
        assert torch.equal(got_indices.cpu(), want_indices.cpu())
    torch.library.opcheck(torch.ops.toreq.max_pool2d.default, (z.cuda().requires_grad_(), size))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_max_pool_runs_on_a_non_default_device():
    z = torch.randn(3, 4, 8, 8)
    values, indices = torch.ops.toreq.max_pool2d(z.to("cuda:1"), 2)
    assert values.device == torch.device("cuda:1") and indices.device == torch.device("cuda:1")
    want_values, want_indices = max_pool2d_reference(z, 2)
    assert torch.equal(values.cpu(), want_values) and torch.equal(indices.cpu(), want_indices)
