"""``python -m minimtp.bench realsize``: random-weight Gemma 4 checkpoints of the real sizes, in the real layout.

``build --family e2b|e4b --out DIR`` writes ``DIR/target/`` as Google publishes the ``-it`` targets: the multimodal
``Gemma4ForConditionalGeneration`` keys (``model.language_model.*``, the vision and audio towers
``model.vision_tower.*`` / ``model.audio_tower.*``, ``model.embed_vision.*`` / ``model.embed_audio.*``; the tied
head not saved) in shards ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``, a ``gemma4``
``config.json`` written by transformers' ``Gemma4Config`` and ``generation_config.json`` (do_sample, T = 1, top-k 64,
top-p 0.95); and ``DIR/assistant/`` (``model.safetensors`` + a ``gemma4_assistant`` ``config.json``). The towers
use transformers' default ``Gemma4VisionConfig()`` (768 wide, 16 layers: 167 M parameters) and
``Gemma4AudioConfig()`` (1024 wide, 12 layers: 305 M); they are there so that loaders must skip them.
Every key's shape comes from the transformers model built on the ``meta`` device; each tensor is drawn from its own
``torch.Generator`` (seeded by ``--seed`` and the key's name, so shard size does not change the weights) and
written shard by shard: the peak memory is about one shard.

Scales (Gemma 4's attention scale is 1.0 after the q/k RMSNorm: unit q/k norm weights would give q·k a std of
√d = 16 to 23 nats, one-hot attention rows). Matrices ``[out, in]`` ~ N(0, 1/in), so projections keep unit RMS;
  * ``q_norm`` / ``k_norm`` = d^-¼ · (1 + 0.1 ε): then q·k has std √d · d^-½ = 1 nat, softmax neither uniform nor
    one-hot; the other norm weights 1 + 0.1 ε; ``layer_scalar`` = 1 (transformers' ``_init_weights``);
  * ``embed_tokens`` ~ N(0, (EMBED_RMS/√H)²), so the √H-scaled input has RMS EMBED_RMS = 0.25, small beside the
    branches' unit outputs (with RMS 3 the final state is the input token's own embedding and every row's argmax
    is its input token); the final norm weight FINAL_NORM = 20 (± 10 %) then gives the tied head logits of std
    ≈ EMBED_RMS · FINAL_NORM = 5 nats (measured 4.9 at every depth; entropy ≈ 6 nats, top-1 ≈ 0.08);
  * ``embed_tokens_per_layer`` ~ N(0, 1/P) (its √P-scaled rows have unit RMS);
  * ``token_ordering``: a random permutation of the vocabulary; tower tensors: N(0, 0.02²) for matrices, ones for
    vectors, ±inf clipping bounds (as transformers initialises them; no text path reads them).

``--layers N`` keeps the real widths and reduces the depth: the layer types repeat the real pattern (the last
layer full), and the last round(N · shared / L) layers are KV-shared (shared, L: the real values), fewer if needed
so that the unshared layers hold a sliding and a full layer (the store layers the shared layers and the assistant
read). E2B: N = 10 gives 5 shared layers. ``sizes`` prints the parameter counts and bytes of every pair, counted on
the meta device (docs: guides/real-checkpoints, "Real sizes without a download").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import zlib

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from minimtp import load_assistant, load_target
from minimtp.attention import DraftDenseContext
from minimtp.errors import CheckpointError, ConfigError, MinimtpError
from minimtp.hf_compat import patch_transformers
from minimtp.train.configs import layer_pattern

# transformers is imported where it is used: its model and config classes take seconds to load, and
# `realsize --help` does not need them

FAMILIES = ("e2b", "e4b")  # buildable here; the others are counted by ``sizes`` only
EMBED_RMS = 0.25  # the input embedding's RMS (module docstring)
FINAL_NORM = 20.0  # the final norm's weight (module docstring)
PLE = dict(hidden_size_per_layer_input=256, vocab_size_per_layer_input=262144)
NO_PLE = dict(hidden_size_per_layer_input=0, vocab_size_per_layer_input=262144)
# 26B-A4B and 31B: K = V on full layers, W = 1024, 262,144 positions
K_EQ_V = dict(
    attention_k_eq_v=True,
    use_bidirectional_attention="vision",
    sliding_window=1024,
    max_position_embeddings=262144,
)
E_DRAFTER = dict(hidden_size=256, intermediate_size=2048, num_attention_heads=4, ordered=True)  # E2B's and E4B's
BIG_DRAFTER = dict(hidden_size=1024, intermediate_size=8192, ordered=False)  # 12B's, 26B-A4B's and 31B's
# name: (target, assistant), the real configurations; transformers' Gemma4TextConfig (or Gemma4UnifiedTextConfig)
# defaults fill the rest: vocab 262,144, head_dim 256, global_head_dim 512, eps 1e-6, RoPE, 131,072 positions
PAIRS = {
    "e2b": (
        dict(
            hidden_size=1536,
            num_hidden_layers=35,
            pattern="ssssf",
            num_attention_heads=8,
            num_key_value_heads=1,
            intermediate_size=6144,
            use_double_wide_mlp=True,
            num_kv_shared_layers=20,
            **PLE,
        ),
        E_DRAFTER,
    ),
    "e4b": (
        dict(
            hidden_size=2560,
            num_hidden_layers=42,
            pattern="sssssf",
            num_attention_heads=8,
            num_key_value_heads=2,
            intermediate_size=10240,
            num_kv_shared_layers=18,
            **PLE,
        ),
        E_DRAFTER,
    ),
    # 12B: H, W, positions and the pattern are Gemma4UnifiedTextConfig's / the assistant config's defaults, L = 48
    # the model card's; 16 query heads and intermediate 15360 are assumed (with the class defaults, 8 and 9216, the
    # count is 7.6 B, not the card's 11.95 B), as are the drafter's 16 query heads and dense head
    "12b": (
        dict(
            hidden_size=3840,
            num_hidden_layers=48,
            pattern="sssssf",
            num_attention_heads=16,
            num_key_value_heads=8,
            num_global_key_value_heads=1,
            attention_k_eq_v=True,
            intermediate_size=15360,
        ),
        dict(BIG_DRAFTER, num_attention_heads=16),
    ),
    "26b-a4b": (
        dict(
            hidden_size=2816,
            num_hidden_layers=30,
            pattern="sssssf",
            num_attention_heads=16,
            num_key_value_heads=8,
            num_global_key_value_heads=2,
            intermediate_size=2112,
            enable_moe_block=True,
            num_experts=128,
            top_k_experts=8,
            moe_intermediate_size=704,
            **K_EQ_V,
            **NO_PLE,
        ),
        dict(BIG_DRAFTER, num_attention_heads=16),
    ),
    "31b": (
        dict(
            hidden_size=5376,
            num_hidden_layers=60,
            pattern="sssssf",
            num_attention_heads=32,
            num_key_value_heads=16,
            num_global_key_value_heads=4,
            intermediate_size=21504,
            **K_EQ_V,
            **NO_PLE,
        ),
        dict(BIG_DRAFTER, num_attention_heads=32),
    ),
}
UNIFIED = ("12b",)  # built with transformers' models/gemma4_unified classes
TOWERS = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.")


def shared_layers(types: list[str], real_shared: int, real_layers: int) -> int:
    """round(N · shared / L) KV-shared layers for N = len(types), fewer until the unshared ones hold both types."""
    n = round(len(types) * real_shared / real_layers)
    while n > 0 and set(types[: len(types) - n]) != set(types):
        n -= 1
    return n


def text_kwargs(name: str, layers: int | None = None) -> dict:
    """The target's text-config keyword arguments, at depth ``layers`` (default: the real depth)."""
    kw = dict(PAIRS[name][0], final_logit_softcapping=30.0)
    pattern = kw.pop("pattern")
    real_layers = kw["num_hidden_layers"]
    n = real_layers if layers is None else layers
    kw.update(num_hidden_layers=n, layer_types=layer_pattern(pattern, n))
    if kw.get("num_kv_shared_layers"):
        kw["num_kv_shared_layers"] = shared_layers(kw["layer_types"], kw["num_kv_shared_layers"], real_layers)
    if name in UNIFIED:  # Gemma4UnifiedTextConfig has no per-layer-embedding or MoE fields
        kw = {k: v for k, v in kw.items() if "per_layer_input" not in k}
    return kw


def text_config(name: str, layers: int | None = None, kw: dict | None = None):
    """The (unified) text config of ``name``: its target's, or the one of keyword arguments ``kw``."""
    from transformers import Gemma4TextConfig, Gemma4UnifiedTextConfig

    cls = Gemma4UnifiedTextConfig if name in UNIFIED else Gemma4TextConfig
    return cls(**(text_kwargs(name, layers) if kw is None else kw))


def target_config(name: str, layers: int | None = None):
    """The ``gemma4`` container config (default vision and audio towers) of a buildable family."""
    from transformers import Gemma4AudioConfig, Gemma4Config, Gemma4VisionConfig

    return Gemma4Config(
        text_config=text_config(name, layers).to_dict(),
        architectures=["Gemma4ForConditionalGeneration"],
        vision_config=Gemma4VisionConfig().to_dict(),
        audio_config=Gemma4AudioConfig().to_dict(),
    )


def assistant_config(name: str):
    """The drafter: 4 query-only layers [s, s, s, f] whose KV geometry is the target's store layers'."""
    from transformers import Gemma4AssistantConfig, Gemma4UnifiedAssistantConfig

    patch_transformers()  # a fully KV-shared text config
    target = text_kwargs(name)
    drafter = dict(PAIRS[name][1])
    ordered = drafter.pop("ordered")
    keep = ("num_key_value_heads", "num_global_key_value_heads", "attention_k_eq_v", "sliding_window")
    kw = dict(
        drafter,
        num_hidden_layers=4,
        layer_types=layer_pattern("sssf", 4),
        num_kv_shared_layers=4,
        final_logit_softcapping=None,
        **{k: target[k] for k in keep if k in target},
    )
    if name not in UNIFIED:
        kw.update(hidden_size_per_layer_input=0, vocab_size_per_layer_input=0)
    cls = Gemma4UnifiedAssistantConfig if name in UNIFIED else Gemma4AssistantConfig
    return cls(
        text_config=text_config(name, kw=kw).to_dict(),
        backbone_hidden_size=target["hidden_size"],
        use_ordered_embeddings=ordered,
        num_centroids=2048,
        centroid_intermediate_top_k=32,
        architectures=[cls.__name__.replace("Config", "ForCausalLM")],
    )


def meta_model(cfg):
    """The transformers model of ``cfg`` on the meta device (shapes and dtypes, no memory)."""
    import transformers

    with torch.device("meta"):
        return getattr(transformers, cfg.architectures[0])(cfg)


def saved_specs(model) -> dict:
    """key -> (shape, dtype) of every tensor ``save_pretrained`` writes (the tied head is not saved)."""
    tied = model.config.get_text_config().tie_word_embeddings
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}


def _stored(dtype, float_dtype):
    """The dtype a tensor of ``dtype`` is written in: ``float_dtype`` for floating point, else its own."""
    return float_dtype if dtype.is_floating_point else dtype


def nbytes(spec, float_dtype) -> int:
    """Bytes of a (shape, dtype) spec as written with floating point in ``float_dtype``."""
    shape, dtype = spec
    return math.prod(shape) * _stored(dtype, float_dtype).itemsize


def init_tensor(key: str, shape: tuple, dtype, float_dtype, gen, ple_dim: int = 256):
    """The random value of one checkpoint tensor (the scales of the module docstring)."""
    t = torch.empty(shape, dtype=_stored(dtype, float_dtype))
    last = key.rsplit(".", 2)[-2] if key.endswith(".weight") else key.rsplit(".", 1)[-1]
    if key.startswith(TOWERS):  # never read by a text decoder
        if key.endswith("_min"):
            return t.fill_(-math.inf)
        if key.endswith("_max"):
            return t.fill_(math.inf)
        if t.ndim >= 2:
            return _normal(t, 0.0, 0.02, gen)
        return t.fill_(1.0)
    if last == "token_ordering":
        return torch.randperm(shape[0], generator=gen).to(t.dtype)
    if last == "layer_scalar":
        return t.fill_(1.0)
    if last == "embed_tokens":
        return _normal(t, 0.0, EMBED_RMS / math.sqrt(shape[1]), gen)
    if last == "embed_tokens_per_layer":
        return _normal(t, 0.0, 1 / math.sqrt(ple_dim), gen)
    if last in ("q_norm", "k_norm"):
        return _normal(t, 1.0, 0.1, gen).mul_(shape[0] ** -0.25)
    if key in ("model.norm.weight", "model.language_model.norm.weight"):
        return _normal(t, FINAL_NORM, 0.1 * FINAL_NORM, gen)
    if t.ndim == 1 and "norm" in last:
        return _normal(t, 1.0, 0.1, gen)
    if t.ndim >= 2:
        return _normal(t, 0.0, 1 / math.sqrt(shape[-1]), gen)
    raise ValueError(f"no initialisation rule for {key} {shape}")  # a new tensor kind: give it a rule


def _normal(t, mean: float, std: float, gen, chunk: int = 1 << 24):
    """In-place N(mean, std²) in chunks (no float32 temporary of a bf16 table)."""
    flat = t.view(-1)
    for i in range(0, flat.numel(), chunk):
        flat[i : i + chunk].normal_(mean, std, generator=gen)
    return t


def plan_shards(specs: dict, float_dtype, limit: int) -> list[list[str]]:
    """Keys in state-dict order, a new shard when the next tensor would pass ``limit`` bytes (as transformers)."""
    shards = [[]]
    size = 0
    for key, spec in specs.items():
        b = nbytes(spec, float_dtype)
        if shards[-1] and size + b > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += b
    return shards


def write_tensors(out: str, specs: dict, float_dtype, seed: int, part: str, shard_bytes: int | None, ple_dim: int):
    """Generate and write ``specs`` one shard at a time: shards + index (``shard_bytes``) or ``model.safetensors``.
    Returns the bytes written."""
    if shard_bytes:
        shards = plan_shards(specs, float_dtype, shard_bytes)
        names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    else:
        shards = [list(specs)]
        names = ["model.safetensors"]
    total = sum(nbytes(s, float_dtype) for s in specs.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc=part, file=sys.stderr) as bar:
        for name, keys in zip(names, shards):
            tensors = {}
            for k in keys:
                gen = torch.Generator().manual_seed((seed % 2**32 << 32) ^ zlib.crc32(f"{part}/{k}".encode()))
                tensors[k] = init_tensor(k, *specs[k], float_dtype, gen, ple_dim)
                bar.update(tensors[k].nbytes)
            save_file(tensors, os.path.join(out, name), metadata={"format": "pt"})
            del tensors
    if shard_bytes:
        weight_map = {k: name for name, keys in zip(names, shards) for k in keys}
        params = sum(math.prod(s[0]) for s in specs.values())
        meta = {"total_parameters": params, "total_size": total}
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    return total


def build(
    family: str,
    out: str,
    layers: int | None = None,
    dtype: str = "bfloat16",
    seed: int = 0,
    shard_gb: float = 4.0,
) -> dict:
    """Write ``out/target`` (sharded multimodal layout) and ``out/assistant``; returns their sizes in bytes."""
    from transformers import GenerationConfig

    float_dtype = getattr(torch, dtype)
    tdir = os.path.join(out, "target")
    adir = os.path.join(out, "assistant")
    parts = (
        ("target", target_config(family, layers), tdir),
        ("assistant", assistant_config(family), adir),
    )
    sizes = {}
    for part, cfg, d in parts:
        os.makedirs(d, exist_ok=True)
        cfg.dtype = dtype
        cfg.get_text_config().dtype = dtype
        cfg.save_pretrained(d)
        shard = int(shard_gb * 1e9) if part == "target" else None
        ple = cfg.get_text_config().hidden_size_per_layer_input or 1
        sizes[part] = write_tensors(d, saved_specs(meta_model(cfg)), float_dtype, seed, part, shard, ple)
    generation = GenerationConfig(
        bos_token_id=2,
        eos_token_id=[1, 106],
        pad_token_id=0,
        do_sample=True,
        temperature=1.0,
        top_k=64,
        top_p=0.95,
    )
    generation.save_pretrained(tdir)
    return sizes


def logit_check(out: str, dtype: str, tokens: int = 16, seed: int = 0) -> dict:
    """minimtp's own loaders on the written pair: the std (over the vocabulary, mean over the prompt rows) of the
    target's logits on a random ``tokens``-token prompt, and of the assistant's first draft step after it (over the
    tokens its centroid head scores, when it has one)."""
    target = load_target(os.path.join(out, "target"), dtype=dtype)
    assistant = load_assistant(os.path.join(out, "assistant"), target)
    ids = torch.randint(3, target.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))
    p = tokens - 1
    with torch.inference_mode():
        logits, hidden, kv = target.forward_with_kv(ids)
        past_kv = {t: (k[:, :p], v[:, :p]) for t, (k, v) in kv.items()}
        ctx = DraftDenseContext(assistant.config.text, past_kv, torch.tensor([[p]]))
        draft, _ = assistant.step(target.embed(ids[0, p : p + 1]), hidden[0, p - 1 : p], torch.tensor([p]), ctx)
    draft = draft[0].float()
    scored = draft[draft > draft.min()] if assistant.config.use_ordered_embeddings else draft
    return {
        "target_std": logits[0].float().std(-1).mean().item(),
        "assistant_std": scored.std().item(),
        "tokens": tokens,
    }


def _int8_bytes(shape: tuple, dtype) -> int:
    """Bytes of a tensor with int8 weights: a byte a weight and a bf16 scale a row of every matrix; vectors stay
    bf16."""
    if len(shape) > 1:
        return math.prod(shape) + 2 * (math.prod(shape) // shape[-1])
    return nbytes((shape, dtype), torch.bfloat16)


def count(cfg) -> dict:
    """Parameters and bytes of one model, counted on the meta device (tied head once; ``read``: the bf16 bytes a
    decode step reads: all but the per-layer-embedding table (a row per token) and the experts not routed to)."""
    model = meta_model(cfg)
    specs = saved_specs(model)
    bf16 = sum(nbytes(s, torch.bfloat16) for s in specs.values())
    int8 = sum(_int8_bytes(shape, dtype) for shape, dtype in specs.values())
    t = cfg.get_text_config()
    ple = sum(math.prod(s[0]) for k, s in specs.items() if k.endswith("embed_tokens_per_layer.weight"))
    experts = sum(math.prod(s[0]) for k, s in specs.items() if ".experts." in k)
    idle = experts * (1 - t.top_k_experts / t.num_experts) if getattr(t, "enable_moe_block", False) else 0
    params = sum(p.numel() for p in model.parameters())
    return dict(params=params, ple=ple, bf16=bf16, int8=int8, read=bf16 - 2 * (ple + idle))


def sizes(names=tuple(PAIRS)) -> list[dict]:
    """``count`` of the target and the assistant of every pair in ``names``."""
    rows = []
    for name in names:
        t = text_config(name)
        t.architectures = ["Gemma4UnifiedForCausalLM" if name in UNIFIED else "Gemma4ForCausalLM"]
        rows.append(dict(name=name, target=count(t), assistant=count(assistant_config(name))))
    return rows


def _verdict(t: dict, ram: int) -> str:
    """Whether a target of ``count`` ``t`` fits ``ram`` bytes, and how."""
    room = 0.8 * ram  # the rest: the OS, the KV cache, activations
    if t["bf16"] <= room:
        return "yes, bf16"
    if t["int8"] <= room:
        return f"only with int8 weights ({t['int8'] / 1e9:.1f} GB)"
    return f"no: int8 is {t['int8'] / 1e9:.1f} GB; mmap'd, {t['read'] / 2e9:.1f} GB read per token at int8"


def sizes_markdown(rows: list[dict], ram: int) -> str:
    """The table of ``sizes``' rows, with whether each fits ``ram`` bytes."""
    G = 1e9
    out = [
        "| model | text parameters | of which PLE | bf16 | int8 | bf16 read per token | assistant | assistant bf16 "
        f"| fits {ram / G:.1f} GB RAM |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["target"]
        a = r["assistant"]
        out.append(
            f"| {r['name'].upper()} | {t['params'] / G:.2f} B | {t['ple'] / G:.2f} B | {t['bf16'] / G:.1f} GB | "
            f"{t['int8'] / G:.1f} GB | {t['read'] / G:.1f} GB | {a['params'] / 1e6:.0f} M | {a['bf16'] / 1e6:.0f} MB | "
            f"{_verdict(t, ram)} |"
        )
    return "\n".join(out)


def _writable_dir(path: str) -> None:
    """Raise CheckpointError (one line) unless ``path`` can take target/ and assistant/ (absent or empty)."""
    for d in (os.path.join(path, "target"), os.path.join(path, "assistant")):
        if os.path.isdir(d) and os.listdir(d):
            raise CheckpointError(f"{d}: already exists and is not empty (remove it, or choose another --out)")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".minimtp-write-test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write the checkpoints there ({e.strerror})") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minimtp.bench realsize", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write a random-weight target + assistant pair of a real size")
    b.add_argument("--family", required=True, help=" or ".join(FAMILIES))
    b.add_argument("--out", required=True, help="directory for target/ and assistant/")
    b.add_argument("--layers", type=int, default=None, help="target depth (default: the real one)")
    b.add_argument("--dtype", default="bfloat16", help="bfloat16 or float32")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--shard-gb", type=float, default=4.0, help="target shard size limit in GB")
    b.add_argument("--no-check", action="store_true", help="skip the logit check with minimtp's loaders")
    sub.add_parser("sizes", help="parameter counts and bytes of every Gemma 4 pair (markdown)")
    return p


def _check_build_args(args) -> str:
    """The family ``build`` was asked for, lower-cased; raises ConfigError (one line) on a flag out of range."""
    family = args.family.lower()
    if family not in FAMILIES:
        raise ConfigError(
            f"--family {args.family!r}: expected one of {', '.join(FAMILIES)} (the others are "
            "too large to build here: see `realsize sizes`)"
        )
    real = PAIRS[family][0]["num_hidden_layers"]
    if args.layers is not None and not 2 <= args.layers <= real:
        raise ConfigError(f"--layers {args.layers}: expected 2..{real} (the real depth of {family})")
    if args.dtype not in ("bfloat16", "float32"):
        raise ConfigError(f"--dtype {args.dtype!r}: expected bfloat16 or float32")
    if not args.shard_gb > 0:
        raise ConfigError(f"--shard-gb {args.shard_gb}: expected a positive size")
    return family


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    if args.cmd == "sizes":
        print(sizes_markdown(sizes(), os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")))
        return 0
    try:
        family = _check_build_args(args)
        _writable_dir(args.out)
        gb = build(family, args.out, args.layers, args.dtype, args.seed, args.shard_gb)
        layers = args.layers or PAIRS[family][0]["num_hidden_layers"]
        print(
            f"wrote {args.out}/target ({gb['target'] / 1e9:.2f} GB) and {args.out}/assistant "
            f"({gb['assistant'] / 1e6:.0f} MB): {family}, {layers} layers, {args.dtype}"
        )
        if not args.no_check:
            c = logit_check(args.out, args.dtype)
            print(
                f"target logits std {c['target_std']:.2f} nats on a {c['tokens']}-token prompt; assistant draft "
                f"logits std {c['assistant_std']:.2f} nats"
            )
    except MinimtpError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
