"""The language-model study's variants (toreq.nn.lm.build_lm, LoopedMLPLM, the shared block) and
its runner (toreq.lm_study, toreq lm-study)."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

import toreq.lm_study as study
from toreq.cli import main
from toreq.lm_training import train_lm
from toreq.nn.lm import (LM_VARIANTS, CharLM, CharTransformerLM, LoopedMLPLM, build_lm,
                         count_parameters)
from toreq.train import save_checkpoint

VOCAB, T = 65, 16


@pytest.mark.parametrize("variant", list(LM_VARIANTS))
def test_build_lm_matches_the_parameter_budget(variant):
    params = 100_000
    torch.manual_seed(0)
    lm = build_lm(variant, VOCAB, T, params=params, n_layers=3, n_heads=1)
    count = count_parameters(lm)
    assert abs(count / params - 1) <= 0.05
    # the closest width: one step narrower or wider is farther from the budget
    width = lm.config["hidden" if variant == "looped_mlp" else "d_model"]
    for other in (width - 1, width + 1):
        neighbour = build_lm(variant, VOCAB, T, width=other, n_layers=3, n_heads=1)
        assert abs(count_parameters(neighbour) - params) >= abs(count - params)
    if variant == "looped_mlp":
        assert isinstance(lm, LoopedMLPLM)
    else:
        assert lm.eqprop == {"backprop": ["none"] * 3, "full": ["both"] * 3,
                             "attention_only": ["attention"] * 3,
                             "hybrid": ["none", "none", "both"],
                             "recurrent_core": ["both"] * 3}[variant]
        assert lm.shared == (variant == "recurrent_core")
    # the search leaves the generator alone: the same weights as a model of that width
    torch.manual_seed(0)
    same = build_lm(variant, VOCAB, T, width=width, n_layers=3, n_heads=1)
    assert all(torch.equal(a, b) for a, b in zip(lm.parameters(), same.parameters()))


def test_build_lm_rejects_bad_arguments():
    with pytest.raises(ValueError, match="variant must be one of"):
        build_lm("eqprop", VOCAB, T, params=10_000)
    with pytest.raises(ValueError, match="give one of params and width"):
        build_lm("full", VOCAB, T, params=10_000, width=8)
    with pytest.raises(ValueError, match="full cannot have params=3,000 within tolerance"):
        build_lm("full", VOCAB, T, params=3_000)  # the embeddings alone are more
    with pytest.raises(ValueError, match="a shared block has one eqprop value"):
        CharTransformerLM(VOCAB, 8, 2, 2, T, eqprop=["none", "both"], shared=True)


def test_recurrent_core_applies_one_block_n_layers_times(one_thread, tmp_path):
    torch.manual_seed(0)
    lm = build_lm("recurrent_core", VOCAB, T, width=12, n_layers=3, n_heads=2,
                  block_options=dict(max_steps=15, tol=1e-5))
    single = CharTransformerLM(VOCAB, 12, 1, 2, T, eqprop="both")
    assert len(lm.blocks) == 1 and count_parameters(lm) == count_parameters(single)
    idx = torch.randint(0, VOCAB, (2, T))
    lm.eval()
    with torch.no_grad():
        x = lm.token(idx) + lm.position.weight
        for _ in range(3):
            x = lm.blocks[0](x)
        expected = lm.readout(lm.norm(x))
        assert torch.allclose(lm(idx), expected, atol=1e-6)
    lm.train()
    torch.nn.functional.cross_entropy(lm(idx).flatten(0, 1), idx.flatten()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lm.blocks.parameters())

    with torch.no_grad():  # the backward pass's power iteration moved spectral norm's vector
        now = lm.eval()(idx)
    path = tmp_path / "core.pt"
    save_checkpoint(path, SimpleNamespace(model=lm, optimizer=torch.optim.Adam(lm.parameters())),
                    epoch=0, history=[], extra={"lm_config": lm.config,
                                                "lm_class": type(lm).__name__})
    rebuilt = CharLM.from_checkpoint(path)
    assert isinstance(rebuilt, CharTransformerLM) and rebuilt.shared and len(rebuilt.blocks) == 1
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(idx), now)
    with pytest.raises(RuntimeError, match="holds a CharTransformerLM, not a LoopedMLPLM"):
        LoopedMLPLM.from_checkpoint(path)


def test_looped_mlp_sees_only_its_last_context_characters(one_thread):
    torch.manual_seed(0)
    lm = LoopedMLPLM(VOCAB, 24, T, context=4, embed_dim=6,
                     block_options=dict(max_steps=30, tol=1e-6)).eval()
    idx = torch.randint(0, VOCAB, (3, T))
    changed = idx.clone()
    changed[:, 7] = (idx[:, 7] + 1) % VOCAB
    with torch.no_grad():
        a, b = lm(idx), lm(changed)
    assert a.shape == (3, T, VOCAB)
    assert torch.equal(a[:, :7], b[:, :7])  # causal: earlier positions do not see position 7
    assert (a[:, 7:11] - b[:, 7:11]).abs().amax(-1).min() > 1e-4  # positions 7..10 see it
    assert torch.equal(a[:, 11:], b[:, 11:])  # later ones see only their last 4 characters
    # the first positions read the padding: the same logits as the window's tail alone
    with torch.no_grad():
        assert torch.allclose(lm(idx[:, :3]), a[:, :3], atol=1e-6)
    with pytest.raises(ValueError, match="block_options must not set activation"):
        LoopedMLPLM(VOCAB, 8, T, block_options=dict(activation="relu"))
    with pytest.raises(ValueError, match="context must be a positive int"):
        LoopedMLPLM(VOCAB, 8, T, context=0)


def test_looped_mlp_learns_with_train_lm(one_thread):
    torch.manual_seed(0)
    text = torch.arange(200) % 5  # 0 1 2 3 4 0 1 ...: each character follows from the last
    lm = LoopedMLPLM(5, 16, 8, context=2, embed_dim=4)
    history = train_lm(lm, torch.optim.Adam(lm.parameters(), lr=3e-2), text, 40, batch_size=8,
                       generator=torch.Generator().manual_seed(0), eval_ids=text)
    assert history[0]["val_perplexity"] > 4 and history[-1]["val_perplexity"] < 1.2


TINY = dataclasses.replace(
    study.QUICK, name="tiny", base_params=12_000, scales=(1.0,), n_heads=1, seq_len=16,
    batch_size=16, steps=80, data_steps=80, lr=1e-2,
    block_options=dict(max_steps=15, tol=1e-3, beta=0.05),
    data_sizes=(5_000,), data_params=12_000, data_variants=("backprop", "looped_mlp"),
    seq_lens=(16,), seq_chars=5_000, seq_variant=None, eval_chars=1_000, tolerance=0.1)


def test_a_tiny_study_beats_unigram_is_interruptible_and_resumes(one_thread, shakespeare,
                                                                  tmp_path, monkeypatch):
    out, real = tmp_path / "study", study.run_one
    calls = []

    def interrupted(*args, **kwargs):  # Ctrl-C during the third run
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args[0].key)
        return real(*args, **kwargs)

    monkeypatch.setattr(study, "run_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        study.run_study(shakespeare, out, TINY)
    assert [r["key"] for r in study.read_results(out / "results.jsonl")] == calls

    with pytest.raises(FileExistsError, match="already holds 2 runs"):
        study.run_study(shakespeare, out, TINY)
    with pytest.raises(ValueError, match="runs of another configuration"):
        study.run_study(shakespeare, out, dataclasses.replace(TINY, steps=81), resume=True)
    monkeypatch.setattr(study, "run_one", real)
    rows = study.run_study(shakespeare, out, TINY, resume=True)
    keys = [r["key"] for r in rows]
    assert keys[:2] == calls and len(keys) == len(set(keys)) == 6 + 2 + 2
    for row in rows:
        bar = 0.7 if row["experiment"] == "variants" else 0.85
        assert row["val_perplexity"] <= bar * row["unigram_perplexity"], row
        assert abs(row["params"] / row["target_params"] - 1) <= 0.1
        assert row["steps"] == 80 and row["lr"] == 1e-2 and row["wall_time_s"] > 0
        assert row["threads"] == torch.get_num_threads()
        assert 0 < row["val_accuracy"] < 1
        assert row["block_options"] == (None if row["variant"] == "backprop"
                                        else TINY.block_options)
    best = min((r for r in rows if r["experiment"] == "variants" and r["variant"] != "backprop"),
               key=lambda r: r["val_perplexity"])["variant"]
    assert {r["variant"] for r in rows if r["experiment"] == "seq_len"} == {"backprop", best}

    saved = json.loads((out / "results.json").read_text())
    assert [r["key"] for r in saved["rows"]] == keys and saved["config"]["steps"] == 80
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(rows) and "val_perplexity" in csv_lines[0]
    summary = (out / "summary.md").read_text()
    assert "## Variants x scale" in summary and "**Crossover**" in summary
    assert "## Sequence length" in summary

    monkeypatch.setattr(study, "run_one", lambda *a, **k: pytest.fail("trained a finished run"))
    again = study.run_study(shakespeare, out, TINY, resume=True)
    assert [r["key"] for r in again] == keys


def test_crossover_is_the_smallest_size_where_eqprop_wins():
    def row(n, variant, ppl):
        return {"experiment": "data_size", "train_chars": n, "variant": variant,
                "val_perplexity": ppl, "unigram_perplexity": 20.0}

    rows = [row(1000, "backprop", 9.0), row(1000, "full", 9.5), row(1000, "looped_mlp", 9.2),
            row(5000, "backprop", 7.0), row(5000, "full", 6.5), row(5000, "looped_mlp", 6.8),
            row(9000, "backprop", 6.0), row(9000, "full", 5.0)]
    assert study.crossover(rows) == (5000, "full", 6.5, 7.0)
    assert study.crossover(rows[:3]) is None
    assert "none: no EqProp variant beat" in study.summarize(rows[:3], TINY)
    summary = study.summarize(rows, TINY)
    assert "at 5,000 training characters full reaches perplexity 6.50, below backprop's " \
           "7.00" in summary and "at every size from 5,000 on." in summary
    rows[-1]["val_perplexity"] = 6.5  # backprop wins again at 9,000 characters
    assert study.crossover(rows) == (5000, "full", 6.5, 7.0)
    assert "beats backprop at 5,000 characters; not at the largest size measured." in \
        study.summarize(rows, TINY)


def test_lm_train_builds_study_variants_and_generate_reads_them(shakespeare_root, tmp_path,
                                                                capsys):
    checkpoint = tmp_path / "looped.pt"
    assert main(["lm-train", "--variant", "looped_mlp", "--params", "8000", "--steps", "3",
                 "--seq-len", "12", "--eval-chars", "500", "--data-dir", str(shakespeare_root),
                 "--threads", "1", "--checkpoint", str(checkpoint)]) == 0
    assert "looped_mlp LM" in capsys.readouterr().out
    model = CharLM.from_checkpoint(checkpoint)
    assert isinstance(model, LoopedMLPLM) and abs(count_parameters(model) / 8000 - 1) < 0.05
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "ROMEO:",
                 "--max-new-tokens", "5", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")
    assert main(["lm-train", "--variant", "ffn", "--params", "8000", "--checkpoint",
                 str(tmp_path / "other.pt")]) == 1
    assert "--params needs a study variant" in capsys.readouterr().err


def test_lm_study_command_refuses_to_overwrite(shakespeare_root, tmp_path, capsys):
    out = tmp_path / "study"
    out.mkdir()
    (out / "results.jsonl").write_text(json.dumps({"key": "k", "config_id": "x"}) + "\n")
    assert main(["lm-study", "--quick", "--out", str(out), "--data-dir",
                 str(shakespeare_root)]) == 1
    assert "already holds 1 runs" in capsys.readouterr().err
