"""Safetensors checkpoint reading: find the files, map key names, check shapes, cast, load lazily.

Only safetensors is read (never pickle). Only the tensors the model asks for are touched: vision/audio
towers, their embedders, the k/v weights of KV-shared layers and a tied `lm_head` are never read.

Memory: `safe_open(framework="pt").get_tensor` returns a view of a private mmap of the whole file, not a
copy (checked with safetensors 0.8). So a tensor loaded in its file dtype on the CPU *is* that view: no
second copy exists and the peak is ~1x the weights (the pages are file-backed and count in RSS once
touched). A cast allocates the new tensor; the source pages it touched stay resident until that file's
handle is closed, so files are read one at a time and closed right after (extra peak <= one shard).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Mapping

import torch
from safetensors import safe_open

from minimtp.errors import CheckpointError, ConfigError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_FLOAT_FILE_DTYPES = {"F64", "F32", "F16", "BF16"}
_INT_FILE_DTYPES = {"I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64"}
_DTYPE_ALIASES = {
    torch.float32: ("float32", "fp32", "float"),
    torch.bfloat16: ("bfloat16", "bf16"),
    torch.float16: ("float16", "fp16", "half"),
}
_DTYPE_NAMES = {name: dtype for dtype, names in _DTYPE_ALIASES.items() for name in names}


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """torch.float32/bfloat16/float16 or a name such as "bf16", "fp32", "half" (case-insensitive)."""
    if isinstance(value, torch.dtype) and value in _DTYPE_NAMES.values():
        return value
    if isinstance(value, str) and value.strip().lower().removeprefix("torch.") in _DTYPE_NAMES:
        return _DTYPE_NAMES[value.strip().lower().removeprefix("torch.")]
    shown = str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value
    raise CheckpointError(f"unsupported dtype '{shown}': expected one of float32, bfloat16, float16")


def default_aliases(key: str) -> tuple[str, ...]:
    """Checkpoint names to try for a model key: itself, then the multimodal layouts (the ``-it`` checkpoints keep
    the decoder under ``model.language_model.``; docs: guides/real-checkpoints, "What the loader does with the
    multimodal layout")."""
    if not key.startswith("model."):
        return (key,)
    rest = key[len("model.") :]
    return (key, "model.language_model." + rest, "model.language_model.model." + rest)


def _load_json(path, what: str, error: type[Exception]) -> dict:
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid JSON in {what} at line {e.lineno} column {e.colno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot read {what} ({_one_line(e)})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: {what} must be a JSON object, got {type(data).__name__}")
    return data


def read_json(path, what: str) -> dict:
    """Read a JSON object (config.json, generation_config.json); ConfigError naming the file otherwise."""
    return _load_json(path, what, ConfigError)


def _open(path: str):
    try:
        return safe_open(path, framework="pt")
    except Exception as e:  # SafetensorError for bad headers/truncation, OSError for unreadable files
        raise CheckpointError(f"{path}: not a valid safetensors file ({_one_line(e)})") from e


def _file_keys(path: str) -> set[str]:
    with _open(path) as f:
        return set(f.keys())


def _from_index(model_dir: str, index: str) -> dict[str, str]:
    weight_map = _load_json(index, "safetensors index", CheckpointError).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: expected a 'weight_map' object mapping tensor names to shard files")
    out = {key: os.path.join(model_dir, shard) for key, shard in weight_map.items()}
    for path in sorted(set(out.values())):
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: shard named in {index} does not exist")
        have = _file_keys(path)
        absent = sorted(k for k, p in out.items() if p == path and k not in have)
        if absent:
            raise CheckpointError(f"{path}: tensor '{absent[0]}' listed in {index} is not in this shard")
    return out


def find_weight_files(model_dir) -> dict[str, str]:
    """Map every tensor name of a checkpoint directory to the absolute path of the file holding it."""
    model_dir = os.path.abspath(os.fspath(model_dir))
    if not os.path.exists(model_dir):
        raise CheckpointError(f"{model_dir}: checkpoint directory does not exist")
    if not os.path.isdir(model_dir):
        raise CheckpointError(f"{model_dir}: not a directory (expected a folder holding *.safetensors)")
    index = os.path.join(model_dir, INDEX_NAME)
    if os.path.isfile(index):
        return _from_index(model_dir, index)
    single = os.path.join(model_dir, SINGLE_NAME)
    files = [single] if os.path.isfile(single) else sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        pickles = sorted(n for n in os.listdir(model_dir) if n.endswith(_PICKLE_SUFFIXES))
        if pickles:
            raise CheckpointError(
                f"{model_dir}: only pickle weights ({', '.join(pickles)}); minimtp loads safetensors only and "
                "never unpickles (convert with transformers' save_pretrained(safe_serialization=True))"
            )
        raise CheckpointError(f"{model_dir}: no *.safetensors weights (expected {SINGLE_NAME} or {INDEX_NAME})")
    out: dict[str, str] = {}
    for path in files:
        for key in _file_keys(path):
            if key in out:
                raise CheckpointError(f"{path}: tensor '{key}' is also in {out[key]} (expected each key once)")
            out[key] = path
    return out


def _read(f, path: str, name: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    meta = f.get_slice(name)  # header only: no data read yet
    file_shape, file_dtype = tuple(meta.get_shape()), meta.get_dtype()
    if file_shape != shape:
        raise CheckpointError(f"{path}: tensor '{name}' has shape {file_shape}, expected {shape}")
    if file_dtype not in _FLOAT_FILE_DTYPES | _INT_FILE_DTYPES:
        raise CheckpointError(
            f"{path}: tensor '{name}' has dtype {file_dtype}, expected F32, F16, BF16, F64 or an integer type"
        )
    try:
        t = f.get_tensor(name)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read tensor '{name}' ({_one_line(e)})") from e
    # Integer tensors (e.g. masked_embedding.token_ordering, int64) keep their dtype.
    return t.to(device=device, dtype=dtype if file_dtype in _FLOAT_FILE_DTYPES else t.dtype)


def stored_head_differs(model_dir, aliases: Callable[[str], tuple[str, ...]] = default_aliases) -> bool:
    """True iff the checkpoint stores an ``lm_head.weight`` that is not its input embedding (a tied config's head is
    normally not saved; when it is saved and differs, the checkpoint's head is the model's)."""
    weight_map = find_weight_files(model_dir)
    head = next((n for n in ("lm_head.weight", "model.language_model.lm_head.weight") if n in weight_map), None)
    embed = next((n for n in aliases("model.embed_tokens.weight") if n in weight_map), None)
    if head is None or embed is None:
        return False
    with _open(weight_map[head]) as f:
        h = f.get_tensor(head)
    with _open(weight_map[embed]) as f:
        return tuple(h.shape) != tuple(f.get_slice(embed).get_shape()) or not torch.equal(h, f.get_tensor(embed))


def load_weights(
    model_dir,
    expected: Mapping[str, tuple[int, ...]],
    dtype: torch.dtype,
    device="cpu",
    aliases: Callable[[str], tuple[str, ...]] = default_aliases,
) -> dict[str, torch.Tensor]:
    """Load exactly the tensors in `expected` (model key -> shape), cast floats to `dtype`, on `device`."""
    dtype = parse_dtype(dtype)
    shown_dir = os.path.abspath(os.fspath(model_dir))
    weight_map = find_weight_files(model_dir)
    plan: dict[str, list[tuple[str, str]]] = {}  # file -> [(model key, checkpoint key)]
    for key, shape in expected.items():
        name = next((n for n in aliases(key) if n in weight_map), None)
        if name is None:
            raise CheckpointError(f"{shown_dir}: missing tensor '{key}' (expected shape {tuple(shape)})")
        plan.setdefault(weight_map[name], []).append((key, name))
    out: dict[str, torch.Tensor] = {}
    for path, items in plan.items():  # one handle per file, closed before the next file is opened
        with _open(path) as f:
            for key, name in items:
                out[key] = _read(f, path, name, tuple(expected[key]), dtype, device)
    return {key: out[key] for key in expected}
