"""Model configurations written as transformers writes them, and the initialisation of a fresh model."""

from __future__ import annotations

import torch

from minimtp.config import FULL, SLIDING, AssistantConfig, parse_text_config
from minimtp.hf_compat import patch_transformers
from minimtp.train.corpus import BOS, EOS, PAD


def layer_pattern(pattern: str, n: int) -> list[str]:
    """ "sssf" → [sliding, sliding, sliding, full] repeated to n layers; the last layer is always full."""
    kinds = {"s": SLIDING, "f": FULL}
    types = [kinds[pattern[i % len(pattern)]] for i in range(n)]
    types[-1] = FULL
    return types


def _hf_text_config(**kw) -> dict:
    """A ``gemma4_text`` config dict exactly as transformers writes it (built through ``Gemma4TextConfig``)."""
    from transformers import Gemma4TextConfig

    d = Gemma4TextConfig(**kw).to_dict()
    d.pop("transformers_version", None)
    return d


def target_config_dict(a) -> dict:
    """The ``gemma4_text`` config of a target shape given by the CLI flags ``a`` (``--hidden``, ``--layers``, ...)."""
    return _hf_text_config(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        layer_types=layer_pattern(a.pattern, a.layers),
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        head_dim=a.head_dim,
        global_head_dim=a.global_head_dim,
        sliding_window=a.window,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=a.vocab,
        num_kv_shared_layers=0,
        final_logit_softcapping=30.0,
        tie_word_embeddings=True,
        max_position_embeddings=a.max_positions,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=BOS,
        torch_dtype="bfloat16",
    )


def assistant_config_dict(a, target_cfg) -> dict:
    """A ``gemma4_assistant`` config whose per-type KV layout equals the target's store layers."""
    from transformers import Gemma4AssistantConfig, Gemma4TextConfig

    s, f = target_cfg.store_layer(SLIDING), target_cfg.store_layer(FULL)
    if target_cfg.kv_heads[s] != target_cfg.kv_heads[f] and not target_cfg.attention_k_eq_v:
        raise SystemExit("the target's sliding and full store layers have different KV head counts")
    patch_transformers()  # transformers cannot build a fully KV-shared text config without it
    text = Gemma4TextConfig(
        vocab_size=target_cfg.vocab_size,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        layer_types=layer_pattern(a.pattern, a.layers),
        num_attention_heads=a.heads,
        num_key_value_heads=target_cfg.kv_heads[s],
        head_dim=target_cfg.head_dims[s],
        global_head_dim=target_cfg.head_dims[f],
        sliding_window=target_cfg.sliding_window,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0,
        num_kv_shared_layers=a.layers,
        final_logit_softcapping=None,
        max_position_embeddings=target_cfg.max_position_embeddings,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=BOS,
    )
    d = Gemma4AssistantConfig(
        text_config=text.to_dict(),
        backbone_hidden_size=target_cfg.hidden_size,
        use_ordered_embeddings=False,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
    ).to_dict()
    d.pop("transformers_version", None)
    d["text_config"].pop("transformers_version", None)
    return d


def parse_assistant_dict(d: dict, num_assistant_tokens: int | None = None) -> AssistantConfig:
    """minimtp's :class:`AssistantConfig` of an assistant config dict (as written by :func:`assistant_config_dict`)."""
    td = dict(d["text_config"])
    td.setdefault("vocab_size_per_layer_input", 0)
    return AssistantConfig(
        text=parse_text_config(td, "assistant text_config"),
        backbone_hidden_size=d["backbone_hidden_size"],
        use_ordered_embeddings=bool(d.get("use_ordered_embeddings", False)),
        num_assistant_tokens=num_assistant_tokens,
    )


def init_weights(model: torch.nn.Module, std: float = 0.02) -> None:
    """N(0, 0.02) for every matrix and embedding, ones for norm weights and layer scalars."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                torch.nn.init.normal_(p, 0.0, std)
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.zero_()
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.fill_(1.0)


def count_params(model: torch.nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())
