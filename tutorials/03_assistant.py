# %% [markdown]
# # 03 · The Gemma 4 assistant: how the drafter drafts
#
# Every Gemma 4 model has a small companion, the **assistant** (an "MTP" drafter). It is unusual in three ways:
#
# * it has **no KV cache of its own**: each of its layers reads the *target's* stored K/V of the same layer type;
# * within one drafting round it runs at a **constant position** $p$ (the position of the last emitted token);
# * it is **recurrent**: step $j+1$ reads the hidden state step $j$ produced (through `post_projection`), step 1
#   reads the target's own final hidden state at $p-1$.
#
# One step, with $t$ the token being read and $h$ the incoming hidden state (both of the target's width $H_t$):
#
# $$x_0 = [\,E_t[t]\sqrt{H_t}\;;\; h\,]\,W_{pre}, \quad x = \mathrm{layers}(x_0), \quad
#   h' = \mathrm{RMSNorm}(x),\quad z = h' E_a^\top,\quad h_{next} = h' W_{post}.$$
#
# We run the loop by hand, check the K/V window it sees, and compare with the engine.

# %%
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else "tutorials")
from _tiny import tiny_assistant, tiny_target

import minimtp
from minimtp.attention import DraftDenseContext
from minimtp.config import FULL, SLIDING

torch.set_num_threads(1)  # tiny tensors: threads only add overhead
target = tiny_target(seed=0)
assistant = tiny_assistant(target, seed=1)
acfg = assistant.config
print("assistant layers:", acfg.text.layer_types, " kv modes:", acfg.text.kv_modes)
print("pre_projection", tuple(assistant.pre_projection.weight.shape), "= [H_a, 2 H_t]")
print("post_projection", tuple(assistant.post_projection.weight.shape), "= [H_t, H_a]")

# %% [markdown]
# ## One round by hand
#
# The target has processed the prompt (positions $0..p-1$) and emitted token $t$ at position $p$, which it has
# *not* run yet. `forward_with_kv` returns the target's logits, final hidden states and the K/V of its store
# layers, one `(K, V)` pair per layer type, each `[B, S, kv_heads, head_dim]`.

# %%
prompt = [2, 17, 5, 33, 8, 40, 12, 9, 21, 30]
p = len(prompt)
with torch.no_grad():
    logits, hidden, kv = target.forward_with_kv(torch.tensor([prompt]))
t = int(logits[0, -1].argmax())  # the token the target emits at position p (greedy)
print("target K/V per type:", {lt: tuple(k.shape) for lt, (k, v) in kv.items()})
print(f"p = {p}, emitted token t = {t}")


# %%
@torch.no_grad()
def draft(kv, k=4, p=p, t=t, h=hidden[0, -1]):
    ctx = DraftDenseContext(acfg.text, kv, torch.tensor([[p]]))  # queries at position p see keys < p
    pos = torch.tensor([p])  # constant for the whole round
    last, h = torch.tensor([t]), h[None]
    drafts, all_logits = [], []
    for _ in range(k):
        z, h = assistant.step(target.embed(last), h, pos, ctx)
        last = z.argmax(-1)  # argmax drafting (tutorial 04 explains how to verify it exactly)
        drafts.append(int(last))
        all_logits.append(z[0])
    return drafts, torch.stack(all_logits)


drafts, dlogits = draft(kv)
print("drafts:", drafts)

# %% [markdown]
# ## Which K/V does the drafter see?
#
# Full-attention assistant layers see every target position $< p$. Sliding layers see the **last $W+1$** of
# them (transformers builds the sliding mask with the query at index 0, inclusive on both ends), one more than
# the target's own window of $W$ keys including itself. We check it by corrupting the target's sliding K/V:
# entries older than $p-(W+1)$ must not matter, entry $p-(W+1)$ must.

# %%
W = acfg.text.sliding_window


def corrupt(kv, lt, positions):
    out = {k: (a.clone(), b.clone()) for k, (a, b) in kv.items()}
    out[lt][0][:, positions] += 5.0
    out[lt][1][:, positions] -= 5.0
    return out


_, z_old = draft(corrupt(kv, SLIDING, list(range(0, p - (W + 1)))))
_, z_edge = draft(corrupt(kv, SLIDING, [p - (W + 1)]))
_, z_full = draft(corrupt(kv, FULL, [0]))
change = lambda z: float((z - dlogits).abs().max())
print(f"W = {W}. Max change of the draft logits after corrupting")
print(f"  sliding K/V at positions < p-(W+1) = {p - W - 1}: {change(z_old):.2e}")
print(f"  sliding K/V at position p-(W+1):        {change(z_edge):.2e}")
print(f"  full K/V at position 0:                 {change(z_full):.2e}")
assert torch.equal(z_old, dlogits)
assert float((z_edge - dlogits).abs().max()) > 1e-4 and float((z_full - dlogits).abs().max()) > 1e-4

# %% [markdown]
# A KV cache that serves the drafter must therefore keep $\max(W, W+1) = W+1$ sliding positions, not $W$
# (`minimtp.kv_cache.KVCache(sliding_keep=...)`, tutorial 06).
#
# ## Verification in one target forward
#
# The target now runs $[t, d_1, \dots, d_k]$ at positions $p..p+k$ in **one** forward: row $j$ is its
# prediction after $d_1..d_j$. Greedy verification accepts the longest prefix of drafts that equals the
# target's argmax, then emits the target's own next token (a correction, or a bonus if all were accepted).

# %%
with torch.no_grad():
    rows = target(torch.tensor([prompt + [t] + drafts]))[0, p:]  # k+1 rows
top = rows.argmax(-1).tolist()
n = 0
while n < len(drafts) and drafts[n] == top[n]:
    n += 1
emitted = drafts[:n] + [top[n]]
print(f"target argmax per row {top}: accepted {n} of {len(drafts)}, round emits {[t] + emitted}")

# %% [markdown]
# ## The same thing in the engine
#
# `minimtp.Engine` runs this loop over a paged KV cache for a batch of prompts. We peek at the drafts of its
# first round, and check the defining property of greedy speculative decoding: **the output equals plain greedy
# decoding**, only the number of target forwards changes.

# %%
engine = minimtp.Engine(target, assistant)
seen = []
orig = engine._draft


def spy(*a, **kw):
    out = orig(*a, **kw)
    seen.append(out[0].tolist())
    return out


engine._draft = spy
kw = dict(max_new_tokens=24, temperature=0.0, stop_token_ids=[])
spec = engine.generate([prompt], num_speculative_tokens=4, **kw)
plain = engine.generate([prompt], use_assistant=False, **kw)
print("engine's first-round drafts:", seen[0][0])
print("speculative:", spec.tokens[0])
print("plain      :", plain.tokens[0])
s = spec.stats
print(
    f"target forwards: {s.target_steps} (speculative) vs {plain.stats.target_steps} (plain);"
    f" acceptance rate {s.acceptance_rate:.2f}, tokens per round {s.mean_acceptance_length:.2f}"
)
assert seen[0][0] == drafts
assert spec.tokens == plain.tokens and spec.tokens[0][: n + 1] == [t] + emitted[:n]
assert s.target_steps < plain.stats.target_steps

# %% [markdown]
# ## The whole loop in one screen
#
# The engine batches ragged prompts, streams, and keeps statistics; the algorithm itself fits on one screen.
# `minimtp.decode.speculative_decode` is that screen for one sequence: draft $k$ at the constant position,
# verify $k+1$ rows in one target forward, accept a prefix plus one token, roll the cache back. Read it next to
# this tutorial (`minimtp/decode.py`); it emits exactly the engine's tokens, for greedy and seeded sampling alike.

# %%
import inspect

from minimtp.decode import speculative_decode

print(f"speculative_decode: {len(inspect.getsource(speculative_decode).splitlines())} lines")
one = speculative_decode(target, assistant, prompt, 24, 4, stop_token_ids=[])
assert one == spec.tokens[0]
sampled = dict(temperature=0.8, top_k=20, seed=3, draft_mode="sample", stop_token_ids=[])
assert (
    speculative_decode(target, assistant, prompt, 24, 4, **sampled)
    == engine.generate([prompt], 24, num_speculative_tokens=4, **sampled).tokens[0]
)
print("one-screen loop == engine, greedy and sampled")
print("tutorial 03 OK")
