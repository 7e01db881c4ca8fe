"""CLI smoke tests: ``python -m minimtp.generate`` on the embedded pair, every flag, JSON, chat, one-line errors."""

import json
import os
import subprocess
import sys

import pytest

from minimtp import generate
from minimtp.generate import DEFAULT_DIR, main

HAVE_PAIR = os.path.isfile(os.path.join(DEFAULT_DIR, "target", "model.safetensors"))
pytestmark = pytest.mark.skipif(not HAVE_PAIR, reason="embedded default model not present")


def run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_text_streams_and_prints_stats(capsys):
    rc, out, err = run(capsys, "--prompt", "def fibonacci(n):", "--max-new-tokens", "12")
    assert rc == 0
    assert out.strip(), "no text streamed"
    assert "accepted /" in err and "drafted" in err and "tok/s" in err and "TTFT" in err
    assert "mean acceptance length" in err


def test_json_has_the_contracted_fields(capsys):
    rc, out, _ = run(capsys, "--prompt", "import os\n", "--max-new-tokens", "9", "--json", "-k", "3")
    assert rc == 0
    d = json.loads(out)
    assert isinstance(d["text"], str) and len(d["token_ids"]) == 9
    for key in (
        "tokens_per_second",
        "mean_acceptance_length",
        "acceptance_rate",
        "accepted",
        "drafted",
        "target_steps",
        "ttft_s",
    ):
        assert key in d["stats"], key
    s = d["stats"]
    assert s["drafted"] >= s["accepted"] >= 0 and 1.0 <= s["mean_acceptance_length"] <= 4.0


def test_greedy_speculative_equals_plain_through_the_cli(capsys):
    args = ["--prompt", "class Stack:\n", "--max-new-tokens", "16", "--json", "--dtype", "float32"]
    _, a, _ = run(capsys, *args)
    _, b, _ = run(capsys, *args, "--no-assistant")
    da, db = json.loads(a), json.loads(b)
    assert da["token_ids"] == db["token_ids"]
    assert db["stats"]["drafted"] == 0 and da["stats"]["drafted"] > 0


@pytest.mark.parametrize(
    "flags",
    [
        ["--temperature", "0.8", "--seed", "3"],
        ["--temperature", "1.0", "--top-k", "20", "--seed", "1"],
        ["--temperature", "0.9", "--top-p", "0.9", "--seed", "1", "--draft-mode", "sample"],
        ["--temperature", "1.0", "--min-p", "0.1", "--seed", "2", "--draft-mode", "argmax"],
        ["--dtype", "bfloat16", "--num-speculative-tokens", "2"],
        ["--dtype", "float32", "--threads", "1"],
        ["--draft-dtype", "int8", "--temperature", "0.7", "--draft-mode", "sample", "--seed", "4"],
        ["--draft-dtype", "float16"],
        ["--draft-dtype", "float32", "--dtype", "bfloat16"],
        ["--chat"],
    ],
)
def test_flags(capsys, flags):
    rc, out, _ = run(capsys, "--prompt", "x = ", "--max-new-tokens", "6", "--json", *flags)
    assert rc == 0
    d = json.loads(out)
    assert len(d["token_ids"]) <= 6 and all(0 <= t < 8192 * 4 for t in d["token_ids"])
    if "--chat" in flags:
        assert d["prompt_token_ids"][0] == 2  # the chat template starts with <bos>


def test_seed_reproduces(capsys):
    args = ["--prompt", "for i in", "--max-new-tokens", "8", "--json", "--temperature", "1.0", "--seed", "7"]
    _, a, _ = run(capsys, *args)
    _, b, _ = run(capsys, *args)
    assert json.loads(a)["token_ids"] == json.loads(b)["token_ids"]


def test_prompt_file_and_stdin(capsys, tmp_path, monkeypatch):
    f = tmp_path / "p.txt"
    f.write_text("while True:\n")
    rc, out, _ = run(capsys, "--prompt-file", str(f), "--max-new-tokens", "4", "--json")
    assert rc == 0 and json.loads(out)["prompt_token_ids"][1:]
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("if x:\n"))
    rc, out, _ = run(capsys, "--max-new-tokens", "4", "--json")
    assert rc == 0 and len(json.loads(out)["token_ids"]) == 4


def test_explicit_model_and_assistant_dirs(capsys):
    rc, out, _ = run(
        capsys,
        "--model",
        os.path.join(DEFAULT_DIR, "target"),
        "--assistant",
        os.path.join(DEFAULT_DIR, "assistant"),
        "--prompt",
        "def f(",
        "--max-new-tokens",
        "5",
        "--json",
    )
    assert rc == 0 and json.loads(out)["stats"]["drafted"] > 0


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--model", "/nonexistent/dir", "--prompt", "x"], "/nonexistent/dir: no such model directory"),
        (["--assistant", "/nonexistent/a", "--prompt", "x"], "/nonexistent/a: no such assistant directory"),
        (["--prompt", "x", "--top-p", "2"], "top_p=2.0"),
        (["--prompt", "x", "--temperature", "-1"], "temperature=-1.0"),
        (["--prompt", "x", "--top-k", "-3"], "top_k=-3"),
        (["--prompt", "x", "--min-p", "1.5"], "min_p=1.5"),
        (["--prompt", "x", "-k", "0"], "num_speculative_tokens = 0"),
        (["--prompt", "x", "--dtype", "int8"], "unsupported dtype 'int8'"),
        (["--prompt", "x", "--draft-dtype", "int4"], "unsupported assistant dtype 'int4'"),
        (["--prompt", ""], "the prompt is empty"),
        (["--prompt-file", "/nonexistent/p.txt"], "/nonexistent/p.txt"),
    ],
)
def test_errors_are_one_line(capsys, argv, needle):
    rc, out, err = run(capsys, *argv)
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert needle in err
    assert "Traceback" not in err


def test_model_dir_without_tokenizer(capsys, tmp_path):
    rc, _, err = run(capsys, "--model", str(tmp_path), "--no-assistant", "--prompt", "x")
    assert rc == 2 and "no tokenizer.json" in err and err.count("\n") == 1


def test_python_dash_m_exit_codes():
    """The real entry point: a working run exits 0, bad input exits 2 with one line and no traceback."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    ok = subprocess.run(
        [sys.executable, "-m", "minimtp.generate", "--prompt", "a", "--max-new-tokens", "3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "minimtp.generate", "--prompt", "a", "--top-k", "-1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.strip().count("\n") == 0


def test_stats_line_format():
    from minimtp.engine import Stats

    s = Stats(generated_tokens=10, drafted=8, accepted=6, draft_rounds=2, target_steps=3, elapsed_s=1.0)
    line = generate.stats_line(s)
    assert "0.750 (6 accepted / 8 drafted)" in line and "mean acceptance length 4.00" in line
