"""minimtp.checkpoint against checkpoints written by transformers 5.23 (tests/support/hf_models.py) and by hand."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.common import one_line_error
from support.hf_models import build_assistant, build_multimodal, build_target

import minimtp.checkpoint as ckpt
from minimtp.checkpoint import find_weight_files, load_weights, parse_dtype, read_json
from minimtp.errors import CheckpointError, ConfigError

FAMILIES = ["e2b", "moe", "dense", "unified", "unified_shared"]


def reference(model) -> dict[str, torch.Tensor]:
    """The HF state dict without the tied lm_head (which save_pretrained does not write)."""
    return {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}


def shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype, k
        assert torch.equal(got[k], v), k


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Save models lazily, once per module: saved(kind, family, dtype) -> directory."""
    root = tmp_path_factory.mktemp("ckpt")
    cache: dict[tuple, str] = {}

    def get(kind: str, family: str = "e2b", dtype: str = "float32") -> str:
        if (kind, family, dtype) not in cache:
            path = str(root / f"{kind}-{family}-{dtype}")
            dt = getattr(torch, dtype)
            if kind == "text":
                build_target(family).to(dt).save_pretrained(path)
            elif kind == "multimodal":
                build_multimodal(build_target(family)).to(dt).save_pretrained(path)
            elif kind == "sharded":
                build_target(family).to(dt).save_pretrained(path, max_shard_size="100KB")
            elif kind == "assistant":
                build_assistant(family).to(dt).save_pretrained(path)
            cache[kind, family, dtype] = path
        return cache[kind, family, dtype]

    return get


class Recorder:
    """Wraps a safe_open handle and records every tensor name whose header or data is accessed."""

    def __init__(self, real, log: list[str]):
        self.real, self.log = real, log

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.real.__exit__(*exc)

    def keys(self):
        return self.real.keys()

    def get_slice(self, name):
        self.log.append(name)
        return self.real.get_slice(name)

    def get_tensor(self, name):
        self.log.append(name)
        return self.real.get_tensor(name)


@pytest.fixture
def read_log(monkeypatch) -> list[str]:
    log: list[str] = []
    real_open = ckpt.safe_open
    monkeypatch.setattr(ckpt, "safe_open", lambda *a, **kw: Recorder(real_open(*a, **kw), log))
    return log


def copy_dir(src: str, dst) -> str:
    return shutil.copytree(src, str(dst))


# --- layouts -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_text_layout_bit_exact(saved, family):
    want = reference(build_target(family))
    assert_same(load_weights(saved("text", family), shapes(want), torch.float32), want)


# the encoders (gemma4: vision/audio towers) or the encoder-free embedders (gemma4_unified) beside the decoder
MM_PARTS = {
    "e2b": ("model.vision_tower.", "model.audio_tower."),
    "unified": ("model.embed_vision.", "model.embed_audio."),
}


@pytest.mark.parametrize("family", list(MM_PARTS))
def test_multimodal_layout_reads_only_language_model(saved, read_log, family):
    want = reference(build_target(family))
    path = saved("multimodal", family)
    on_disk = find_weight_files(path)
    for part in MM_PARTS[family]:
        assert any(k.startswith(part) for k in on_disk), part
    read_log.clear()
    assert_same(load_weights(path, shapes(want), torch.float32), want)
    assert read_log and all(k.startswith("model.language_model.") for k in read_log), read_log
    assert {k.removeprefix("model.language_model.") for k in read_log} == {k.removeprefix("model.") for k in want}


def test_legacy_duplicated_prefix(tmp_path):
    t = torch.randn(3, 4)
    save_file({"model.language_model.model.norm.weight": t}, str(tmp_path / "model.safetensors"))
    got = load_weights(tmp_path, {"model.norm.weight": (3, 4)}, torch.float32)
    assert torch.equal(got["model.norm.weight"], t)


@pytest.mark.parametrize("family", ["e2b", "moe"])
def test_sharded_layout(saved, family):
    path = saved("sharded", family)
    assert os.path.exists(os.path.join(path, ckpt.INDEX_NAME))
    assert len(set(find_weight_files(path).values())) > 2
    want = reference(build_target(family))
    assert_same(load_weights(path, shapes(want), torch.float32), want)


def test_several_files_without_index(tmp_path):
    a, b = torch.randn(2, 3), torch.arange(5)
    save_file({"a": a}, str(tmp_path / "part1.safetensors"))
    save_file({"b": b}, str(tmp_path / "part2.safetensors"))
    assert find_weight_files(tmp_path) == {
        "a": str(tmp_path / "part1.safetensors"),
        "b": str(tmp_path / "part2.safetensors"),
    }
    assert_same(load_weights(tmp_path, {"a": (2, 3), "b": (5,)}, torch.float32), {"a": a, "b": b})


def test_unexpected_tensors_are_never_read(saved, tmp_path, read_log):
    """KV-shared k/v weights (present in real E2B files) and odd dtypes outside `expected` are skipped."""
    want = reference(build_target("e2b"))
    tensors = load_file(os.path.join(saved("text"), "model.safetensors"))
    tensors["model.layers.5.self_attn.k_proj.weight"] = torch.zeros(32, 64, dtype=torch.float8_e4m3fn)
    tensors["model.embed_vision.flag"] = torch.zeros(3, dtype=torch.bool)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    read_log.clear()
    assert_same(load_weights(tmp_path, shapes(want), torch.float32), want)
    assert set(read_log) == set(want)


# --- dtypes --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["float32", "FP32", "float", "torch.float32", torch.float32])
def test_parse_dtype_float32(value):
    assert parse_dtype(value) is torch.float32


@pytest.mark.parametrize("value", ["bfloat16", "BF16", "bf16", torch.bfloat16])
def test_parse_dtype_bfloat16(value):
    assert parse_dtype(value) is torch.bfloat16


@pytest.mark.parametrize("value", ["float16", "fp16", "Half", torch.float16])
def test_parse_dtype_float16(value):
    assert parse_dtype(value) is torch.float16


@pytest.mark.parametrize("value", ["int8", "fp8", "", "float64", torch.float64, torch.int64])
def test_parse_dtype_unsupported(value):
    with pytest.raises(CheckpointError) as e:
        parse_dtype(value)
    msg = one_line_error(e, "unsupported dtype", "float32, bfloat16, float16")
    assert f"'{str(value).removeprefix('torch.')}'" in msg


def test_bf16_file_loaded_as_fp32(saved):
    want = {k: v.to(torch.bfloat16).float() for k, v in reference(build_target("e2b")).items()}
    assert_same(load_weights(saved("text", "e2b", "bfloat16"), shapes(want), torch.float32), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_file_loaded_as_half(saved, dtype):
    want = {k: v.to(dtype) for k, v in reference(build_target("moe")).items()}
    assert_same(load_weights(saved("text", "moe"), shapes(want), dtype), want)


@pytest.mark.parametrize("file_dtype", ["float32", "bfloat16"])
def test_assistant_token_ordering_stays_int64(saved, file_dtype):
    ref = reference(build_assistant("e2b"))
    assert ref["masked_embedding.token_ordering"].dtype == torch.int64
    got = load_weights(saved("assistant", "e2b", file_dtype), shapes(ref), "bf16")
    assert got["masked_embedding.token_ordering"].dtype == torch.int64
    assert torch.equal(got["masked_embedding.token_ordering"], ref["masked_embedding.token_ordering"])
    assert got["pre_projection.weight"].dtype == torch.bfloat16
    assert torch.equal(got["pre_projection.weight"], ref["pre_projection.weight"].to(torch.bfloat16))


def test_unsupported_file_dtype(tmp_path):
    save_file({"w": torch.zeros(4, dtype=torch.float8_e4m3fn)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_weights(tmp_path, {"w": (4,)}, torch.float32)
    one_line_error(e, str(tmp_path / "model.safetensors"), "'w'", "F8_E4M3", "expected F32, F16, BF16")


def test_unsupported_requested_dtype(saved):
    with pytest.raises(CheckpointError) as e:
        load_weights(saved("text"), {}, "fp8")
    one_line_error(e, "unsupported dtype 'fp8'", "expected one of float32, bfloat16, float16")


# --- bad input -----------------------------------------------------------------------------------------------


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError) as e:
        find_weight_files(tmp_path / "nope")
    one_line_error(e, str(tmp_path / "nope"), "does not exist")


def test_not_a_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError) as e:
        load_weights(tmp_path / "file", {}, torch.float32)
    one_line_error(e, str(tmp_path / "file"), "not a directory")


def test_no_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as e:
        find_weight_files(tmp_path)
    one_line_error(e, str(tmp_path), "no *.safetensors", "model.safetensors")


def test_only_pickle_weights(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 never unpickled")
    with pytest.raises(CheckpointError) as e:
        find_weight_files(tmp_path)
    one_line_error(e, str(tmp_path), "pytorch_model.bin", "safetensors only", "never unpickles")


def test_missing_shard(saved, tmp_path):
    path = copy_dir(saved("sharded"), tmp_path / "ck")
    index = os.path.join(path, ckpt.INDEX_NAME)
    shard = sorted(json.load(open(index))["weight_map"].values())[1]
    os.remove(os.path.join(path, shard))
    with pytest.raises(CheckpointError) as e:
        find_weight_files(path)
    one_line_error(e, os.path.join(path, shard), index, "does not exist")


def test_index_lists_tensor_absent_from_shard(saved, tmp_path):
    path = copy_dir(saved("sharded"), tmp_path / "ck")
    index = os.path.join(path, ckpt.INDEX_NAME)
    data = json.load(open(index))
    shard = data["weight_map"]["model.norm.weight"]
    data["weight_map"]["model.ghost.weight"] = shard
    json.dump(data, open(index, "w"))
    with pytest.raises(CheckpointError) as e:
        find_weight_files(path)
    one_line_error(e, os.path.join(path, shard), "'model.ghost.weight'", index)


@pytest.mark.parametrize(
    "text, needle", [("{not json", "line 1"), ('{\n"weight_map": [1, 2]}', "'weight_map'"), ("[]", "JSON object")]
)
def test_invalid_index_json(saved, tmp_path, text, needle):
    path = copy_dir(saved("sharded"), tmp_path / "ck")
    index = os.path.join(path, ckpt.INDEX_NAME)
    with open(index, "w") as fh:
        fh.write(text)
    with pytest.raises(CheckpointError) as e:
        load_weights(path, {}, torch.float32)
    one_line_error(e, index, needle)


def test_truncated_safetensors(saved, tmp_path):
    data = open(os.path.join(saved("text"), "model.safetensors"), "rb").read()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        find_weight_files(tmp_path)
    one_line_error(e, str(tmp_path / "model.safetensors"), "not a valid safetensors file")


@pytest.mark.parametrize("data", [b"garbage bytes, not a checkpoint" * 8, b"abc", b""])
def test_garbage_safetensors(tmp_path, data):
    (tmp_path / "model.safetensors").write_bytes(data)
    with pytest.raises(CheckpointError) as e:
        load_weights(tmp_path, {"x": (1,)}, torch.float32)
    one_line_error(e, str(tmp_path / "model.safetensors"), "not a valid safetensors file")


def test_wrong_shape(saved, tmp_path):
    tensors = load_file(os.path.join(saved("multimodal"), "model.safetensors"))
    tensors["model.language_model.norm.weight"] = torch.ones(65)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    want = reference(build_target("e2b"))
    with pytest.raises(CheckpointError) as e:
        load_weights(tmp_path, shapes(want), torch.float32)
    one_line_error(
        e, str(tmp_path / "model.safetensors"), "'model.language_model.norm.weight'", "(65,)", "expected (64,)"
    )


def test_missing_tensor(saved, tmp_path):
    tensors = load_file(os.path.join(saved("text"), "model.safetensors"))
    del tensors["model.layers.2.self_attn.q_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    want = reference(build_target("e2b"))
    with pytest.raises(CheckpointError) as e:
        load_weights(tmp_path, shapes(want), torch.float32)
    one_line_error(e, str(tmp_path), "missing tensor 'model.layers.2.self_attn.q_proj.weight'", "(128, 64)")


def test_duplicate_key_across_files(tmp_path):
    save_file({"a": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    save_file({"a": torch.ones(1)}, str(tmp_path / "y.safetensors"))
    with pytest.raises(CheckpointError) as e:
        find_weight_files(tmp_path)
    one_line_error(e, "'a'", str(tmp_path / "x.safetensors"), str(tmp_path / "y.safetensors"))


# --- read_json -----------------------------------------------------------------------------------------------


def test_read_json(tmp_path):
    (tmp_path / "config.json").write_text('{"a": 1}')
    assert read_json(tmp_path / "config.json", "config.json") == {"a": 1}


@pytest.mark.parametrize(
    "text, needles",
    [(None, ["not found"]), ('{\n  "a": 1,\n}', ["invalid JSON", "line 3"]), ("[1]", ["JSON object", "list"])],
)
def test_read_json_errors(tmp_path, text, needles):
    path = tmp_path / "config.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError) as e:
        read_json(path, "config.json")
    one_line_error(e, str(path), "config.json", *needles)


# --- memory --------------------------------------------------------------------------------------------------

# ru_maxrss is not usable as the peak of the child alone: Linux carries the parent's high-water mark across
# fork/exec into RUSAGE_SELF (signal->maxrss), so under pytest (~0.5 GB resident) the child's ru_maxrss starts
# above anything the load reaches and the bound would pass vacuously. VmHWM in /proc/self/status is the peak of
# the child's own address space; writing "5" to /proc/self/clear_refs resets it to the current RSS after imports.
# ru_maxrss is still reported for information.
PROBE = textwrap.dedent(
    """
    import json, resource, sys, torch
    from minimtp.checkpoint import load_weights

    def status_kb(field):
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))

    torch.zeros(1000).sum()  # initialise torch's CPU kernels / thread pool before measuring
    try:
        open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    hwm0, rss0 = status_kb("VmHWM"), status_kb("VmRSS")
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    expected = {f"model.layers.{i}.w": (1024, 1024) for i in range(int(sys.argv[2]))}
    weights = load_weights(sys.argv[1], expected, torch.float32)
    checksum = sum(float(t.sum()) for t in weights.values())  # touch every page of every tensor
    hwm1, rss1 = status_kb("VmHWM"), status_kb("VmRSS")
    maxrss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(dict(peak=(hwm1 - max(hwm0, rss0)) * 1024, current=(rss1 - rss0) * 1024,
                          ru_maxrss=(maxrss1 - maxrss0) * 1024, checksum=checksum)))
    """
)


def test_peak_memory_is_one_copy(tmp_path):
    """Peak RSS while loading ~160 MB of fp32 weights (plus a 40 MB tower that is never read) is ~1x.

    Allowance 30 MB: header dicts, allocator arenas and page tables cost a few MB (measured: ~2 MB);
    30 MB leaves room for allocator/OS variation while a second full copy (+160 MB) still fails clearly.
    """
    n, mb = 40, 4 * 2**20  # 40 tensors of 1024x1024 fp32
    g = torch.Generator().manual_seed(0)
    tensors = {f"model.layers.{i}.w": torch.randn(1024, 1024, generator=g) for i in range(n)}
    tensors.update({f"model.vision_tower.{i}.w": torch.randn(1024, 1024, generator=g) for i in range(10)})
    save_file(tensors, str(tmp_path / "model.safetensors"))
    del tensors
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path), str(n)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    loaded = n * mb
    assert report["current"] >= 0.9 * loaded, report  # the weights really are resident (test is not vacuous)
    assert report["peak"] <= 1.3 * loaded + 30 * 2**20, report


# --- the LM head ---------------------------------------------------------------------------------------------


def test_a_stored_head_is_never_replaced_by_the_embedding(saved, tmp_path):
    """config.json says tied, but model.safetensors stores an lm_head.weight that differs: the stored head is used
    (with a warning), exactly as the same checkpoint with tie_word_embeddings false; an equal stored head stays tied."""
    import json
    import warnings

    import minimtp

    src = saved("text")
    tensors = load_file(os.path.join(src, "model.safetensors"))
    embed = tensors["model.embed_tokens.weight"]
    head = torch.randn(embed.shape, generator=torch.Generator().manual_seed(0)).to(embed.dtype)
    ids = torch.tensor([[2, 17, 5, 11]])
    for name, stored, tie_in_config in (("differs", head, True), ("untied", head, False), ("equal", embed, True)):
        d = copy_dir(src, tmp_path / name)
        save_file({**tensors, "lm_head.weight": stored.clone()}, os.path.join(d, "model.safetensors"))
        cfg = json.load(open(os.path.join(d, "config.json")))
        cfg["tie_word_embeddings"] = tie_in_config
        json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m = minimtp.load_target(d)
        warned = any("stores a different lm_head.weight" in str(w.message) for w in caught)
        assert warned == (name == "differs"), name
        assert torch.equal(m.lm_head_weight, stored.float()), name
        if name == "differs":
            differs = m(ids)
        if name == "untied":
            assert torch.equal(m(ids), differs)
