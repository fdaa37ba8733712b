"""Text generation from the character LM: lengths, determinism, greedy and top-k decoding against
the model's own logits, bad input, the vocabulary in the state_dict, the lm-train / generate
commands, and samples of a briefly trained model against random strings."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from toreq.cli import main
from toreq.lm_training import train_lm
from toreq.nn.lm import CharTransformerLM, perplexity, unigram_perplexity
from toreq.train import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = "\n !,.:?abcdehilmnorst"  # sorted, distinct
T = 6


def tiny_lm(eqprop="both", vocab=VOCAB, **options) -> CharTransformerLM:
    torch.manual_seed(0)
    return CharTransformerLM(len(VOCAB), 8, 1, 2, T, eqprop=eqprop, d_ff=12, vocab=vocab,
                             **options)


def window_logits(lm: CharTransformerLM, ids: torch.Tensor) -> torch.Tensor:
    """The next-token logits after ``ids`` (B, t), from the last ``seq_len`` tokens."""
    with torch.no_grad():
        return lm.eval()(ids[:, -lm.seq_len:])[:, -1]


def greedy(lm: CharTransformerLM, ids: torch.Tensor, n: int) -> torch.Tensor:
    for _ in range(n):
        ids = torch.cat([ids, window_logits(lm, ids).argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("eqprop", ["none", "both"])
def test_lengths_shapes_and_mode(eqprop):
    lm = tiny_lm(eqprop).train()
    text = lm.generate("to be:", 15, generator=0)  # longer than seq_len: the window slides
    assert isinstance(text, str) and len(text) == 6 + 15 and text.startswith("to be:")
    assert set(text) <= set(VOCAB)
    long_prompt = "this is a short reminder"  # longer than seq_len
    assert lm.generate(long_prompt, 3, generator=0).startswith(long_prompt)
    assert lm.generate("hi", 0) == "hi"
    ids = torch.tensor([3, 1, 4])
    out = lm.generate(ids, 9, generator=0)
    assert out.shape == (12,) and out.dtype == torch.int64 and torch.equal(out[:3], ids)
    batch = lm.generate(torch.tensor([[3, 1], [4, 1]]), 9, generator=0)
    assert batch.shape == (2, 11) and int(batch.min()) >= 0 and int(batch.max()) < len(VOCAB)
    assert lm.training  # generation ran in eval mode, and restored the mode
    assert all(p.grad is None for p in lm.parameters())


def test_same_seed_same_text():
    lm = tiny_lm()
    first = lm.generate("to", 40, generator=7)
    assert lm.generate("to", 40, generator=7) == first
    assert lm.generate("to", 40, generator=torch.Generator().manual_seed(7)) == first
    assert lm.generate("to", 40, generator=8) != first
    assert lm.generate("to", 40, temperature=0.7, top_k=5, generator=7) == \
        lm.generate("to", 40, temperature=0.7, top_k=5, generator=7)


@pytest.mark.parametrize("eqprop", ["none", "both"])
def test_top_k_one_and_low_temperature_are_greedy(eqprop):
    lm = tiny_lm(eqprop)
    prompt = torch.tensor([[7, 9, 2], [0, 5, 5]])
    expected = greedy(lm, prompt, 12)
    assert torch.equal(lm.generate(prompt, 12, top_k=1, generator=0), expected)
    assert torch.equal(lm.generate(prompt, 12, temperature=1e-6, generator=0), expected)
    assert not torch.equal(lm.generate(prompt, 12, temperature=5.0, generator=0), expected)


def test_top_k_samples_only_among_the_k_most_likely():
    lm = tiny_lm()
    k = 3
    ids = lm.generate(torch.tensor([[2, 8]]), 30, temperature=3.0, top_k=k, generator=0)
    for t in range(2, ids.shape[1]):
        allowed = window_logits(lm, ids[:, :t]).topk(k, dim=-1).indices[0]
        assert int(ids[0, t]) in allowed.tolist(), t
    # without top_k, a hot temperature leaves the top 3 somewhere in 30 draws
    free = lm.generate(torch.tensor([[2, 8]]), 30, temperature=3.0, generator=0)
    outside = [int(free[0, t]) not in window_logits(lm, free[:, :t]).topk(k).indices[0].tolist()
               for t in range(2, free.shape[1])]
    assert any(outside)


def test_bad_input_raises():
    lm = tiny_lm()
    for temperature in (0, -1.0, math.nan, math.inf, "1", True):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            lm.generate("to", 3, temperature=temperature)
    for top_k in (0, len(VOCAB) + 1, 1.5, True):
        with pytest.raises(ValueError, match="top_k must be None or an int in 1..vocab_size=21"):
            lm.generate("to", 3, top_k=top_k)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0, got -1"):
        lm.generate("to", -1)
    with pytest.raises(ValueError, match=r"characters not in the vocabulary .*'Q', 'x'"):
        lm.generate("xQ to", 3)
    with pytest.raises(ValueError, match="prompt must hold at least one character"):
        lm.generate("", 3)
    with pytest.raises(ValueError, match="prompt must be a string or integer token ids"):
        lm.generate(torch.zeros(1, 3), 3)
    with pytest.raises(ValueError, match="prompt must be a string or integer token ids"):
        lm.generate(torch.zeros(1, 0, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="token ids in 0..20"):
        lm.generate(torch.tensor([len(VOCAB)]), 3)
    with pytest.raises(ValueError, match="generator must be a torch.Generator, an int seed"):
        lm.generate("to", 3, generator="0")
    with pytest.raises(ValueError, match="this model has no vocabulary"):
        tiny_lm(vocab=None).generate("to", 3)
    with pytest.raises(ValueError, match="vocab must be None or a string of vocab_size=21"):
        tiny_lm(vocab=VOCAB[:-1])
    with pytest.raises(ValueError, match="vocab must be the sorted distinct characters"):
        tiny_lm(vocab=VOCAB[::-1])


def test_the_vocabulary_travels_in_the_state_dict():
    lm = tiny_lm()
    state = lm.state_dict()
    assert state["_extra_state"] == {"vocab": VOCAB}
    rebuilt = CharTransformerLM(**{**lm.config, "vocab": None})
    assert rebuilt.vocab is None
    rebuilt.load_state_dict(state)
    assert rebuilt.vocab == VOCAB
    assert rebuilt.generate("to", 20, generator=3) == lm.generate("to", 20, generator=3)
    assert lm.decode(lm.encode("to be")) == "to be"


def test_from_checkpoint_rejects_other_checkpoints(tmp_path):
    model = torch.nn.Linear(2, 2)
    path = tmp_path / "classifier.pt"
    save_checkpoint(path, SimpleNamespace(model=model, optimizer=torch.optim.SGD(
        model.parameters(), lr=0.1)), epoch=1, history=[])
    with pytest.raises(RuntimeError, match="not a language-model checkpoint"):
        CharTransformerLM.from_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CharTransformerLM.from_checkpoint(tmp_path / "missing.pt")


def test_lm_train_then_generate_from_the_checkpoint(shakespeare_root, tmp_path, capsys):
    checkpoint = tmp_path / "lm" / "tiny.pt"
    assert main(["lm-train", "--variant", "both", "--steps", "5", "--d-model", "16",
                 "--layers", "1", "--seq-len", "12", "--eval-chars", "2000",
                 "--data-dir", str(shakespeare_root), "--checkpoint", str(checkpoint)]) == 0
    assert "both LM" in capsys.readouterr().out and checkpoint.is_file()
    assert [p.name for p in checkpoint.parent.iterdir()] == ["tiny.pt"]  # no temporary left

    command = ["generate", "--checkpoint", str(checkpoint), "--prompt", "ROMEO:",
               "--max-new-tokens", "60", "--temperature", "0.8", "--top-k", "10", "--seed", "0"]
    assert main(command) == 0
    first = capsys.readouterr().out
    assert main(command) == 0
    assert capsys.readouterr().out == first  # the same seed prints the same text
    assert first.startswith("ROMEO:") and len(first) == len("ROMEO:") + 60 + 1  # print's newline

    lm = CharTransformerLM.from_checkpoint(checkpoint)
    assert lm.eqprop == ["both"] and lm.seq_len == 12 and len(lm.vocab) == 65
    assert lm.generate("ROMEO:", 60, temperature=0.8, top_k=10, generator=0) + "\n" == first
    assert main(command[:-1] + ["1"]) == 0
    assert capsys.readouterr().out != first

    assert main(command[:3] + ["--prompt", "café"]) == 1
    assert re.fullmatch(r"toreq generate: error: .*not in the vocabulary.*'é'.*\n",
                        capsys.readouterr().err)
    for bad in (["generate", "--checkpoint", str(checkpoint), "--temperature", "0"],
                ["lm-train", "--seq-len", "0", "--checkpoint", str(checkpoint)]):
        with pytest.raises(SystemExit) as stop:
            main(bad)
        assert stop.value.code == 2
        assert f"argument {bad[-4 if bad[0] == 'lm-train' else -2]}: expected" in capsys.readouterr().err


def test_trained_samples_beat_random_strings(shakespeare):
    train, val = shakespeare.train[:200_000], shakespeare.val[:8_000]
    torch.manual_seed(0)
    lm = CharTransformerLM(shakespeare.vocab_size, 32, 1, 2, 16, eqprop="both",
                           vocab=shakespeare.vocab)
    train_lm(lm, torch.optim.Adam(lm.parameters(), lr=3e-3), train, 150,
             generator=torch.Generator().manual_seed(0))
    unigram = unigram_perplexity(train, val, shakespeare.vocab_size)
    assert perplexity(lm, val, 16) < 0.6 * unigram

    n, length = 8, 16 + 1
    prompt = shakespeare.encode("\n").expand(n, 1)
    samples = lm.generate(prompt, length - 1, generator=0)
    random = torch.cat([prompt, torch.randint(0, shakespeare.vocab_size, (n, length - 1),
                                              generator=torch.Generator().manual_seed(0))], 1)

    def nll(ids):  # mean next-token negative log-likelihood under the model
        with torch.no_grad():
            logits = lm.eval()(ids[:, :-1])
        return float(F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()))

    print(f"per-character NLL: samples {nll(samples):.2f}, random strings {nll(random):.2f}, "
          f"uniform {math.log(shakespeare.vocab_size):.2f}")
    assert nll(samples) < nll(random) - 1.0
    # the samples look like the corpus: mostly lower-case letters and spaces
    text = "".join(lm.decode(s) for s in samples)
    assert sum(c.islower() or c == " " for c in text) > 0.6 * len(text), text
