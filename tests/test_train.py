"""minimtp.train: tokenizer, a tiny pre-training run, a tiny distillation, selfgen, bench, and the shipped pair."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch
from support.common import ASSISTANT_DIR, TARGET_DIR

from minimtp import train
from minimtp.assistant import Gemma4Assistant
from minimtp.engine import Engine
from minimtp.model import Gemma4

CODE = 'def f(x):\n\t"""Tabs, ünïcode, 日本語 and emoji 🐍."""\n    return  x ** 2   # trailing  \n\n\n'

TINY_TARGET = [
    "--max-files", "12", "--vocab", "400", "--hidden", "32", "--intermediate", "64", "--layers", "3",
    "--pattern", "sf", "--heads", "2", "--kv-heads", "1", "--head-dim", "16", "--global-head-dim", "32",
    "--window", "16", "--batch-size", "4", "--seq-len", "64", "--lr", "1e-2", "--warmup", "5",
    "--eval-every", "20", "--eval-batches", "2", "--threads", "1", "--chat-frac", "0.2",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny target trained from scratch through the CLI (tokenizer + data + 40 steps + export)."""
    run = str(tmp_path_factory.mktemp("tiny") / "target")
    train.main(["target", "--out", run, "--steps", "40", *TINY_TARGET])
    return run


def _log(run):
    with open(os.path.join(run, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def _greedy_full(fn, ids, n):
    """Greedy decoding with a full, uncached forward per token (independent of any KV cache)."""
    ids = list(ids)
    for _ in range(n):
        ids.append(int(fn(torch.tensor([ids]))[0, -1].argmax()))
    return ids


def test_tiny_training_reduces_loss_and_exports(tiny_run):
    recs = _log(tiny_run)
    assert [r["step"] for r in recs] == list(range(1, 41))
    first, last = sum(r["loss"] for r in recs[:3]) / 3, sum(r["loss"] for r in recs[-3:]) / 3
    assert recs[0]["loss"] == pytest.approx(torch.log(torch.tensor(400.0)).item(), abs=0.3)  # 0.02 init ≈ uniform
    assert last < first - 0.5, (first, last)
    assert "val_loss" in recs[-1] and os.path.isfile(os.path.join(tiny_run, "report.png"))
    final = os.path.join(tiny_run, "final")
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert os.path.isfile(os.path.join(final, name)), name
    model = train.load_target(final)
    x = train.Batches(os.path.join(tiny_run, "data"), "val", 2, 64, 0, 0.0).get(0)
    assert train.lm_loss(model, x, "fp32").item() == pytest.approx(recs[-1]["val_loss"], abs=0.6)


def test_resume_continues_from_checkpoint(tiny_run, tmp_path):
    import shutil

    run = str(tmp_path / "resumed")
    shutil.copytree(tiny_run, run)
    train.main(["target", "--out", run, "--steps", "43", "--resume", *TINY_TARGET])
    recs = _log(run)
    assert [r["step"] for r in recs[-3:]] == [41, 42, 43] and len(recs) == 43


def test_tiny_distillation_raises_acceptance(tiny_run, tmp_path):
    final = os.path.join(tiny_run, "final")
    target = train.load_target(final)
    tok = train.load_tokenizer(final)
    prompts = [tok.encode(p).ids for p in ("def main():\n", "import os\n", "class A:\n    def f(self):\n")]
    run = str(tmp_path / "asst")
    args = ["assistant", "--out", run, "--target", final, "--max-files", "12", "--hidden", "32"]
    args += ["--intermediate", "64", "--layers", "2", "--heads", "2", "--steps", "40", "--batch-size", "4"]
    args += ["--seq-len", "64", "--lr", "1e-2", "--warmup", "5", "--eval-every", "20", "--eval-batches", "1"]
    args += ["--draft-steps", "3", "--threads", "1"]
    train.main(args)
    trained = train.load_assistant_dir(os.path.join(run, "final"))
    untrained = Gemma4Assistant(trained.config)
    train.init_weights(untrained)
    before = train.measure_acceptance(target, untrained.eval(), prompts, 24, 3)
    after = train.measure_acceptance(target, trained, prompts, 24, 3)
    assert after["acceptance_rate"] > before["acceptance_rate"] + 0.2, (before, after)
    assert after["drafted"] >= after["rounds"] > 0 and len(after["per_position"]) == 3
    assert after["acceptance_rate"] == round(after["accepted"] / after["drafted"], 3)
    recs = _log(run)
    assert recs[-1]["val_top1_1"] > 0.3


def test_selfgen_rows_are_the_targets_greedy_continuations(tiny_run, tmp_path):
    """`selfgen` writes <bos> + corpus prompt + the target's continuation; the greedy rows are exactly what plain
    greedy decoding (an uncached full forward per token) gives, and a distillation run can train on them."""
    import numpy as np

    final, data = os.path.join(tiny_run, "final"), str(tmp_path / "data")
    args = ["selfgen", "--target", final, "--out", data, "--max-files", "12", "--sequences", "8", "--batch", "4"]
    train.main(args + ["--prompt-len", "8", "--seq-len", "40", "--sample-frac", "0", "--threads", "1"])
    rows = np.load(os.path.join(data, "selfgen_train.npy"))
    assert rows.shape == (8, 41) and (rows[:, 0] == train.BOS).all()
    target = train.load_target(final, torch.float32)
    for r in rows[:2].tolist():
        assert _greedy_full(target, r[:9], 32) == r
    run = str(tmp_path / "asst")
    args = ["assistant", "--out", run, "--target", final, "--max-files", "12", "--hidden", "32", "--intermediate"]
    args += ["64", "--layers", "2", "--heads", "2", "--steps", "3", "--batch-size", "4", "--seq-len", "40"]
    args += ["--selfgen-frac", "1.0", "--selfgen-data", data, "--eval-batches", "1", "--threads", "1"]
    train.main(args)
    assert os.path.isfile(os.path.join(run, "final", "model.safetensors"))
    # a one-layer drafter warm-started from layer 1 of that one (--init-layers): lr 0 keeps the copied weights
    shallow = str(tmp_path / "shallow")
    args = ["assistant", "--out", shallow, "--target", final, "--max-files", "12", "--hidden", "32"]
    args += ["--intermediate", "64", "--layers", "1", "--pattern", "f", "--heads", "2", "--steps", "1"]
    args += ["--batch-size", "2", "--seq-len", "40", "--lr", "0", "--init-from", os.path.join(run, "final")]
    args += ["--init-layers", "1", "--eval-batches", "1", "--threads", "1"]
    train.main(args)
    src = train.load_assistant_dir(os.path.join(run, "final")).state_dict()
    dst = train.load_assistant_dir(os.path.join(shallow, "final")).state_dict()
    assert len(dst) < len(src)
    for k, v in dst.items():
        want = src[k.replace("model.layers.0.", "model.layers.1.")]
        assert torch.equal(v, want), k


def test_export_accept_and_report_commands(tiny_run, tmp_path, capsys):
    """`export` rewrites the final directory from the checkpoint; `accept` measures a pair through the engine
    (speculative output identical to plain); `report` draws the curves."""
    final, exported = os.path.join(tiny_run, "final"), str(tmp_path / "exported")
    train.main(["export", "--out", tiny_run, "--to", exported])
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        with open(os.path.join(final, name), "rb") as a, open(os.path.join(exported, name), "rb") as b:
            assert a.read() == b.read(), name
    target = train.load_target(final)
    a = argparse.Namespace(hidden=32, intermediate=64, layers=1, pattern="f", heads=2)
    cfg = train.assistant_config_dict(a, target.config)
    asst = Gemma4Assistant(train.parse_assistant_dict(cfg))
    train.init_weights(asst)
    adir = str(tmp_path / "asst")
    train.export_assistant(asst, cfg, adir, 3)
    capsys.readouterr()
    train.main(["accept", "--target", final, "--assistant", adir, "--k", "3", "--new-tokens", "8", "--engine"])
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    acc, timing = lines[0]["acceptance"], lines[1]["timing"]
    assert acc["k"] == 3 and acc["drafted"] > 0 and 0 <= acc["acceptance_rate"] <= 1
    assert timing["identical_to_plain"] is True
    png = str(tmp_path / "curves.png")
    train.main(["report", "--out", tiny_run, "--png", png])
    assert os.path.isfile(png)


def test_bench_command_times_every_k(capsys):
    """`bench`: k-token forward latencies of a target shape and an assistant step, in bf16 and fp32."""
    shape = ["--vocab", "64", "--hidden", "32", "--intermediate", "64", "--layers", "2", "--pattern", "sf"]
    shape += ["--heads", "2", "--kv-heads", "1", "--head-dim", "16", "--global-head-dim", "32", "--window", "8"]
    train.main(["bench", *shape, "--past", "24", "--assistant-layers", "1", "--assistant-hidden", "16"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["past"] == 24 and out["threads"] == 1 and out["params_M"] > 0
    for dt in ("bf16", "fp32"):
        assert all(out[dt][f"k{k}_ms"] > 0 for k in (1, 2, 3, 5)), out
        assert out[dt]["k5_ratio"] == pytest.approx(out[dt]["k5_ms"] / out[dt]["k1_ms"], abs=0.01)
        assert out[dt]["assistant_step_ms"] > 0


def test_tokenizer_roundtrip_tiny(tmp_path):
    _, texts, _ = train.read_corpus(max_files=8)
    train.train_tokenizer(texts, 300, str(tmp_path))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    ids = tok(CODE).input_ids
    assert ids[0] == train.BOS and tok.decode(ids, skip_special_tokens=True) == CODE
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)


# ------------------------------------------------------------------------------------------- shipped pair


def test_shipped_tokenizer():
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = AutoTokenizer.from_pretrained(TARGET_DIR)
    for text in (CODE, "import os\nprint(os.getcwd())\n", "x = {'a': [1, 2.5e-3]}\r\n\tpass"):
        ids = tok(text).input_ids
        assert ids[0] == 2 and tok.decode(ids, skip_special_tokens=True) == text
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4]) == train.SPECIAL_TOKENS
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Sort a list"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<bos><start_of_turn>user\nSort a list<end_of_turn>\n<start_of_turn>model\n"
    raw = PreTrainedTokenizerFast(tokenizer_file=os.path.join(TARGET_DIR, "tokenizer.json"))
    assert raw(CODE).input_ids == tok(CODE).input_ids
    with open(os.path.join(TARGET_DIR, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == [1, 4]
    with open(os.path.join(ASSISTANT_DIR, "generation_config.json")) as f:
        assert json.load(f)["num_assistant_tokens"] >= 1


@pytest.mark.smoke
def test_shipped_target_matches_transformers():
    from transformers import Gemma4ForCausalLM

    hf = Gemma4ForCausalLM.from_pretrained(TARGET_DIR, dtype=torch.float32).eval()
    ours = train.load_target(TARGET_DIR, torch.float32)
    assert isinstance(ours, Gemma4) and ours.config.final_logit_softcapping == 30.0
    tok = train.load_tokenizer(TARGET_DIR)
    prompts = ["def fibonacci(n):\n", "import os\nimport sys\n", "class Stack:\n    def __init__(self):\n"]
    with torch.no_grad():
        x = torch.tensor([tok.encode(prompts[0]).ids])
        torch.testing.assert_close(ours(x), hf(x).logits, atol=2e-3, rtol=1e-3)
        for p in prompts:
            ids = tok.encode(p).ids
            a = _greedy_full(lambda t: hf(t).logits, ids, 20)
            b = _greedy_full(ours, ids, 20)
            assert a == b, (p, a, b)
            res = Engine(ours).generate([ids], max_new_tokens=20, stop_token_ids=[])
            assert ids + res.tokens[0] == b  # the engine's cached decoding agrees too


def test_shipped_pair_acceptance():
    from minimtp.assistant import load_assistant

    target = train.load_target(TARGET_DIR, torch.float32)
    asst = load_assistant(ASSISTANT_DIR, target)  # validates the pair (KV layout, hidden size, vocab)
    tok = train.load_tokenizer(TARGET_DIR)
    prompts = [tok.encode(p).ids for p in train.DEFAULT_PROMPTS[:3]]
    res = train.measure_acceptance(target, asst, prompts, 32, asst.config.num_assistant_tokens)
    assert res["acceptance_rate"] > 0.4, res
