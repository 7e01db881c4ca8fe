"""Tiny random Gemma 4 models for the tutorials and the assignment grader (not a tutorial page: the leading
underscore keeps it out of the docs).

Everything here is plain minimtp: a config dict → ``parse_text_config`` → ``Gemma4`` / ``Gemma4Assistant`` with
seeded random weights. The sizes are chosen so that every tutorial runs in seconds on a laptop CPU.
"""

from __future__ import annotations

import os

import torch

from minimtp.assistant import Gemma4Assistant, check_pair
from minimtp.config import FULL, SLIDING, AssistantConfig, parse_text_config
from minimtp.model import Gemma4

FAST = os.environ.get("MINIMTP_FAST") == "1"


def text_dict(vocab: int = 64, hidden: int = 32, layers: int = 4, **over) -> dict:
    """A ``gemma4_text`` config dict: alternating sliding/full layers, 4 query heads sharing 1 KV head (GQA),
    head dim 8 (sliding) vs 16 (full), sliding window 4, PLE of width 8, final softcap 30."""
    d = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        global_head_dim=16,
        layer_types=[SLIDING if i % 2 == 0 else FULL for i in range(layers)],
        sliding_window=4,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=vocab,
        final_logit_softcapping=30.0,
        tie_word_embeddings=True,
        max_position_embeddings=512,
        eos_token_id=1,
        pad_token_id=0,
    )
    d.update(over)
    return d


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int, std: float = 0.3) -> torch.nn.Module:
    """Seeded N(0, std²) weights; norm weights 1 ± 0.2 and layer scalars 1 ± 0.1 (so nothing is neutral)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(std * torch.randn(p.shape, generator=g))
    for name, b in model.named_buffers():
        if name.endswith("layer_scalar"):
            b.copy_(1.0 + 0.1 * torch.randn(b.shape, generator=g))
    return model


def _scale_post_norms(model: torch.nn.Module, f: float) -> None:
    """Gemma's sandwich norms: every block's output passes a post-norm before it joins the residual, so the post-norm
    weights set how far each block moves the residual stream away from the input embedding."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")) or (
                name.endswith("post_per_layer_input_norm.weight")
            ):
                p.mul_(f)


def tiny_target(seed: int = 0, mix: float = 0.3, **over) -> Gemma4:
    """A random tiny Gemma 4 target (float32, eval mode) with an untied LM head and KV sharing (layers 2, 3 reuse
    the K/V of layers 0, 1). ``mix`` scales the blocks' contributions: small values give an almost-bigram model
    (the next token depends mostly on the current one), which a drafter can predict. ``over`` edits the config."""
    over = {"tie_word_embeddings": False, "num_kv_shared_layers": 2, **over}
    cfg = parse_text_config(text_dict(**over), "tiny-target")
    model = randomize(Gemma4(cfg), seed)
    _scale_post_norms(model, mix)
    return model.eval()


def tiny_assistant(target: Gemma4, seed: int = 1, layers: int = 2, hidden: int | None = None, correlate: bool = True):
    """A random assistant that fits ``target``: every layer reads the target's store-layer K/V of its type, so the
    per-type head dims and KV-head counts are copied from the target. With ``correlate`` it is a hand-made
    "drafter": its pre-projection passes the last token's embedding through, its blocks are damped, its tied LM
    head is the target's LM head and its post-projection is near the identity, so it predicts roughly the
    target's bigram and its drafts are accepted fairly often (a stand-in for a trained drafter)."""
    t = target.config
    H = hidden or t.hidden_size
    sl, fu = t.store_layer(SLIDING), t.store_layer(FULL)
    d = text_dict(
        vocab=t.vocab_size,
        hidden=H,
        layers=layers,
        num_key_value_heads=t.kv_heads[sl],
        head_dim=t.head_dims[sl],
        global_head_dim=t.head_dims[fu],
        sliding_window=t.sliding_window,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0,
        num_kv_shared_layers=layers,
    )
    acfg = AssistantConfig(text=parse_text_config(d, "tiny-assistant"), backbone_hidden_size=t.hidden_size)
    check_pair(t, acfg)
    a = randomize(Gemma4Assistant(acfg), seed, std=0.1)
    if correlate and H == t.hidden_size:
        _scale_post_norms(a, 0.1)
        with torch.no_grad():
            a.pre_projection.weight[:, : t.hidden_size] += torch.eye(H)
            a.model.embed_tokens.weight.copy_(target.lm_head_weight)
            a.post_projection.weight += torch.eye(H)
    return a.eval()
