"""CLI smoke tests: ``python -m minimtp.generate`` on the embedded pair, every flag, JSON, chat, one-line errors."""

import json
import os
import re
import subprocess
import sys

import pytest
from support.common import ASSISTANT_DIR, TARGET_DIR

from minimtp import generate
from minimtp.generate import main


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
        TARGET_DIR,
        "--assistant",
        ASSISTANT_DIR,
        "--prompt",
        "def f(",
        "--max-new-tokens",
        "5",
        "--json",
    )
    assert rc == 0 and json.loads(out)["stats"]["drafted"] > 0


def _strip_defaults(path: str) -> None:
    """Drop the fields whose defaults differ between gemma4_text and gemma4_unified_text from the (text_config of a)
    config.json, as a hand-written config omits them: minimtp must take transformers' unified defaults."""
    with open(os.path.join(path, "config.json")) as f:
        d = json.load(f)
    for k in ("sliding_window", "max_position_embeddings", "use_bidirectional_attention"):
        d["text_config"].pop(k)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f)


def test_12b_shaped_pair(capsys, tmp_path):
    """A tiny pair in the 12B's layout (tests/support/hf_models.py, "unified_12b": the gemma4_unified container,
    K = V with one global KV head, the 5:1 pattern, W = 1024) with the embedded model's tokenizer: the CLI generates
    with it, speculative greedy equals plain greedy and both equal transformers' greedy generate."""
    import shutil

    import torch
    from support.hf_models import build_multimodal, build_target, saved_pair

    import minimtp

    tdir, adir = saved_pair(str(tmp_path), "unified_12b", "multimodal")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TARGET_DIR, name), tdir)
    _strip_defaults(tdir)
    _strip_defaults(adir)
    with open(os.path.join(adir, "config.json")) as f:
        assert json.load(f)["model_type"] == "gemma4_unified_assistant"
    cfg = minimtp.load_target(tdir).config
    assert (cfg.sliding_window, cfg.max_position_embeddings, cfg.hidden_size_per_layer_input) == (1024, 262144, 0)
    args = ["--model", tdir, "--prompt", "def fibonacci(n):", "--max-new-tokens", "16", "--json"]
    args += ["--temperature", "0", "--dtype", "float32"]
    rc, a, _ = run(capsys, *args, "--assistant", adir, "-k", "3")
    assert rc == 0
    rc, b, _ = run(capsys, *args, "--no-assistant")
    assert rc == 0
    da, db = json.loads(a), json.loads(b)
    assert da["token_ids"] == db["token_ids"] and len(da["token_ids"]) == 16
    assert da["stats"]["drafted"] > 0 and db["stats"]["drafted"] == 0
    hf = build_multimodal(build_target("unified_12b"))
    ids = torch.tensor([da["prompt_token_ids"]])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16)
    assert out[0, ids.shape[1] :].tolist() == da["token_ids"]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--model", "/nonexistent/dir", "--prompt", "x"], "/nonexistent/dir: no such model directory"),
        (["--assistant", "/nonexistent/a", "--prompt", "x"], "/nonexistent/a: no such assistant directory"),
        (["--prompt", "x", "--top-p", "2"], "top_p=2.0"),
        (["--prompt", "x", "--temperature", "-1"], "temperature=-1.0"),
        (["--prompt", "x", "--top-k", "-3"], "top_k=-3"),
        (["--prompt", "x", "--min-p", "1.5"], "min_p=1.5"),
        (["--prompt", "x", "-k", "0"], "num_speculative_tokens=0"),
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


@pytest.mark.smoke
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
    from minimtp.stats import Stats

    s = Stats(generated_tokens=10, drafted=8, accepted=6, draft_rounds=2, target_steps=3, elapsed_s=1.0)
    line = generate.stats_line(s)
    assert "0.750 (6 accepted / 8 drafted)" in line and "mean acceptance length 4.00" in line


# --- controls: penalties, stop strings, grammars, token healing, generation configs ---------------------------

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "maximum": 150}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture
def control_files(tmp_path):
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    (tmp_path / "g.lark").write_text('start: "return " NAME "\\n"\nNAME: /[a-z_]{1,10}/\n')
    (tmp_path / "g.gbnf").write_text('root ::= "x = " [0-9]+ "\\n"\n')
    (tmp_path / "bad_key.json").write_text('{"type": "object", "properties": {"a": {"tpye": "string"}}}')
    (tmp_path / "bad.json").write_text('{"type": "object",')
    (tmp_path / "any.json").write_text("true")  # the boolean schema: any JSON value
    (tmp_path / "gc").mkdir()
    (tmp_path / "gc" / "generation_config.json").write_text('{"temperature": 1.0, "top_k": 64, "top_p": 0.95}')
    return tmp_path


@pytest.mark.parametrize(
    "flags",
    [
        ["--repetition-penalty", "1.3"],
        ["--presence-penalty", "0.5"],
        ["--frequency-penalty", "-0.5"],
        ["--stop", "\n", "--stop", "("],
        ["--stop", "(", "--include-stop-str-in-output"],
        ["--json-schema", "{dir}/schema.json", "--max-new-tokens", "40"],
        ["--json-schema", "{dir}/any.json", "--max-new-tokens", "40"],
        ["--regex", "[a-z_]+\\(\\)", "--max-new-tokens", "20"],
        ["--grammar", "{dir}/g.lark", "--max-new-tokens", "20"],
        ["--grammar", "{dir}/g.gbnf", "--max-new-tokens", "20"],
        ["--token-healing", "on"],
        ["--token-healing", "off"],
        ["--token-healing", "auto", "--no-assistant"],
        ["--generation-config", "auto"],
        ["--generation-config", "minimtp", "--reference"],
        ["--generation-config", "{dir}/gc", "--seed", "1"],
    ],
)
def test_control_flags(capsys, control_files, flags):
    flags = [f.replace("{dir}", str(control_files)) for f in flags]
    rc, out, err = run(capsys, "--prompt", "def f(x):\n", "--max-new-tokens", "10", "--json", *flags)
    assert rc == 0, err
    d = json.loads(out)
    assert isinstance(d["text"], str) and isinstance(d["settings"], dict) and "stop_reason" in d
    if "--stop" in flags:
        stops = [flags[i + 1] for i, f in enumerate(flags) if f == "--stop"]
        if d["stop_reason"] in stops:
            assert d["finish_reason"] == "stop"
            if "--include-stop-str-in-output" in flags:
                assert d["text"].endswith(d["stop_reason"])
        if "--include-stop-str-in-output" not in flags:
            assert not any(s in d["text"] for s in stops), d
    if "--json-schema" in flags and d["finish_reason"] == "stop":
        json.loads(d["text"])
    if any(f.endswith("schema.json") for f in flags):
        assert d["finish_reason"] == "stop" and set(json.loads(d["text"])) == {"name", "age"}
    if "--regex" in flags and d["finish_reason"] == "stop":
        assert re.fullmatch(r"[a-z_]+\(\)", d["text"]), d["text"]
    if "--grammar" in flags and d["finish_reason"] == "stop":
        assert re.fullmatch(r"return [a-z_]{1,10}\n|x = [0-9]+\n", d["text"]), d["text"]
    constrained = any(f in flags for f in ("--json-schema", "--regex", "--grammar"))
    mode = flags[flags.index("--token-healing") + 1] if "--token-healing" in flags else "auto"
    assert d["token_healing"] == (mode == "on" or (mode == "auto" and not constrained))


def test_generation_config_auto_on_the_embedded_model_is_greedy(capsys):
    rc, out, _ = run(capsys, "--prompt", "x = ", "--max-new-tokens", "4", "--json", "--generation-config", "auto")
    assert rc == 0 and json.loads(out)["settings"] == {"temperature": 0.0}  # do_sample: false
    rc, _, err = run(capsys, "--prompt", "x = ", "--max-new-tokens", "4", "--generation-config", "auto")
    assert rc == 0 and "[settings: greedy (do_sample=false from generation_config.json)]" in err


def test_generation_config_dir_and_flags_win(capsys, control_files):
    gc = str(control_files / "gc")
    args = ["--prompt", "x = ", "--max-new-tokens", "4", "--json", "--seed", "0", "--generation-config", gc]
    rc, out, _ = run(capsys, *args)
    assert rc == 0 and json.loads(out)["settings"] == {"temperature": 1.0, "top_k": 64, "top_p": 0.95}
    rc, out, _ = run(capsys, *args, "--top-k", "5")
    assert rc == 0 and json.loads(out)["settings"] == {"temperature": 1.0, "top_k": 5, "top_p": 0.95}
    rc, _, err = run(capsys, *[a for a in args if a != "--json"], "--top-k", "5")
    assert rc == 0 and "top_k=5" in err and "from generation_config.json; flags)" in err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--json-schema", "{dir}/bad_key.json"], "unknown key 'tpye'"),
        (["--json-schema", "{dir}/missing.json"], "missing.json: cannot read the JSON Schema file"),
        (["--json-schema", "{dir}/bad.json"], "bad.json: not valid JSON"),
        (["--grammar", "{dir}/missing.lark"], "missing.lark: cannot read the grammar file"),
        (["--regex", "(ab"], "unclosed group"),
        (["--regex", "a", "--grammar", "{dir}/g.lark"], "regex and grammar given"),
        (["--regex", "a+", "--token-healing", "on"], "token_healing"),
        (["--repetition-penalty", "0"], "repetition_penalty=0.0"),
        (["--repetition-penalty", "-1"], "repetition_penalty=-1.0"),
        (["--presence-penalty", "3"], "presence_penalty=3.0"),
        (["--frequency-penalty", "nan"], "frequency_penalty=nan"),
        (["--stop", ""], "stop[0]=''"),
        (["--generation-config", "{dir}/nope"], "nope/generation_config.json: no such file"),
        (["--generation-config", "{dir}"], "generation_config.json: no such file"),
    ],
)
def test_control_errors_are_one_line(capsys, control_files, argv, needle):
    argv = [a.replace("{dir}", str(control_files)) for a in argv]
    rc, out, err = run(capsys, "--prompt", "x", "--max-new-tokens", "4", *argv)
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert needle in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "prompt, flags",
    [
        ("def binary_search(items, target):\n", []),  # ends in a newline: healed into "\n    "
        ("class Stack:\n    def push(self, item):\n", []),
        ("print(", []),  # ends in "("
        ("for i in range(10):", []),  # ends in ":"
        ("x = ", []),  # ends in a space
        ("import", []),  # ends in a word
        ("def fibonacci(n):\n    if n < 2:\n        return n\n    return", []),
        ("Write a Python function that reverses a string.", ["--chat"]),
    ],
)
def test_no_natural_prompt_produces_empty_output(capsys, prompt, flags):
    rc, out, err = run(capsys, "--prompt", prompt, "--max-new-tokens", "16", *flags)
    assert rc == 0, err
    assert out.strip(), (prompt, out, err)


@pytest.mark.parametrize(
    "flags, stop",
    [
        ([], None),
        (["--stop", "list"], "list"),
        (["--stop", "\n", "--include-stop-str-in-output"], "\n"),
        (["--stop", "same", "--stop", "the list"], "the list"),
        (["--stop", '"""\n', "--include-stop-str-in-output"], '"""\n'),
        (["--token-healing", "off", "--stop", "(self"], "(self"),
    ],
)
def test_streamed_text_equals_the_json_text(capsys, flags, stop):
    """The streamed text (held back while it may still become a stop string) is the JSON "text"."""
    args = ["--prompt", "class Stack:\n    def push(self, item):\n", "--max-new-tokens", "24", *flags]
    rc, out, _ = run(capsys, *args)
    rc2, js, _ = run(capsys, *args, "--json")
    assert rc == rc2 == 0
    d = json.loads(js)
    assert out == d["text"] + "\n" and d["stop_reason"] == stop, d


@pytest.mark.parametrize(
    "flags",
    [
        ["--repetition-penalty", "1.3", "--presence-penalty", "0.4", "--frequency-penalty", "0.2"],
        ["--json-schema", "{dir}/schema.json"],
        ["--grammar", "{dir}/g.gbnf"],
        ["--stop", "list", "--token-healing", "on"],
    ],
)
def test_controls_greedy_speculative_equals_plain_through_the_cli(capsys, control_files, flags):
    flags = [f.replace("{dir}", str(control_files)) for f in flags]
    args = ["--prompt", "class Stack:\n", "--max-new-tokens", "40", "--json", "--dtype", "float32", *flags]
    _, a, _ = run(capsys, *args)
    _, b, _ = run(capsys, *args, "--no-assistant")
    da, db = json.loads(a), json.loads(b)
    assert da["token_ids"] == db["token_ids"] and da["text"] == db["text"]
    assert db["stats"]["drafted"] == 0 and da["stats"]["drafted"] > 0
