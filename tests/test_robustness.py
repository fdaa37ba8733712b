"""Robustness: property-based tests of the ops, damaged files, and a checkpoint write killed midway.

The properties (hypothesis): for any valid input, ``relax`` and ``hebbian_update`` return finite
results equal to their pure-PyTorch references (or, for NaN put in, an error naming it or a
propagated NaN); for any invalid input, a RuntimeError or ValueError naming the argument. Run
``python -m pytest tests/test_robustness.py --hypothesis-show-statistics`` to see how many
cases ran.
"""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import textwrap
import time
import zlib
from datetime import timedelta

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from toreq.data import DataError, load_digits, read_idx
from toreq.nn import LoopedMLP
from toreq.ops import (
    Coupling,
    hebbian_update,
    hebbian_update_reference,
    layered_couplings,
    relax,
    relax_reference,
)
from toreq.train import EqPropTrainer, fit, load_checkpoint, save_checkpoint

# The deadline flags an example that takes far too long (every loop here is bounded by
# max_steps, so a hang would be a bug); it is generous because the CI machine is shared.
PROPERTY = settings(max_examples=150, deadline=timedelta(seconds=5),
                    suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float32, torch.float64]
ACTIVATIONS = ["hard_sigmoid", "tanh", "sigmoid", "steep_sigmoid"]
LAYOUTS = ["contiguous", "transposed", "strided", "expanded"]


def relayout(t: torch.Tensor | None, how: str) -> torch.Tensor | None:
    """``t`` in another memory layout. ``"expanded"`` repeats the first row with stride 0, so it
    changes the values; the tests give the same tensor to the op and to its reference."""
    if t is None or t.dim() == 0 or t.numel() == 0 or how == "contiguous":
        return t
    if how == "transposed" and t.dim() == 2:
        return t.T.contiguous().T
    if how == "expanded" and t.dim() == 2:
        return t[:1].expand_as(t)
    wide = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
    wide[..., ::2] = t
    return wide[..., ::2]


def scaled(g: torch.Generator, rows: int, cols: int, dtype: torch.dtype,
           norm: float) -> torch.Tensor:
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    if w.numel():
        w = w * (norm / torch.linalg.matrix_norm(w, ord=2).clamp_min(1e-12))
    return w.to(dtype)


@st.composite
def relax_problems(draw, *, weight_norm: float = 0.45, max_beta: float = 0.45,
                   min_batch: int = 0, min_steps: int = 0):
    """A random valid problem for relax(), as (args, kwargs, reference kwargs).

    With ``weight_norm`` and ``|beta|`` below 1/2, every update contracts (no layer gets more
    than two couplings), so rounding differences between the op and the reference do not grow
    over the steps and the two can be compared tightly.
    """
    dtype = draw(st.sampled_from(DTYPES))
    batch = draw(st.integers(min_batch, 5))
    kind = draw(st.sampled_from(["looped", "tied", "untied"]))
    widths = ([draw(st.integers(0, 6))] if kind == "looped"
              else draw(st.lists(st.integers(0, 6), min_size=2, max_size=3)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    layout = lambda: draw(st.sampled_from(LAYOUTS))  # noqa: E731 - one draw per tensor
    # Weights keep their values (an expanded weight would have repeated rows and a larger norm).
    weight_layout = lambda: draw(st.sampled_from(LAYOUTS[:3]))  # noqa: E731

    if kind == "looped":
        couplings = [Coupling(scaled(g, widths[0], widths[0], dtype, weight_norm), 0, 0)]
    else:
        weights = [scaled(g, b, a, dtype, weight_norm) for a, b in zip(widths, widths[1:])]
        feedback = (None if kind == "tied"
                    else [scaled(g, a, b, dtype, weight_norm) for a, b in zip(widths, widths[1:])])
        couplings = layered_couplings(weights, feedback)
    couplings = [c._replace(weight=relayout(c.weight, weight_layout())) for c in couplings]
    states = [relayout(torch.rand(batch, n, generator=g, dtype=dtype) * 2 - 1, layout())
              for n in widths]
    drives = []
    for n in widths:
        how = draw(st.sampled_from(["none", "per_sample", "shared"]))
        shape = (batch, n) if how == "per_sample" else (n,)
        drives.append(None if how == "none"
                      else relayout(torch.randn(*shape, generator=g, dtype=dtype), layout()))

    kwargs = dict(activation=draw(st.sampled_from(ACTIVATIONS)),
                  damping=draw(st.floats(0.0, 0.9)),
                  max_steps=draw(st.integers(min_steps, 25)),
                  tol=draw(st.sampled_from([0.0, 1e-6, 1e-3, 0.1])),
                  schedule=draw(st.sampled_from(["sync", "async"])))
    beta = draw(st.one_of(st.just(0.0), st.floats(-max_beta, max_beta)))
    if abs(beta) < torch.finfo(dtype).smallest_normal:
        beta = 0.0  # relax rejects a beta that underflows the dtype (tested on its own)
    reference = dict(kwargs)
    if beta != 0.0:
        loss = draw(st.sampled_from(["mse", "cross_entropy", "gradient"]))
        n_out = widths[-1]
        if loss != "gradient" and draw(st.booleans()):
            n_out = draw(st.integers(1, 4))
            kwargs["readout_weight"] = relayout(scaled(g, n_out, widths[-1], dtype, 0.5),
                                                weight_layout())
            if draw(st.booleans()):
                kwargs["readout_bias"] = relayout(torch.randn(n_out, generator=g, dtype=dtype),
                                                  layout())
        if loss == "gradient":
            target = torch.randn(batch, n_out, generator=g, dtype=dtype)
        elif n_out > 0 and draw(st.booleans()):
            target = torch.randint(0, n_out, (batch,), generator=g)  # class labels
        else:
            target = torch.rand(batch, n_out, generator=g, dtype=dtype)
        target = relayout(target, layout())
        kwargs.update(beta=beta, loss=loss, target=target)
        rows = (target if target.is_floating_point()  # the reference takes rows, not labels
                else torch.nn.functional.one_hot(target, n_out).to(dtype))
        reference.update(kwargs, target=rows)
    return (states, couplings, drives), kwargs, reference


def assert_matches_reference(got, want, states, tol, dtype):
    """Same steps and states, up to rounding; where rounding decides a sample's stopping step
    (its change within rounding of tol) only that sample's step count may differ, by one."""
    eps = torch.finfo(dtype).eps
    scale = max([1.0] + [float(s.abs().max()) for s in states if s.numel()])
    atol = (1e3 if dtype == torch.float32 else 1e4) * eps * scale
    differs = got.steps != want.steps
    if bool(differs.any()):
        assert tol > 0, (got.steps, want.steps)
        assert bool(((got.steps - want.steps).abs() <= 1).all())
        early = torch.where(got.steps < want.steps, got.residual, want.residual)[differs]
        assert bool((early >= tol - 100 * eps * scale).all()), "steps differ beyond rounding"
    same = ~differs
    for g_state, w_state in zip(got.states, want.states):
        torch.testing.assert_close(g_state[same], w_state[same], rtol=0, atol=atol)
    torch.testing.assert_close(got.residual[same], want.residual[same], rtol=0, atol=atol)


# --------------------------------------------------------------------------- relax: valid input
@PROPERTY
@given(relax_problems())
def test_relax_matches_reference_on_any_valid_problem(problem):
    (states, couplings, drives), kwargs, reference_kwargs = problem
    before = [s.clone() for s in states]
    got = relax(states, couplings, drives, **kwargs)
    want = relax_reference(states, couplings, drives, **reference_kwargs)
    batch, max_steps, tol = states[0].shape[0], kwargs["max_steps"], kwargs["tol"]
    assert [s.shape for s in got.states] == [s.shape for s in states]
    assert all(s.dtype == states[0].dtype and torch.isfinite(s).all() for s in got.states)
    assert got.steps.dtype == torch.long and got.steps.shape == (batch,)
    assert bool((got.steps <= max_steps).all())
    if tol == 0:
        assert got.steps.tolist() == [max_steps] * batch
    stopped_early = got.steps < max_steps
    assert bool((got.residual[stopped_early] < tol).all())
    assert_matches_reference(got, want, states, tol, states[0].dtype)
    for s, b in zip(states, before):
        assert torch.equal(s, b), "relax modified its input"


@PROPERTY
@given(relax_problems(weight_norm=1e6, max_beta=1e3), st.sampled_from([1.0, 1e-30, 1e30]))
def test_relax_stays_finite_and_in_range_for_extreme_magnitudes(problem, magnitude):
    """Weights far from contracting and huge or tiny drives: the states stay in the hull of the
    initial states and the activation's range, finite, whatever the dynamics do."""
    (states, couplings, drives), kwargs, _ = problem
    drives = [None if d is None else d * magnitude for d in drives]
    result = relax(states, couplings, drives, **kwargs)
    low = 0.0 if kwargs["activation"] != "tanh" else -1.0
    for s0, s in zip(states, result.states):
        assert bool(torch.isfinite(s).all())
        lo = min(low, float(s0.min())) if s0.numel() else low
        hi = max(1.0, float(s0.max())) if s0.numel() else 1.0
        assert bool(((s >= lo - 1e-6) & (s <= hi + 1e-6)).all())


@PROPERTY
@given(relax_problems(min_batch=1, min_steps=1),
       st.sampled_from([float("nan"), float("inf"), -float("inf")]), st.data())
def test_relax_never_returns_a_silent_nan(problem, value, data):
    """A NaN or Inf put into any input: either a RuntimeError that says NaN or Inf (naming the
    input where one is to blame), or finite states equal to the reference's (an input that is
    never read, or an Inf that an activation saturates)."""
    (states, couplings, drives), kwargs, reference = problem
    inputs = [*states, *(d for d in drives if d is not None), *(c.weight for c in couplings),
              *(kwargs[k] for k in ("target", "readout_weight", "readout_bias")
                if k in kwargs and kwargs[k].is_floating_point())]
    inputs = [t for t in inputs if t.numel()]
    assume(inputs)  # every layer zero units wide: nothing to poison
    victim = data.draw(st.sampled_from(inputs))
    poisoned = victim.clone(memory_format=torch.contiguous_format)  # one element replaced
    poisoned.view(-1)[data.draw(st.integers(0, victim.numel() - 1))] = value

    def swap(t):
        return poisoned if t is victim else t

    args = ([swap(s) for s in states], [c._replace(weight=swap(c.weight)) for c in couplings],
            [None if d is None else swap(d) for d in drives])
    kwargs = {k: swap(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    reference = {k: swap(v) if isinstance(v, torch.Tensor) else v for k, v in reference.items()}
    try:
        got = relax(*args, **kwargs)
    except RuntimeError as error:
        event("NaN or Inf reported")
        assert "NaN or Inf" in str(error)
        with pytest.raises(RuntimeError, match="NaN or Inf"):
            relax_reference(*args, **reference)
        return
    event("finite result (input unread or saturated)")
    want = relax_reference(*args, **reference)
    assert all(bool(torch.isfinite(s).all()) for s in got.states)
    assert_matches_reference(got, want, args[0], kwargs["tol"], states[0].dtype)


# --------------------------------------------------------------------------- relax: bad input
NAN, INF = float("nan"), float("inf")


def signed(magnitudes):
    return st.tuples(st.sampled_from([-1.0, 1.0]), magnitudes).map(lambda t: t[0] * t[1])


# Per option: a strategy of valid values and one of invalid values, given the states' dtype.
OPTIONS = {
    "damping": lambda dtype: (st.floats(0.0, 1.0, exclude_max=True),
                              st.one_of(st.floats(max_value=0.0, exclude_max=True),
                                        st.floats(min_value=1.0), st.just(NAN))),
    "tol": lambda dtype: (st.floats(0.0, 1e300),
                          st.one_of(st.floats(max_value=0.0, exclude_max=True),
                                    st.sampled_from([INF, NAN]))),
    "max_steps": lambda dtype: (st.integers(0, 3), st.integers(max_value=-1)),
    # A finite beta must neither overflow nor underflow the dtype (it scales the nudge in it).
    "beta": lambda dtype: (
        st.one_of(st.just(0.0), signed(st.floats(torch.finfo(dtype).smallest_normal,
                                                 torch.finfo(dtype).max))),
        st.one_of(st.sampled_from([NAN, INF, -INF]),
                  signed(st.floats(0.0, torch.finfo(dtype).smallest_normal, exclude_min=True,
                                   exclude_max=True)),
                  signed(st.floats(torch.finfo(dtype).max, exclude_min=True,
                                   allow_infinity=False)) if dtype == torch.float32
                  else st.nothing())),
    "activation": lambda dtype: (st.sampled_from(ACTIVATIONS),
                                 st.sampled_from(["relu", "identity", "", "Tanh"])),
    "schedule": lambda dtype: (st.sampled_from(["sync", "async"]),
                               st.sampled_from(["random", "SYNC", ""])),
    "loss": lambda dtype: (st.sampled_from(["mse", "cross_entropy", "gradient"]),
                           st.sampled_from(["hinge", "nll", "MSE"])),
}


@PROPERTY
@given(relax_problems(), st.sampled_from(sorted(OPTIONS)), st.booleans(), st.data())
def test_relax_accepts_exactly_the_valid_options(problem, option, invalid, data):
    (states, couplings, drives), kwargs, _ = problem
    value = data.draw(OPTIONS[option](states[0].dtype)[invalid])
    kwargs = {**kwargs, "max_steps": min(kwargs["max_steps"], 3), option: value}
    if option in ("beta", "loss"):  # a nudge that every loss accepts: rows, no readout
        kwargs.pop("readout_weight", None)
        kwargs.pop("readout_bias", None)
        kwargs["target"] = torch.zeros_like(states[-1])
    if invalid:
        event(f"invalid {option} rejected")
        with pytest.raises((RuntimeError, ValueError), match=option):
            relax(states, couplings, drives, **kwargs)
        return
    try:
        result = relax(states, couplings, drives, **kwargs)
    except RuntimeError as error:
        # Only a nudge near the dtype's range may overflow the dynamics, and it must say so.
        assert option == "beta" and abs(value) > 1e30 and "NaN or Inf" in str(error), error
        event("valid beta overflowed the dynamics: reported")
        return
    assert all(bool(torch.isfinite(s).all()) for s in result.states)


@PROPERTY
@given(relax_problems(), st.data())
def test_relax_names_a_misshapen_argument(problem, data):
    (states, couplings, drives), kwargs, _ = problem
    nudge = [k for k in ("target", "readout_weight", "readout_bias")
             if k in kwargs and kwargs["target"].is_floating_point()]
    where = data.draw(st.sampled_from(["drives", "weights", *nudge]
                                      + (["states"] if len(states) > 1 else [])))
    grow = data.draw(st.integers(1, 3))

    def wider(t):  # one more column (or row, for a 1-D tensor): the wrong shape
        return torch.cat([t, t.new_zeros(*t.shape[:-1], grow)], dim=-1)

    if where == "states":
        i = data.draw(st.integers(1, len(states) - 1))
        states = [s if j != i else torch.cat([s, s.new_zeros(grow, s.shape[1])]) for j, s in
                  enumerate(states)]
        message = rf"states\[{i}\] has batch"
    elif where == "drives":
        i = data.draw(st.integers(0, len(drives) - 1))
        drives = list(drives)
        drives[i] = wider(drives[i] if drives[i] is not None else states[i])
        message = rf"drives\[{i}\] must have shape"
    elif where == "weights":
        i = data.draw(st.integers(0, len(couplings) - 1))
        couplings = [c if j != i else c._replace(weight=wider(c.weight)) for j, c in
                     enumerate(couplings)]
        message = rf"weights\[{i}\] couples"
    else:
        kwargs = {**kwargs, where: wider(kwargs[where])}
        message = f"{where} must have shape"
    with pytest.raises(RuntimeError, match=message):
        relax(states, couplings, drives, **kwargs)


def test_relax_rejects_labels_out_of_range_and_no_layers():
    states, couplings = [torch.zeros(3, 4)], [Coupling(torch.zeros(4, 4), 0, 0)]
    for labels in ([0, 1, 4], [0, -1, 2]):
        with pytest.raises(ValueError, match=r"target must lie in \[0, 4\)"):
            relax(states, couplings, beta=0.5, loss="cross_entropy", target=torch.tensor(labels))
    with pytest.raises(ValueError, match="states must hold at least one layer"):
        relax([], [], beta=0.5, target=torch.tensor([0]))
    for beta in (1e39, -1e-50):  # overflows, or rounds to 0 (a silent free phase)
        with pytest.raises(RuntimeError, match=r"beta = \S+ is outside the range of Float"):
            relax(states, couplings, beta=beta, target=torch.zeros(3, 4))
    relax([s.double() for s in states], [Coupling(torch.zeros(4, 4, dtype=torch.float64), 0, 0)],
          beta=1e39, target=torch.zeros(3, 4, dtype=torch.float64))  # fits float64


# --------------------------------------------------------------------------- hebbian
@st.composite
def hebbian_problems(draw, *, min_features: int = 0):
    dtype = draw(st.sampled_from(DTYPES))
    batch = draw(st.integers(1, 6))
    n_post, n_pre = draw(st.integers(min_features, 6)), draw(st.integers(min_features, 6))
    magnitude = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    layout = lambda: draw(st.sampled_from(LAYOUTS))  # noqa: E731
    tensors = [relayout(torch.randn(batch, n, generator=g, dtype=dtype) * magnitude, layout())
               for n in (n_post, n_pre, n_post, n_pre)]
    if draw(st.booleans()):
        tensors[3] = tensors[1]  # the vector-field form: one pre-synaptic activity
    sign = draw(st.sampled_from([-1.0, 1.0]))
    beta = sign * 10.0 ** draw(st.floats(-3, 3))
    kwargs = dict(post_activation=draw(st.sampled_from(ACTIVATIONS + ["identity"])),
                  pre_activation=draw(st.sampled_from(ACTIVATIONS + ["identity"])))
    return tensors, beta, kwargs


def hebbian_tolerance(tensors, beta):
    scale = max([1.0] + [float(t.abs().max()) for t in tensors if t.numel()])
    eps = torch.finfo(tensors[0].dtype).eps
    return 100 * eps * scale * scale / abs(beta)


@PROPERTY
@given(hebbian_problems(), st.sampled_from(["new", "accumulate", "accumulate_weight_only"]),
       st.sampled_from(LAYOUTS[:3]))
def test_hebbian_matches_reference_on_any_valid_input(problem, mode, grad_layout):
    tensors, beta, kwargs = problem
    want_w, want_b = hebbian_update_reference(*tensors, beta, **kwargs)
    atol = hebbian_tolerance(tensors, beta)
    if mode == "new":
        got_w, got_b = hebbian_update(*tensors, beta, **kwargs)
    else:  # accumulated into (possibly non-contiguous) gradients, e.g. a parameter's .grad
        start_w, start_b = torch.randn_like(want_w), torch.randn_like(want_b)
        grad_w = relayout(start_w.clone(), grad_layout)
        grad_b = relayout(start_b.clone(), grad_layout) if mode == "accumulate" else None
        got_w, got_b = hebbian_update(*tensors, beta, grad_weight=grad_w, grad_bias=grad_b,
                                      **kwargs)
        assert got_w is grad_w and got_b is grad_b
        want_w, want_b = want_w + start_w, want_b + start_b
        if grad_b is None:
            got_b = want_b
    for got, want in ((got_w, want_w), (got_b, want_b)):
        assert bool(torch.isfinite(got).all())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=atol)


@PROPERTY
@given(hebbian_problems(min_features=1), st.integers(0, 3), st.data())
def test_hebbian_propagates_a_nan_input(problem, which, data):
    """NaN activities make a NaN update, as in any matrix product, never a finite one; the
    training loop then stops with TrainingDiverged naming the gradient."""
    tensors, beta, kwargs = problem
    # Contiguous copies; a pre-synaptic tensor shared by both phases stays shared.
    copies = {id(t): t.clone(memory_format=torch.contiguous_format) for t in tensors}
    tensors = [copies[id(t)] for t in tensors]
    victim = tensors[which]
    victim.view(-1)[data.draw(st.integers(0, victim.numel() - 1))] = float("nan")
    got_w, got_b = hebbian_update(*tensors, beta, **kwargs)
    assert bool(torch.isnan(got_w).any())
    if which in (0, 2):  # a post-synaptic NaN reaches the bias too
        assert bool(torch.isnan(got_b).any())
    else:
        torch.testing.assert_close(got_b, hebbian_update_reference(*tensors, beta, **kwargs)[1],
                                   rtol=1e-5, atol=hebbian_tolerance(tensors[::2], beta))


@PROPERTY
@given(hebbian_problems(), st.sampled_from(["beta", "batch", "shape", "dtype", "bias_alone"]),
       st.data())
def test_hebbian_names_a_bad_argument(problem, what, data):
    tensors, beta, kwargs = problem
    if what == "beta":
        beta = data.draw(st.sampled_from([0.0, float("nan"), float("inf"), -float("inf"), 1e-320]))
        if tensors[0].dtype == torch.float32 and data.draw(st.booleans()):
            beta = 1e-40  # finite, but 1/(beta B) overflows float32
        message = "beta"
    elif what == "batch":
        tensors = [t[:0] for t in tensors]
        message = "batch is empty"
    elif what == "shape":  # one more feature in one of the last three tensors
        i = data.draw(st.integers(1, 3))
        tensors = list(tensors)
        tensors[i] = torch.cat([tensors[i], tensors[i].new_ones(tensors[i].shape[0], 1)], dim=1)
        message = ["post_nudged", "pre_nudged", "post_free", "pre_free"][i]
    elif what == "dtype":
        i = data.draw(st.integers(0, 3))
        tensors = list(tensors)
        tensors[i] = tensors[i].to(data.draw(st.sampled_from([torch.float16, torch.int64,
                                                              torch.bfloat16])))
        message = "dtype|float32, float64, float16 or bfloat16"
    else:
        with pytest.raises(ValueError, match="grad_bias was given without grad_weight"):
            hebbian_update(*tensors, beta, grad_bias=torch.zeros(tensors[0].shape[1]), **kwargs)
        return
    with pytest.raises((RuntimeError, ValueError), match=message):
        hebbian_update(*tensors, beta, **kwargs)


# --------------------------------------------------------------------------- damaged files
def idx_file(magic: int, shape: tuple[int, ...], payload: bytes) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in shape)
    return header + payload


@PROPERTY
@given(st.sampled_from(["truncate", "flip", "header"]), st.data())
def test_read_idx_gives_data_error_for_any_damage(tmp_path_factory, damage, data):
    """Whatever happens to an IDX file (a cut, a flipped byte in the gzip stream, a random
    header), read_idx returns an array of the shape its header declares or raises DataError."""
    raw = idx_file(2051, (3, 2, 2), bytes(range(12)))
    packed = gzip.compress(raw)
    if damage == "truncate":
        packed = packed[:data.draw(st.integers(0, len(packed) - 1))]
    elif damage == "flip":
        at = data.draw(st.integers(0, len(packed) - 1))
        flipped = packed[at] ^ data.draw(st.integers(1, 255))
        packed = packed[:at] + bytes([flipped]) + packed[at + 1:]
    else:
        header = data.draw(st.binary(min_size=0, max_size=24))
        packed = gzip.compress(header + raw[len(header):] if len(header) <= 16 else header)
    path = tmp_path_factory.mktemp("idx") / "file.gz"
    path.write_bytes(packed)
    try:
        array = read_idx(path, 2051)
    except DataError as error:
        event("DataError")
        assert str(path) in str(error)
        return
    event("parsed")
    assert array.ndim == 3 and array.size == len(zlib.decompress(packed, 31)) - 16


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = LoopedMLP(8, 6, 3)
    trainer = EqPropTrainer(model, torch.optim.Adam(model.parameters()))
    trainer.step(torch.rand(4, 8), torch.tensor([0, 1, 2, 0]))  # optimizer state too
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    save_checkpoint(path, trainer, 1, [{"epoch": 1, "train_loss": 1.0}])
    return path.read_bytes(), model.state_dict()


@PROPERTY
@given(st.sampled_from(["truncate", "flip"]), st.data())
def test_damaged_checkpoint_never_loads_damaged_weights(saved_checkpoint, tmp_path_factory,
                                                        damage, data):
    """torch.load alone loads most flipped bytes as silently changed weights; load_checkpoint
    checks the archive's CRC-32s first and says the file is corrupt."""
    raw, weights = saved_checkpoint
    if damage == "truncate":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    else:
        at = data.draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + bytes([raw[at] ^ (1 << data.draw(st.integers(0, 7)))]) + raw[at + 1:]
    path = tmp_path_factory.mktemp("bad") / "ckpt.pt"
    path.write_bytes(raw)
    model = LoopedMLP(8, 6, 3)
    trainer = EqPropTrainer(model, torch.optim.Adam(model.parameters()))
    try:
        load_checkpoint(path, trainer)
    except RuntimeError as error:
        event("reported as corrupt")
        assert "corrupt or truncated" in str(error) or "does not fit" in str(error)
        return
    event("loaded: the damage hit no data")
    for key, value in weights.items():  # the flip hit bytes that hold no data
        assert torch.equal(model.state_dict()[key], value), key


# --------------------------------------------------------------------------- killed while saving
CHILD = """
    import io, os, sys, time, torch
    from toreq.data import load_digits
    from toreq.nn import LoopedMLP
    from toreq.train import EqPropTrainer, fit

    checkpoint, started = sys.argv[1], sys.argv[2]
    torch.set_num_threads(int(sys.argv[3]))
    real_save = torch.save

    def slow_save(state, f):
        if state["epoch"] < 3:
            return real_save(state, f)
        buffer = io.BytesIO()
        real_save(state, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        os.fsync(f.fileno())
        open(started, "w").close()  # half of epoch 3's checkpoint is on disk: kill me now
        time.sleep(600)

    torch.save = slow_save
    data = load_digits()
    torch.manual_seed(3)
    model = LoopedMLP(data.input_dim, 32, data.num_classes)
    trainer = EqPropTrainer(model, torch.optim.Adam(model.parameters(), lr=1e-3))
    fit(trainer, data.x_train[:64], data.y_train[:64], epochs=4, batch_size=32, seed=7,
        progress=False, checkpoint=checkpoint)
"""


def digits_trainer():
    data = load_digits()
    torch.manual_seed(3)
    model = LoopedMLP(data.input_dim, 32, data.num_classes)
    return EqPropTrainer(model, torch.optim.Adam(model.parameters(), lr=1e-3)), data


def test_sigkill_while_saving_keeps_the_previous_checkpoint_and_resume_reproduces(tmp_path):
    script, checkpoint, started = tmp_path / "child.py", tmp_path / "run.pt", tmp_path / "started"
    script.write_text(textwrap.dedent(CHILD))
    child = subprocess.Popen([sys.executable, str(script), str(checkpoint), str(started),
                              str(torch.get_num_threads())])
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert child.poll() is None, f"the child exited early with {child.returncode}"
            assert time.monotonic() < deadline, "the child never reached the third save"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1  # the half-written temporary file, never renamed into place

    trainer, data = digits_trainer()
    state = load_checkpoint(checkpoint, trainer)  # the previous checkpoint is intact
    assert state["epoch"] == 2
    x, y = data.x_train[:64], data.y_train[:64]
    common = dict(epochs=4, batch_size=32, seed=7, progress=False)
    resumed = fit(digits_trainer()[0], x, y, checkpoint=checkpoint, resume=True, **common)
    uninterrupted = fit(digits_trainer()[0], x, y, **common)
    assert [r["epoch"] for r in resumed] == [1, 2, 3, 4]
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in uninterrupted]


def test_a_damaged_zip_directory_is_reported_as_corrupt_not_as_unsafe(tmp_path):
    """Flips in the archive's central directory pass the CRC-32 check of every record but make
    PyTorch's reader fail: that is a corrupt file, not one holding objects that are unsafe."""
    model = LoopedMLP(8, 6, 3)
    trainer = EqPropTrainer(model, torch.optim.Adam(model.parameters()))
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, trainer, 1, [])
    raw, weights = path.read_bytes(), {k: v.clone() for k, v in model.state_dict().items()}
    reported = 0
    for at in range(len(raw) - 600, len(raw), 5):
        bad = tmp_path / "bad.pt"
        bad.write_bytes(raw[:at] + bytes([raw[at] ^ 1]) + raw[at + 1:])
        try:
            load_checkpoint(bad, trainer)
        except RuntimeError as error:
            assert "corrupt or truncated" in str(error) or "does not fit" in str(error), \
                (at, str(error)[:200])
            reported += 1
            continue
        for key, value in weights.items():  # loaded: the flip hit a field nobody reads
            assert torch.equal(model.state_dict()[key], value), (at, key)
    assert reported > 50
