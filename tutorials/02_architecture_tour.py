# %% [markdown]
# # 02 · A tour of the Gemma 4 architecture
#
# We build a tiny Gemma 4 text decoder that has every feature of the real ones switched on and follow one
# prompt through it, printing shapes. The features:
#
# 1. **Per-layer embeddings (PLE)**: a second, small embedding per layer that is mixed in after each block;
# 2. **sliding vs full attention** layers with *different* head dimensions and RoPE variants;
# 3. **KV sharing**: the last layers compute no K/V of their own, they *reuse* an earlier layer's ("store");
# 4. **mixture of experts (MoE)** in parallel with the dense MLP.
#
# The code is `minimtp/model.py`; each class docstring states its equation.

# %%
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else "tutorials")
from _tiny import tiny_target

from minimtp.attention import DenseContext
from minimtp.config import FULL, SLIDING
from minimtp.model import rope_inv_freq

torch.set_num_threads(1)  # tiny tensors: threads only add overhead
target = tiny_target(seed=0, enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=16, mix=1.0)
cfg = target.config
print(f"V={cfg.vocab_size} H={cfg.hidden_size} L={cfg.num_layers} query heads={cfg.num_heads}")
for i in range(cfg.num_layers):
    print(
        f"layer {i}: {cfg.layer_types[i]:17s} head_dim={cfg.head_dims[i]:3d} kv_heads={cfg.kv_heads[i]}"
        f" kv_mode={cfg.kv_modes[i]!s:6s} reads K/V of layer {cfg.kv_source(i)}"
    )

# %% [markdown]
# ## Embeddings and PLE
#
# The token embedding is scaled: $e = E[x] \cdot \sqrt{H}$. PLE adds, for every layer $\ell$, a vector
# $\mathrm{ple}_\ell \in \mathbb{R}^{P}$ built from a *second* embedding table (indexed by the token) and a
# projection of $e$ (so it also depends on context-free token identity only):
#
# $$\mathrm{ple} = \tfrac{1}{\sqrt 2}\Big(\mathrm{RMSNorm}\big(\mathrm{reshape}_{L\times P}(e\,W / \sqrt{H})\big)
#   + E_{ple}[x]\sqrt{P}\Big) \in \mathbb{R}^{T \times L \times P}.$$
#
# After layer $\ell$'s MLP, $x \leftarrow x + \mathrm{RMSNorm}\big((\mathrm{gelu}(x W_g) \odot
# \mathrm{ple}_\ell) W_p\big)$: a cheap, per-layer, per-token correction.

# %%
ids = torch.tensor([2, 17, 5, 33, 8, 40, 12, 9])
T = ids.shape[0]
m = target.model
with torch.no_grad():
    e = m.embed_tokens(ids)
    ple = m.per_layer_inputs(ids, e)
print("embedding e:", tuple(e.shape), " scale sqrt(H) =", m.embed_tokens.scale)
print("PLE table:", tuple(m.embed_tokens_per_layer.weight.shape), "-> ple:", tuple(ple.shape), "= [T, L, P]")
assert ple.shape == (T, cfg.num_layers, cfg.hidden_size_per_layer_input)
assert torch.allclose(e, m.embed_tokens.weight[ids] * cfg.hidden_size**0.5)

# %% [markdown]
# ## Attention: two layer types
#
# Sliding layers see the last $W$ positions (here $W = 4$) and use a small head dim with ordinary RoPE over
# all of it. Full layers see everything and use a **larger** head dim with *proportional* RoPE: only the first
# quarter of the frequency pairs rotate (`partial_rotary_factor = 0.25`), the rest carry position-free
# content. Both normalise q and k with RMSNorm and use softmax scale 1.

# %%
for lt in (SLIDING, FULL):
    d = cfg.type_head_dim(lt)
    inv = rope_inv_freq(cfg.rope[lt], d)
    print(
        f"{lt:17s} head_dim {d:3d}: rope {cfg.rope[lt].rope_type:12s} theta {cfg.rope[lt].theta:9.0f}"
        f"  rotated pairs {int((inv > 0).sum())}/{d // 2}"
    )
assert int((rope_inv_freq(cfg.rope[FULL], cfg.type_head_dim(FULL)) > 0).sum()) == cfg.type_head_dim(FULL) // 8
assert int((rope_inv_freq(cfg.rope[SLIDING], cfg.type_head_dim(SLIDING)) > 0).sum()) == cfg.type_head_dim(SLIDING) // 2

# %% [markdown]
# We record the shapes of q, k, v in each layer with forward hooks. The K/V live in a context object
# (`DenseContext` here: no cache, full causal attention); `store(i, k, v)` is called only by layers that own
# K/V.

# %%
shapes = {}
for i, layer in enumerate(m.layers):
    attn = layer.self_attn

    def hook(mod, inp, out, i=i):
        shapes[i] = {"q": (T, mod.nh, mod.d), "o": tuple(out.shape)}

    attn.register_forward_hook(hook)


class LoggingContext(DenseContext):
    def store(self, i, k, v):
        shapes.setdefault("stored", []).append((i, tuple(k.shape), tuple(v.shape)))
        super().store(i, k, v)


ctx = LoggingContext(cfg, 1, T)
with torch.no_grad():
    out = target.run(ids, torch.arange(T), ctx)
for i in range(cfg.num_layers):
    print(f"layer {i}: q {shapes[i]['q']}  out {shapes[i]['o']}")
for i, ks, vs in shapes["stored"]:
    print(f"layer {i} stored K {ks} V {vs}")
print("logits:", tuple(out.logits.shape), " hidden:", tuple(out.hidden.shape))

# %% [markdown]
# ## KV sharing
#
# Layers 2 and 3 are "reuse" layers: they own only `q_proj`, `q_norm` and `o_proj`, and attend to the K/V that
# the last non-shared layer *of the same type* stored (layer 0 for sliding, layer 1 for full). That saves the
# K/V projections and, more importantly, the KV-cache memory of those layers. The same stored K/V is what the
# MTP assistant reads (tutorial 03).

# %%
stored = [i for i, _, _ in shapes["stored"]]
print("layers that stored K/V:", stored, " store layer per type:", {t: cfg.store_layer(t) for t in (SLIDING, FULL)})
assert stored == [i for i, mode in enumerate(cfg.kv_modes) if mode != "reuse"] == [0, 1]
assert not hasattr(m.layers[2].self_attn, "k_proj") and hasattr(m.layers[0].self_attn, "k_proj")

# %% [markdown]
# ## Mixture of experts
#
# Each layer's feed-forward block runs the dense MLP **and**, in parallel on the same residual, a router that
# picks the top-$k$ of $E$ experts per token; their outputs are weighted by renormalised router probabilities:
#
# $$y = N_1(\mathrm{mlp}(x)) + N_2\Big(\sum_{j=1}^{k} w_j\, \mathrm{expert}_{e_j}(x)\Big).$$

# %%
layer = m.layers[0]
with torch.no_grad():
    w, idx = layer.router(e)  # (in the model the router reads the residual after attention; e stands in for it)
print("router weights", tuple(w.shape), "expert ids", tuple(idx.shape), "(T, top_k)")
print("experts chosen per token:", idx.tolist())
print("expert weights: gate_up", tuple(layer.experts.gate_up_proj.shape), "down", tuple(layer.experts.down_proj.shape))
assert w.shape == idx.shape == (T, cfg.top_k_experts)
# w = (renormalised top-k probabilities) * per_expert_scale[idx]: undo the learned scale to see the sum of 1
assert torch.allclose((w / layer.router.per_expert_scale[idx]).sum(-1), torch.ones(T), atol=1e-5)

# %% [markdown]
# ## The output
#
# After the last layer a final RMSNorm gives the hidden state $h$ (the assistant's input, tutorial 03), then
# $z = c \tanh(h E^\top / c)$. The logits of the last row are what tutorial 01 sampled from.

# %%
with torch.no_grad():
    full = target(ids[None])[0]
assert torch.allclose(full, out.logits, atol=1e-5)
assert float(full.abs().max()) <= cfg.final_logit_softcapping
print("tutorial 02 OK")
