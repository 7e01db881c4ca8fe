"""Hugging Face ``config.json`` → frozen dataclasses for the Gemma 4 target and its assistant.

Accepted ``model_type`` values: ``gemma4_text`` (``Gemma4ForCausalLM``), ``gemma4`` (the multimodal container of the
real ``google/gemma-4-*-it`` checkpoints; its ``text_config`` is used), the 12B's ``gemma4_unified_text`` /
``gemma4_unified`` (the same decoder, other defaults, no PLE or MoE) and the drafters ``gemma4[_unified]_assistant``.
Per-layer head dims / KV heads come from either the older ``global_head_dim`` / ``num_global_key_value_heads`` form
or the ``per_layer_config`` form transformers 5.23 writes (docs: concepts/gemma4-target, "Configuration";
transformers ``models/gemma4/configuration_gemma4.py``, ``Gemma4TextConfig``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass

from minimtp.errors import ConfigError

SLIDING, FULL = "sliding_attention", "full_attention"
TEXT_TYPES = ("gemma4_text", "gemma4", "gemma4_unified_text", "gemma4_unified")
ASSISTANT_TYPES = ("gemma4_assistant", "gemma4_unified_assistant")
# transformers models/gemma4_unified/configuration_gemma4_unified.py, Gemma4UnifiedTextConfig: the defaults that
# differ from Gemma4TextConfig's, and the fields it does not have (its decoder layers have no PLE, no MoE block)
UNIFIED_DEFAULTS = {"sliding_window": 1024, "max_position_embeddings": 262144}
UNIFIED_ABSENT = {"hidden_size_per_layer_input": 0, "enable_moe_block": False}


@dataclass(frozen=True)
class RopeConfig:
    """RoPE of one layer type: ``default`` rotates all of d; ``proportional`` rotates the first
    ``int(partial_rotary_factor·d/2)`` frequency pairs with exponent 2k/d and leaves the rest unrotated."""

    rope_type: str = "default"
    theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    factor: float = 1.0


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    layer_types: tuple[str, ...]
    head_dims: tuple[int, ...]  # per layer
    kv_heads: tuple[int, ...]  # per layer
    sliding_window: int
    rope: dict  # layer type -> RopeConfig
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = None
    tie_word_embeddings: bool = True
    hidden_size_per_layer_input: int = 0
    vocab_size_per_layer_input: int = 0
    attention_k_eq_v: bool = False
    attention_bias: bool = False
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    enable_moe_block: bool = False
    num_experts: int = 0
    top_k_experts: int = 0
    moe_intermediate_size: int = 0
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131072
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_ids: tuple[int, ...] = (1,)
    source: str = "config.json"

    @functools.cached_property
    def kv_modes(self) -> tuple[str | None, ...]:
        """Per layer: ``"reuse"`` (no K/V of its own), ``"store"`` (last non-reuse layer of its type: the target's
        K/V the reuse layers and the assistant read) or None. With no sharing the last layer of each type stores
        (the intended semantics; docs: concepts/gemma4-target, "KV sharing"); a fully shared config (the
        assistant) is all ``"reuse"``."""
        L, first_reuse = self.num_layers, self.num_layers - self.num_kv_shared_layers
        modes: list[str | None] = [None if i < first_reuse else "reuse" for i in range(L)]
        for t in set(self.layer_types):
            own = [i for i in range(first_reuse) if self.layer_types[i] == t]
            if own:
                modes[own[-1]] = "store"
        return tuple(modes)

    def kv_source(self, i: int) -> int:
        """Index of the layer whose K/V layer ``i`` attends to (itself, or its type's store layer)."""
        if self.kv_modes[i] != "reuse":
            return i
        return self.store_layer(self.layer_types[i])

    def store_layer(self, layer_type: str) -> int:
        for i, (t, m) in enumerate(zip(self.layer_types, self.kv_modes)):
            if t == layer_type and m == "store":
                return i
        raise ConfigError(f"{self.source}: no layer of type {layer_type!r} produces K/V")

    def layer_intermediate(self, i: int) -> int:
        double = self.use_double_wide_mlp and self.kv_modes[i] == "reuse"
        return self.intermediate_size * (2 if double else 1)

    def type_head_dim(self, layer_type: str) -> int:
        return self.head_dims[self.layer_types.index(layer_type)]

    def type_kv_heads(self, layer_type: str) -> int:
        return self.kv_heads[self.layer_types.index(layer_type)]


@dataclass(frozen=True)
class AssistantConfig:
    text: TextConfig
    backbone_hidden_size: int
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    num_assistant_tokens: int | None = None  # from generation_config.json
    source: str = "config.json"


def _req(d: dict, key: str, src: str):
    if key not in d or d[key] is None:
        raise ConfigError(f"{src}: missing required field {key!r}")
    return d[key]


def _int(d: dict, key: str, src: str, default=None, minimum: int = 0) -> int:
    v = d.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"{src}: field {key!r} = {v!r}, expected an integer >= {minimum}")
    return v


def parse_text_config(d: dict, src: str = "config.json", unified: bool = False) -> TextConfig:
    """Parse a ``gemma4_text`` or ``gemma4_unified_text`` dict (``unified``: one whose model_type is implied)."""
    unified = unified or d.get("model_type") == "gemma4_unified_text"
    d = {**UNIFIED_DEFAULTS, **d, **UNIFIED_ABSENT} if unified else d
    L = _int(d, "num_hidden_layers", src, 30, 1)
    layer_types = d.get("layer_types") or [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(L)]
    layer_types = list(layer_types)
    if len(layer_types) != L:
        raise ConfigError(f"{src}: layer_types has {len(layer_types)} entries, expected num_hidden_layers = {L}")
    for t in layer_types:
        if t not in (SLIDING, FULL):
            raise ConfigError(f"{src}: layer type {t!r}, expected {SLIDING!r} or {FULL!r}")
    layer_types[-1] = FULL  # transformers forces the last layer to full attention
    head_dim = _int(d, "head_dim", src, 256, 1)
    kvh = _int(d, "num_key_value_heads", src, 4, 1)
    k_eq_v = bool(d.get("attention_k_eq_v", False))
    head_dims, kv_heads = [head_dim] * L, [kvh] * L
    plc = d.get("per_layer_config")
    if plc is not None:  # transformers >= 5.23 form: sparse overrides keyed by (zero-padded) layer index
        if not isinstance(plc, dict):
            raise ConfigError(f"{src}: per_layer_config must be an object, got {type(plc).__name__}")
        for k, over in plc.items():
            try:
                i = int(k)
            except ValueError:
                raise ConfigError(f"{src}: per_layer_config key {k!r} is not a layer index") from None
            if not 0 <= i < L or not isinstance(over, dict):
                raise ConfigError(f"{src}: per_layer_config[{k!r}] out of range or not an object (layers 0..{L - 1})")
            head_dims[i] = _int(over, "head_dim", src, head_dims[i], 1)
            kv_heads[i] = _int(over, "num_key_value_heads", src, kv_heads[i], 1)
    else:  # older form; global_head_dim defaults to 512 as in transformers
        gdim = _int(d, "global_head_dim", src, 512, 1)
        gkv = d.get("num_global_key_value_heads")
        for i, t in enumerate(layer_types):
            if t == FULL:
                head_dims[i] = gdim
                if gkv is not None and k_eq_v:
                    kv_heads[i] = _int(d, "num_global_key_value_heads", src, None, 1)
    rope = {}
    rp = d.get("rope_parameters") or {}
    defaults = {
        SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
    }
    for t in (SLIDING, FULL):
        r = rp.get(t) or defaults[t]
        rt = r.get("rope_type", "default")
        if rt not in ("default", "proportional"):
            raise ConfigError(f"{src}: rope_parameters[{t!r}].rope_type = {rt!r}, expected 'default' or 'proportional'")
        rope[t] = RopeConfig(
            rope_type=rt,
            theta=float(r.get("rope_theta", defaults[t]["rope_theta"])),
            partial_rotary_factor=float(r.get("partial_rotary_factor", 1.0) or 1.0) if rt == "proportional" else 1.0,
            factor=float(r.get("factor", 1.0) or 1.0) if rt == "proportional" else 1.0,
        )
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu"):
        raise ConfigError(f"{src}: hidden_activation {act!r}, expected 'gelu_pytorch_tanh' or 'gelu'")
    if d.get("use_bidirectional_attention") == "all":
        raise ConfigError(f"{src}: use_bidirectional_attention='all' (non-causal) cannot be used for generation")
    eos = d.get("eos_token_id", 1)
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    moe = bool(d.get("enable_moe_block", False))
    n_shared = d.get("num_kv_shared_layers") or 0
    cfg = TextConfig(
        vocab_size=_int(d, "vocab_size", src, 262144, 1),
        hidden_size=_int(d, "hidden_size", src, 2304, 1),
        intermediate_size=_int(d, "intermediate_size", src, 9216, 1),
        num_layers=L,
        num_heads=_int(d, "num_attention_heads", src, 8, 1),
        layer_types=tuple(layer_types),
        head_dims=tuple(head_dims),
        kv_heads=tuple(kv_heads),
        sliding_window=_int(d, "sliding_window", src, 512, 1),
        rope=rope,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        final_logit_softcapping=d.get("final_logit_softcapping"),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        hidden_size_per_layer_input=_int(d, "hidden_size_per_layer_input", src, 256),
        vocab_size_per_layer_input=_int(d, "vocab_size_per_layer_input", src, 262144),
        attention_k_eq_v=k_eq_v,
        attention_bias=bool(d.get("attention_bias", False)),
        num_kv_shared_layers=_int({"n": n_shared}, "n", src + " num_kv_shared_layers", 0),
        use_double_wide_mlp=bool(d.get("use_double_wide_mlp", False)),
        enable_moe_block=moe,
        num_experts=_int(d, "num_experts", src, None, 1) if moe else 0,
        top_k_experts=_int(d, "top_k_experts", src, None, 1) if moe else 0,
        moe_intermediate_size=_int(d, "moe_intermediate_size", src, None, 1) if moe else 0,
        hidden_activation=act,
        max_position_embeddings=_int(d, "max_position_embeddings", src, 131072, 1),
        pad_token_id=d.get("pad_token_id", 0),
        bos_token_id=d.get("bos_token_id", 2),
        eos_token_ids=eos_ids,
        source=src,
    )
    if cfg.num_kv_shared_layers > L:
        raise ConfigError(f"{src}: num_kv_shared_layers = {cfg.num_kv_shared_layers} exceeds num_hidden_layers = {L}")
    if cfg.num_kv_shared_layers < L:
        first = L - cfg.num_kv_shared_layers
        for t in set(layer_types[first:]):
            if t not in layer_types[:first]:
                raise ConfigError(f"{src}: KV-shared layers of type {t!r} have no earlier layer of that type to read")
    for i in range(L):
        if cfg.num_heads % cfg.kv_heads[i]:
            raise ConfigError(
                f"{src}: layer {i}: {cfg.num_heads} query heads not divisible by {cfg.kv_heads[i]} KV heads"
            )
    return cfg


def _read(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return d


def _generation_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "generation_config.json")
    return _read(path) if os.path.isfile(path) else {}


def load_text_config(model_dir: str) -> TextConfig:
    """Read ``model_dir/config.json`` of a Gemma 4 target (text-only or multimodal container)."""
    if not os.path.isdir(model_dir):
        raise ConfigError(f"{model_dir}: no such model directory")
    path = os.path.join(model_dir, "config.json")
    d = _read(path)
    mt = d.get("model_type")
    if mt in ("gemma4", "gemma4_unified"):  # the multimodal containers: the decoder is their text_config
        d, mt = _req(d, "text_config", path), mt + "_text"
        if d.get("model_type", mt) != mt:
            raise ConfigError(f"{path}: text_config.model_type = {d.get('model_type')!r}, expected {mt!r}")
    elif mt in ASSISTANT_TYPES:
        raise ConfigError(f"{path}: model_type {mt!r} is an assistant (drafter); expected a target: {TEXT_TYPES}")
    elif mt not in TEXT_TYPES:
        raise ConfigError(f"{path}: model_type {mt!r} is not supported, expected one of {TEXT_TYPES}")
    cfg = parse_text_config(d, path, unified=mt == "gemma4_unified_text")
    gen = _generation_config(model_dir)
    eos = gen.get("eos_token_id")
    if eos is not None:  # generation_config's EOS list (e.g. <eos>, <turn|>) wins, as in transformers
        cfg = dataclasses.replace(cfg, eos_token_ids=tuple(eos) if isinstance(eos, list) else (eos,))
    return cfg


def load_assistant_config(model_dir: str) -> AssistantConfig:
    """Read ``model_dir/config.json`` of a ``gemma4[_unified]_assistant`` checkpoint (+ ``num_assistant_tokens``)."""
    if not os.path.isdir(model_dir):
        raise ConfigError(f"{model_dir}: no such assistant directory")
    path = os.path.join(model_dir, "config.json")
    d = _read(path)
    mt = d.get("model_type")
    if mt not in ASSISTANT_TYPES:
        raise ConfigError(f"{path}: model_type {mt!r} is not an assistant, expected one of {ASSISTANT_TYPES}")
    td, unified = dict(_req(d, "text_config", path)), mt == "gemma4_unified_assistant"
    tmt = td.get("model_type") or ("gemma4_unified_text" if unified else "gemma4_text")  # transformers' defaults
    td.setdefault("vocab_size_per_layer_input", 0)
    td.setdefault("hidden_size_per_layer_input", 0)
    if not td.get("num_kv_shared_layers"):
        td["num_kv_shared_layers"] = td.get("num_hidden_layers", 30)
    if tmt not in ("gemma4_text", "gemma4_unified_text"):
        raise ConfigError(f"{path}: text_config.model_type = {tmt!r}, expected 'gemma4_text' or 'gemma4_unified_text'")
    text = parse_text_config(td, path + " text_config", unified=tmt == "gemma4_unified_text")
    if text.num_kv_shared_layers != text.num_layers:
        raise ConfigError(f"{path}: num_kv_shared_layers must equal num_hidden_layers ({text.num_layers})")
    if text.hidden_size_per_layer_input or text.enable_moe_block or text.use_double_wide_mlp:
        raise ConfigError(f"{path}: assistant text_config must have no PLE, no MoE block and no double-wide MLP")
    ordered = bool(d.get("use_ordered_embeddings", False))
    C = _int(d, "num_centroids", path, 2048, 1)
    if ordered and text.vocab_size % C:
        raise ConfigError(f"{path}: vocab_size {text.vocab_size} is not divisible by num_centroids {C}")
    gen = _generation_config(model_dir)
    nat = gen.get("num_assistant_tokens")
    if nat is not None and (not isinstance(nat, int) or isinstance(nat, bool) or nat < 1):
        raise ConfigError(
            f"{model_dir}/generation_config.json: num_assistant_tokens = {nat!r}, expected an integer >= 1"
        )
    return AssistantConfig(
        text=text,
        backbone_hidden_size=_int(d, "backbone_hidden_size", path, 3840 if unified else 1536, 1),
        use_ordered_embeddings=ordered,
        num_centroids=C,
        centroid_intermediate_top_k=_int(d, "centroid_intermediate_top_k", path, 32, 1),
        num_assistant_tokens=nat,
        source=path,
    )
