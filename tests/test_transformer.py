"""EqProp transformer blocks and the character LM: shapes, parameter counts, causality, EqProp
gradients against BPTT and implicit differentiation, bad input, and learning Tiny Shakespeare."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from toreq.diagnostics import compare, estimator_gradients
from toreq.lm_training import train_lm
from toreq.nn.lm import CharTransformerLM, count_parameters, perplexity, unigram_perplexity
from toreq.nn.transformer import (EqPropAttention, EqPropFeedForward, SelfAttention,
                                  TransformerBlock, linear_attention)

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, D, HEADS, T = 11, 8, 2, 6


def tiny_lm(eqprop="both", **options) -> CharTransformerLM:
    torch.manual_seed(0)
    return CharTransformerLM(VOCAB, D, 2, HEADS, T, eqprop=eqprop, d_ff=12, **options)


def tokens(batch=3, length=T, seed=0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def cubic_loss(o, _):
    return o.pow(3).sum() / o.shape[0]  # a loss whose gradient differs from entry to entry


def all_three(module, x, y=None, loss_fn=cubic_loss):
    return {m: estimator_gradients(module, x, y, m, loss_fn=loss_fn)
            for m in ("eqprop", "bptt", "implicit")}


@pytest.mark.parametrize("eqprop", ["none", "attention", "ffn", "both"])
@pytest.mark.parametrize("mode", ["symmetric", "nonsymmetric"])
def test_shapes_and_parameter_counts(eqprop, mode):
    lm = tiny_lm(eqprop, attention_mode=mode)
    for length in (T, 3):  # the full context and a shorter one
        assert lm(tokens(length=length)).shape == (3, length, VOCAB)
    d_ff, layers = 12, 2
    extra = 0  # EqProp's additions to the backprop block of the same shape
    if eqprop in ("attention", "both"):  # the state's bias, and W (symmetric mode)
        extra += D + (D * D if mode == "symmetric" else 0)
    if eqprop in ("ffn", "both"):  # W; the cell's bias replaces the hidden layer's
        extra += d_ff * d_ff
    assert count_parameters(lm) == count_parameters(tiny_lm("none")) + layers * extra
    embeddings = VOCAB * D + T * D
    backprop_block = 4 * D + (4 * D * D + 4 * D) + (2 * D * d_ff + d_ff + D)
    assert count_parameters(tiny_lm("none")) == (embeddings + layers * backprop_block + 2 * D
                                                 + D * VOCAB + VOCAB)


@pytest.mark.parametrize("options", [
    dict(eqprop="none", attention="linear"), dict(eqprop="none", attention="softmax"),
    dict(eqprop="both"),
    # a whole sequence relaxes until all its positions converged: causal exactly with tol=0
    dict(eqprop="both", attention_mode="nonsymmetric", block_options=dict(tol=0.0)),
])
def test_changing_a_future_token_leaves_earlier_logits_unchanged(options):
    lm = tiny_lm(**options).eval()
    idx = tokens()
    changed = idx.clone()
    changed[:, 4] = (changed[:, 4] + 1) % VOCAB
    with torch.no_grad():
        before, after = lm(idx), lm(changed)
    torch.testing.assert_close(after[:, :4], before[:, :4], rtol=0, atol=1e-6)
    assert (after[:, 4] - before[:, 4]).abs().max() > 1e-3


@pytest.mark.parametrize("sublayer", ["attention", "ffn"])
def test_symmetric_sublayers_match_bptt_and_implicit(sublayer):
    torch.manual_seed(0)
    module = (EqPropAttention(D, HEADS, T) if sublayer == "attention"
              else EqPropFeedForward(D, 12)).double().eval()
    assert module.gradient_regime == "exact"
    u = torch.randn(3, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = all_three(module, u)
    for name, ep in grads["eqprop"].items():
        bptt = grads["bptt"][name]
        assert bptt.abs().max() > 0, name
        assert compare(grads["implicit"][name], bptt).relative_error < 1e-9, name
        assert compare(ep, bptt).relative_error < 1e-6, name


def test_nonsymmetric_attention_is_an_approximation():
    u = torch.randn(3, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cosines = {}
    for mode in ("symmetric", "nonsymmetric"):
        torch.manual_seed(0)
        module = EqPropAttention(D, HEADS, T, mode=mode).double().eval()
        grads = all_three(module, u)
        implicit = torch.cat([g.flatten() for g in grads["implicit"].values()])
        bptt = torch.cat([g.flatten() for g in grads["bptt"].values()])
        eqprop = torch.cat([g.flatten() for g in grads["eqprop"].values()])
        assert compare(implicit, bptt).relative_error < 1e-9  # the cell is fine either way
        cosines[mode] = compare(eqprop, bptt).cosine
    assert EqPropAttention(D, HEADS, T, mode="nonsymmetric").gradient_regime == "approximate"
    # (I - J)^-1 in place of (I - J^T)^-1: close to the gradient, not equal to it
    assert 0.5 < cosines["nonsymmetric"] < 1 - 1e-4 < 1 - 1e-12 < cosines["symmetric"], cosines


def test_lm_eqprop_gradients_match_bptt():
    # every parameter of the LM: EqProp's inside the blocks, autograd's outside, fed by EqProp's
    # input gradients
    lm = tiny_lm("both").double().eval()

    def cross_entropy(logits, y):
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    grads = {m: estimator_gradients(lm, tokens(), tokens(seed=1), m, loss_fn=cross_entropy)
             for m in ("eqprop", "bptt")}
    assert len(grads["eqprop"]) == len(list(lm.parameters()))
    for name, ep in grads["eqprop"].items():
        assert grads["bptt"][name].abs().max() > 0, name
        assert compare(ep, grads["bptt"][name]).relative_error < 1e-6, name


@pytest.mark.parametrize("causal", [True, False])
def test_linear_attention_matches_a_direct_loop(causal):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, T, 4, dtype=torch.float64, generator=gen) for _ in range(3))
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    expected = torch.empty_like(v)
    for t in range(T):
        seen = range(t + 1) if causal else range(T)  # j <= t, or every position
        weights = [torch.einsum("bhd,bhd->bh", phi_q[..., t, :], phi_k[..., j, :]) for j in seen]
        numerator = sum(w[..., None] * v[..., j, :] for w, j in zip(weights, seen))
        expected[..., t, :] = numerator / sum(weights)[..., None]
    torch.testing.assert_close(linear_attention(q, k, v, causal=causal), expected,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("build", [
    lambda causal: SelfAttention(D, HEADS, "linear", causal=causal),
    lambda causal: SelfAttention(D, HEADS, "softmax", causal=causal),
    lambda causal: EqPropAttention(D, HEADS, T, causal=causal),
    lambda causal: EqPropAttention(D, HEADS, T, mode="nonsymmetric", causal=causal,
                                   block_options=dict(tol=0.0)),
    lambda causal: TransformerBlock(D, HEADS, T, eqprop="both", causal=causal),
], ids=["linear", "softmax", "eqprop-symmetric", "eqprop-nonsymmetric", "block"])
def test_a_later_token_reaches_earlier_positions_only_when_not_causal(build):
    u = torch.randn(2, T, D, generator=torch.Generator().manual_seed(0))
    changed = u.clone()
    changed[:, 4] = torch.randn(2, D, generator=torch.Generator().manual_seed(1))
    for causal in (True, False):
        torch.manual_seed(0)
        module = build(causal).eval()
        with torch.no_grad():
            earlier = (module(changed) - module(u))[:, :4].abs().max()
        if causal:
            assert earlier <= 1e-6, earlier
        else:
            assert earlier > 1e-3, earlier


def test_bad_input_raises():
    with pytest.raises(ValueError, match="eqprop must be one of"):
        TransformerBlock(D, HEADS, T, eqprop="all")
    with pytest.raises(ValueError, match="eqprop must be one of .* n_layers=2"):
        CharTransformerLM(VOCAB, D, 2, HEADS, T, eqprop=["both"])
    with pytest.raises(ValueError, match="mode must be one of"):
        EqPropAttention(D, HEADS, T, mode="tied")
    with pytest.raises(ValueError, match="attention must be one of"):
        TransformerBlock(D, HEADS, T, attention="flash")
    with pytest.raises(ValueError, match=r"d_model \(8\) must be divisible by n_heads \(3\)"):
        TransformerBlock(D, 3, T)
    with pytest.raises(ValueError, match="recurrent_scale must be in"):
        EqPropFeedForward(D, 12, recurrent_scale=1.0)
    with pytest.raises(ValueError, match="block_options must not set activation"):
        EqPropFeedForward(D, 12, block_options=dict(activation="sigmoid"))
    with pytest.raises(ValueError, match="d_model must be a positive int"):
        CharTransformerLM(VOCAB, 0, 1, 1, T)
    lm = tiny_lm()
    with pytest.raises(ValueError, match="idx must be an integer tensor"):
        lm(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="1..seq_len=6 positions, got 7"):
        lm(tokens(length=7))
    with pytest.raises(ValueError, match="token ids in 0..10, got 0..11"):
        lm(torch.tensor([[0, 11]]))
    with pytest.raises(ValueError, match="more than seq_len=6"):
        EqPropAttention(D, HEADS, T, mode="nonsymmetric")(torch.randn(1, 7, D))
    with pytest.raises(ValueError, match="needs exactly seq_len=6 positions, got 3"):
        EqPropAttention(D, HEADS, T, mode="nonsymmetric", causal=False)(torch.randn(1, 3, D))


@pytest.mark.parametrize("eqprop", ["none", "both"])
def test_tiny_lm_beats_the_unigram_perplexity(shakespeare, eqprop):
    train, val = shakespeare.train[:200_000], shakespeare.val[:8_000]
    unigram = unigram_perplexity(train, val, shakespeare.vocab_size)
    torch.manual_seed(0)
    seq_len = 16
    lm = CharTransformerLM(shakespeare.vocab_size, 32, 1, 2, seq_len, eqprop=eqprop)
    history = train_lm(lm, torch.optim.Adam(lm.parameters(), lr=3e-3), train, 150,
                       batch_size=32, generator=torch.Generator().manual_seed(0), eval_ids=val)
    before, after = history[0]["val_perplexity"], history[-1]["val_perplexity"]
    assert after == perplexity(lm, val, seq_len)
    print(f"eqprop={eqprop}: {count_parameters(lm)} parameters, validation perplexity "
          f"{before:.2f} -> {after:.2f}, unigram {unigram:.2f}")
    assert after < 0.6 * unigram < before, (before, after, unigram)
