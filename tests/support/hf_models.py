"""Tiny random Gemma 4 checkpoints built with transformers 5.23 (the oracle), saved in the real layouts.

Five target families, shrunk from the released targets (docs: guides/real-checkpoints, "The model pairs";
concepts/gemma4-target):
  * ``e2b``  – PLE, KV sharing (num_kv_shared_layers > 0), double-wide MLP;
  * ``moe``  – 26B-A4B-like: MoE block beside the dense MLP, attention_k_eq_v, no sharing;
  * ``dense`` – 31B-like: dense, attention_k_eq_v, no sharing;
  * ``unified`` – 12B-like, built with transformers' ``models/gemma4_unified`` classes (``Gemma4UnifiedTextConfig``
    has no PLE or MoE fields): dense, attention_k_eq_v with one global KV head, no sharing;
  * ``unified_shared`` – the same classes with KV sharing and a double-wide MLP (the unified decoder allows both).
Each is saved text-only (``Gemma4ForCausalLM`` / ``Gemma4UnifiedForCausalLM``) and also multimodal
(``Gemma4ForConditionalGeneration`` with tiny vision/audio towers, or the encoder-free
``Gemma4UnifiedForConditionalGeneration`` with tiny vision/audio embedders), plus a matching assistant
(``Gemma4AssistantForCausalLM`` / ``Gemma4UnifiedAssistantForCausalLM``).

transformers 5.23.0 bugs patched here, both in the property ``Gemma4TextConfig.kv_sharing_modes``
(``models/gemma4/configuration_gemma4.py``): it raises ``ValueError`` for a fully shared config (the assistant) and
marks no "store" layer when nothing is shared (26B/31B targets); docs: concepts/gemma4-target, "KV sharing".
"""

from __future__ import annotations

import functools

import torch
from transformers.models.gemma4 import configuration_gemma4 as cg

from minimtp.hf_compat import patch_transformers  # noqa: E402  (the kv_sharing_modes fix, shared with bench)

S, F = "sliding_attention", "full_attention"

TARGET_KW = {
    "e2b": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        layer_types=[S, S, F, S, S, F],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=32,
        sliding_window=8,
        hidden_size_per_layer_input=16,
        vocab_size_per_layer_input=512,
        num_kv_shared_layers=3,
        use_double_wide_mlp=True,
    ),
    "moe": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=48,
        num_hidden_layers=4,
        layer_types=[S, S, S, F],
        num_attention_heads=4,
        num_key_value_heads=2,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        head_dim=16,
        global_head_dim=32,
        sliding_window=8,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=512,
        enable_moe_block=True,
        num_experts=8,
        top_k_experts=2,
        moe_intermediate_size=24,
        use_bidirectional_attention="vision",
    ),
    "dense": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=6,
        layer_types=[S, S, F, S, S, F],
        num_attention_heads=4,
        num_key_value_heads=2,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        head_dim=16,
        global_head_dim=32,
        sliding_window=8,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=512,
    ),
}
# the unified text config has no per-layer-embedding fields: the "dense" family without them
_UNIFIED_KW = {k: v for k, v in TARGET_KW["dense"].items() if "per_layer_input" not in k}
TARGET_KW["unified"] = _UNIFIED_KW
TARGET_KW["unified_shared"] = dict(_UNIFIED_KW, num_kv_shared_layers=2, use_double_wide_mlp=True)  # stores: 3, 2
# 12B-shaped (for the CLI run): the 12B's structure (the 5:1 default pattern, K = V with one global KV head, no
# sharing, W = 1024) at tiny sizes, with the embedded model's vocabulary so its tokenizer.json fits
TARGET_KW["unified_12b"] = dict(_UNIFIED_KW, vocab_size=8192, intermediate_size=128, sliding_window=1024)
del TARGET_KW["unified_12b"]["layer_types"]
UNIFIED = ("unified", "unified_shared", "unified_12b")  # families built with the gemma4_unified classes
COMMON = dict(
    final_logit_softcapping=30.0,
    max_position_embeddings=4096,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
    rms_norm_eps=1e-6,
)


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every norm weight / scale / layer_scalar away from 1 so 'w vs 1+w' mistakes show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if "embed_scale" in name:  # non-persistent constant sqrt(H), not a weight
                continue
            if "layer_scalar" in name:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif ("norm" in name or "scale" in name) and t.is_floating_point():
                t.add_(0.3 * torch.randn(t.shape, generator=g))


def _text_config_class(family: str):
    from transformers import Gemma4UnifiedTextConfig

    return Gemma4UnifiedTextConfig if family in UNIFIED else cg.Gemma4TextConfig


def target_config(family: str):
    return _text_config_class(family)(**TARGET_KW[family], **COMMON)


def build_target(family: str, seed: int = 0):
    from transformers import Gemma4ForCausalLM, Gemma4UnifiedForCausalLM

    patch_transformers()
    torch.manual_seed(seed)
    model = (Gemma4UnifiedForCausalLM if family in UNIFIED else Gemma4ForCausalLM)(target_config(family)).eval()
    _perturb(model, seed + 100)
    with torch.no_grad():  # logits of a few units (not ~0.02) so a 1e-4 comparison means something
        model.model.embed_tokens.weight.mul_(20.0)
    model.generation_config.eos_token_id = None
    return model


def assistant_config(family: str, ordered: bool | None = None):
    from transformers import Gemma4AssistantConfig, Gemma4UnifiedAssistantConfig

    patch_transformers()
    t = TARGET_KW[family]
    text = dict(
        vocab_size=t["vocab_size"],
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        layer_types=[S, S, S, F],
        num_attention_heads=4,
        num_key_value_heads=t["num_key_value_heads"],
        head_dim=t["head_dim"],
        global_head_dim=t["global_head_dim"],
        sliding_window=t["sliding_window"],
        num_kv_shared_layers=4,
        final_logit_softcapping=None,
    )
    if family not in UNIFIED:
        text.update(hidden_size_per_layer_input=0, vocab_size_per_layer_input=0)
    if t.get("attention_k_eq_v"):
        text.update(attention_k_eq_v=True, num_global_key_value_heads=t["num_global_key_value_heads"])
    text_cfg = _text_config_class(family)(**text)
    if ordered is None:
        ordered = family == "e2b"
    return (Gemma4UnifiedAssistantConfig if family in UNIFIED else Gemma4AssistantConfig)(
        text_config=text_cfg.to_dict(),
        backbone_hidden_size=t["hidden_size"],
        use_ordered_embeddings=ordered,
        num_centroids=16,
        centroid_intermediate_top_k=4,
    )


def build_assistant(family: str, seed: int = 0, ordered: bool | None = None):
    from transformers import Gemma4AssistantForCausalLM, Gemma4UnifiedAssistantForCausalLM

    patch_transformers()
    torch.manual_seed(seed + 7)
    cfg = assistant_config(family, ordered)
    model = (Gemma4UnifiedAssistantForCausalLM if family in UNIFIED else Gemma4AssistantForCausalLM)(cfg).eval()
    _perturb(model, seed + 200)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20.0)
    if cfg.use_ordered_embeddings:
        g = torch.Generator().manual_seed(1)
        model.masked_embedding.token_ordering.copy_(torch.randperm(cfg.text_config.vocab_size, generator=g))
    model.generation_config.num_assistant_tokens = 4
    return model


def build_multimodal(text_model):
    """Wrap the same language model in Gemma4ForConditionalGeneration with tiny vision/audio towers (or, for a
    unified model, in Gemma4UnifiedForConditionalGeneration with tiny encoder-free embedders)."""
    from transformers import (
        Gemma4AudioConfig,
        Gemma4Config,
        Gemma4ForConditionalGeneration,
        Gemma4UnifiedTextConfig,
        Gemma4VisionConfig,
    )

    if isinstance(text_model.config, Gemma4UnifiedTextConfig):
        return _build_unified_multimodal(text_model)

    vision = Gemma4VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=16,
        position_embedding_size=64,
        use_clipped_linears=True,
    )
    audio = Gemma4AudioConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        subsampling_conv_channels=[8, 4],
        output_proj_dims=32,
    )
    cfg = Gemma4Config(
        text_config=text_model.config.to_dict(), vision_config=vision.to_dict(), audio_config=audio.to_dict()
    )
    return _with_decoder(Gemma4ForConditionalGeneration, cfg, text_model)


def _build_unified_multimodal(text_model):
    """Gemma4UnifiedForConditionalGeneration (models/gemma4_unified): no towers, a patch embedder (LN, Dense, LN,
    2-D position table) and an audio frame projection; the decoder is ``model.language_model``."""
    from transformers import (
        Gemma4UnifiedAudioConfig,
        Gemma4UnifiedConfig,
        Gemma4UnifiedForConditionalGeneration,
        Gemma4UnifiedVisionConfig,
    )

    vision = Gemma4UnifiedVisionConfig(
        patch_size=4, pooling_kernel_size=2, mm_embed_dim=32, mm_posemb_size=16, output_proj_dims=32
    )
    audio = Gemma4UnifiedAudioConfig(audio_embed_dim=16)
    cfg = Gemma4UnifiedConfig(
        text_config=text_model.config.to_dict(), vision_config=vision.to_dict(), audio_config=audio.to_dict()
    )
    return _with_decoder(Gemma4UnifiedForConditionalGeneration, cfg, text_model)


def _with_decoder(model_cls, cfg, text_model):
    """A seeded multimodal ``model_cls(cfg)`` whose decoder (``model.language_model``) is ``text_model``'s."""
    torch.manual_seed(3)
    mm = model_cls(cfg).eval()
    mm.model.language_model.load_state_dict(text_model.model.state_dict())
    return mm


@functools.cache
def saved_pair(root: str, family: str, layout: str = "text", dtype: str = "float32") -> tuple[str, str]:
    """Save target (+ assistant) under ``root``; returns (target_dir, assistant_dir)."""
    import os

    target = build_target(family)
    tdir = os.path.join(root, f"{family}-{layout}-{dtype}")
    adir = os.path.join(root, f"{family}-assistant-{dtype}")
    dt = getattr(torch, dtype)
    if layout == "multimodal":
        build_multimodal(target).to(dt).save_pretrained(tdir)
    else:
        target.to(dt).save_pretrained(tdir)
    build_assistant(family).to(dt).save_pretrained(adir)
    return tdir, adir
