"""python -m minimtp.bench: the speedup model, and a tiny end-to-end run (table, JSON, plots, transformers A/B)."""

import json
import shutil

import pytest
from support.common import DEFAULT_DIR

from minimtp.bench.__main__ import main
from minimtp.bench.speedup import alpha_from_acceptance_length, predicted_speedup


def test_speedup_model():
    # α = 0 gives one token per round at cost k·c + 1; α → 1 gives k + 1 tokens
    assert predicted_speedup(0.0, 4, 0.1) == pytest.approx(1 / 1.4)
    assert predicted_speedup(1.0, 4, 0.0) == pytest.approx(5.0)
    assert predicted_speedup(0.8, 4, 0.05) == pytest.approx((1 - 0.8**5) / (0.2 * 1.2))
    for a, k in [(0.3, 2), (0.7, 4), (0.95, 6)]:
        mal = (1 - a ** (k + 1)) / (1 - a)
        assert alpha_from_acceptance_length(mal, k) == pytest.approx(a, abs=1e-9)


def test_bench_runs_end_to_end(tmp_path, capsys):
    rc = main(
        [
            "--ks",
            "1,2",
            "--max-new-tokens",
            "6",
            "--repeats",
            "1",
            "--prompts",
            "code,prose",
            "--out",
            str(tmp_path),
            "--compare-transformers",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "| code | 2 |" in out and "transformers generate" in out
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = report["rows"]
    assert {(r["prompt"], r["k"]) for r in rows} == {("code", 1), ("code", 2), ("prose", 1), ("prose", 2)}
    for r in rows:
        assert r["plain_tps"] > 0 and r["spec_tps"] > 0 and 1.0 <= r["mean_acceptance_length"] <= r["k"] + 1
    assert report["transformers"]["plain"] > 0 and report["transformers"]["assisted"] > 0
    for f in ("bench.md", "speedup_vs_k.png", "acceptance_by_position.png"):
        assert (tmp_path / f).stat().st_size > 0


def test_bench_serve_runs_end_to_end(tmp_path, capsys):
    pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    rc = main(
        ["serve", "--concurrency", "1,2", "--requests-per-level", "2", "--max-tokens", "4", "--out", str(tmp_path)]
        + ["--load-streams", "8", "--load-rounds", "2"]
    )
    out = capsys.readouterr().out
    assert rc == 0
    k = json.loads((tmp_path / "serve.json").read_text())["k"]
    for c in (1, 2):
        assert f"| {c} | yes (k={k}) | 2 |" in out and f"| {c} | no | 2 |" in out
    assert "Server overhead at concurrency 1" in out
    report = json.loads((tmp_path / "serve.json").read_text())
    assert {(r["concurrency"], r["k"]) for r in report["rows"]} == {(1, k), (1, 0), (2, k), (2, 0)}
    for r in report["rows"]:
        assert r["tokens"] == 2 * 4 and r["tok_s"] > 0 and r["ttft_p50_ms"] > 0
    assert report["overhead"][str(k)]["offline_tok_s"] > 0
    load = report["load"]  # 8 streams at once, twice: each text is the same request's alone, RSS read 3 times
    assert load["exact"] == [8, 8] and len(load["rss_mib"]) == 3 and "Load: 8 concurrent streams x 2 rounds" in out
    for f in ("serve.md", "serve.png"):
        assert (tmp_path / f).stat().st_size > 0


def test_bench_longctx_runs_end_to_end(tmp_path, capsys):
    """Both engines at two context lengths; --max-positions sets the limit the contexts must fit in."""
    out = tmp_path / "lc"
    argv = ["longctx", "--contexts", "16,600", "--new-tokens", "6", "--repeats", "1", "--out", str(out)]
    assert main(argv + ["--max-positions", "700"]) == 0
    rows = json.loads((out / "longctx.json").read_text())["rows"]
    assert [(r["engine"], r["context"]) for r in rows] == [
        ("reference", 16),
        ("reference", 600),
        ("fast", 16),
        ("fast", 600),
    ]
    for r in rows:
        assert r["plain"]["tau"] == 1.0 and r["spec"]["tau"] >= 1.0
        assert 0 < r["plain"]["ms_per_token"] and 0 < r["spec"]["draft_ms_per_round"]
    assert (out / "longctx.png").stat().st_size > 0
    assert "per 1,000 tokens of context" in capsys.readouterr().out
    assert main(argv + ["--max-positions", "512"]) == 2  # the contexts do not fit: one line, exit 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --contexts up to 600")


def test_bench_longctx_tokenizer_from_elsewhere(tmp_path, capsys):
    """A checkpoint without a tokenizer (as `realsize build` writes one): one line naming tokenizer.json, exit 2;
    --tokenizer takes the ids from another directory."""
    for part in ("target", "assistant"):
        shutil.copytree(f"{DEFAULT_DIR}/{part}", tmp_path / part, ignore=shutil.ignore_patterns("tokenizer*"))
    argv = ["longctx", "--model", str(tmp_path / "target"), "--assistant", str(tmp_path / "assistant")]
    argv += ["--contexts", "16", "--new-tokens", "4", "--repeats", "1", "--engines", "fast", "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no tokenizer.json" in err[0]
    assert main(argv + ["--tokenizer", f"{DEFAULT_DIR}/target"]) == 0
    assert "per 1,000 tokens" not in capsys.readouterr().out  # one context: a table, no slope
    assert [r["context"] for r in json.loads((tmp_path / "longctx.json").read_text())["rows"]] == [16]


@pytest.mark.slow
def test_bench_compare_runs_end_to_end(tmp_path, capsys):
    """minimtp and transformers on the embedded pair in child processes: every row of the table is filled."""
    d, out = DEFAULT_DIR, tmp_path / "cmp"
    argv = ["compare", "--model", f"{d}/target", "--assistant", f"{d}/assistant", "--prompt-tokens", "16"]
    assert main(argv + ["--new-tokens", "4", "--out", str(out)]) == 0
    res = json.loads((out / "compare.json").read_text())
    m, t = res["rows"]["minimtp"], res["rows"]["transformers"]
    for side in (m, t):
        assert side["load_s"] > 0 and side["prefill_s"] > 0 and side["plain_tok_s"] > 0 and side["peak_rss_gb"] > 0
    assert sorted(map(int, m["verify_ratio"])) == list(range(1, 8)) and m["c"] > 0
    assert [p["k"] for p in m["predicted"]] == [7, 4, 4] and res["bandwidth_gbs"] > 0
    md = capsys.readouterr().out
    assert "| plain decode (tok/s) |" in md and "roofline" in md
    assert main(["compare", "--model", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no config.json" in err[0]
