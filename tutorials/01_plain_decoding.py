# %% [markdown]
# # 01 · Plain decoding, from logits to tokens
#
# A language model maps a prefix $x_{1:t}$ to one real number per vocabulary entry, the **logits**
# $z \in \mathbb{R}^V$. Everything a decoder does afterwards is a choice of how to turn $z$ into the next token.
# This tutorial builds that pipeline by hand with the Gemma 4 target of minimtp, then checks it against the
# library (`minimtp.sampling`, `minimtp.Engine`).
#
# Run it as a script (`python tutorials/01_plain_decoding.py`) or open it as a notebook (it is in jupytext
# percent format). `MINIMTP_FAST=1` shrinks the sample counts.

# %%
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else "tutorials")
from _tiny import FAST, tiny_target

import minimtp
from minimtp.sampling import SamplingParams, draw_exponentials, make_generators, process_logits, sample

torch.manual_seed(0)
torch.set_num_threads(1)  # tiny tensors: threads only add overhead

# %% [markdown]
# ## The model
#
# minimtp ships a small trained Gemma 4 pair in `minimtp/default_model/` (when it has been built). If it is not
# there, we fall back to a **tiny random** Gemma 4 with the same architecture; the numbers are then meaningless as
# language, but every step below is identical.

# %%
DEFAULT = os.path.join(os.path.dirname(minimtp.__file__), "default_model", "target")
if os.path.isfile(os.path.join(DEFAULT, "config.json")):
    from tokenizers import Tokenizer

    target = minimtp.load_target(DEFAULT)
    tok = Tokenizer.from_file(os.path.join(DEFAULT, "tokenizer.json"))
    encode = lambda s: tok.encode(s).ids
    decode = lambda ids: tok.decode(ids)
    prompt = encode("def fibonacci(n):\n")
    print("loaded the default model from", DEFAULT)
else:
    print("NOTE: minimtp/default_model/ is not there yet: using a tiny RANDOM Gemma 4 (outputs are not language).")
    target = tiny_target(seed=0)
    encode = None
    decode = lambda ids: " ".join(f"<{i}>" for i in ids)
    prompt = [2, 17, 5, 33, 8]
cfg = target.config
print(f"vocabulary V = {cfg.vocab_size}, hidden size = {cfg.hidden_size}, layers = {cfg.num_layers}")
print("prompt:", prompt)

# %% [markdown]
# ## Logits → probabilities
#
# `target(input_ids)` runs the whole decoder without a cache and returns logits for every position,
# shape `[B, S, V]`. Only the **last** row predicts the next token. The softmax turns logits into a
# probability distribution:
#
# $$p_i = \frac{e^{z_i}}{\sum_j e^{z_j}}, \qquad \sum_i p_i = 1 .$$
#
# Gemma 4 first squashes the logits with a soft cap, $z \leftarrow c \tanh(z / c)$ with $c = 30$, so no logit
# exceeds $\pm 30$.

# %%
with torch.no_grad():
    logits = target(torch.tensor([prompt]))  # [1, S, V]
z = logits[0, -1]
p = torch.softmax(z, -1)
print("logits shape:", tuple(logits.shape), " last-row max |z| =", float(z.abs().max()))
top = torch.topk(p, 5)
for prob, i in zip(top.values.tolist(), top.indices.tolist()):
    print(f"  token {i:6d}  z = {float(z[i]):7.3f}  p = {prob:.4f}")
assert abs(float(p.sum()) - 1) < 1e-5 and float(z.abs().max()) <= 30.0 + 1e-4

# %% [markdown]
# ## Greedy decoding
#
# Greedy decoding takes $\arg\max_i z_i$ (the softmax is monotone, so the argmax of $z$ and of $p$ agree),
# appends it and repeats. Written as naïvely as possible, one full forward per new token:

# %%
N_NEW = 8 if FAST else 16


@torch.no_grad()
def greedy(ids, n):
    ids = list(ids)
    for _ in range(n):
        z = target(torch.tensor([ids]))[0, -1]
        ids.append(int(z.argmax()))
    return ids[len(prompt) :]


mine = greedy(prompt, N_NEW)
print("greedy:", decode(mine))

# %% [markdown]
# The engine does the same with a KV cache (each step runs only the new token; tutorial 06 explains the cache).
# Greedy decoding is deterministic, so the two must agree token for token.

# %%
engine = minimtp.Engine(target)
res = engine.generate([prompt], max_new_tokens=N_NEW, temperature=0.0, stop_token_ids=[])
print("engine:", decode(res.tokens[0]))
assert res.tokens[0] == mine

# %% [markdown]
# ## Reshaping the distribution: temperature, top-k, top-p, min-p
#
# Sampling draws the next token from a distribution derived from $z$. minimtp's `process_logits` applies, in
# this order (the same as transformers):
#
# * **temperature** $T$: $p \propto e^{z/T}$. $T<1$ sharpens, $T>1$ flattens, $T \to 0$ is greedy;
# * **top-k**: keep the $k$ largest logits;
# * **top-p** (nucleus): keep the smallest set of most likely tokens whose mass reaches $p_{top}$;
# * **min-p**: keep tokens with $p_i \ge p_{min} \cdot \max_j p_j$;
#
# then renormalises over the kept tokens. The result is *the* target distribution; tutorial 04 shows that
# speculative decoding reproduces exactly this distribution.


# %%
def entropy(q):
    q = q[q > 0]
    return abs(float(-(q * q.log()).sum()))


settings = {
    "T=1": SamplingParams(temperature=1.0),
    "T=0.5": SamplingParams(temperature=0.5),
    "T=2": SamplingParams(temperature=2.0),
    "T=1, top-k 5": SamplingParams(temperature=1.0, top_k=5),
    "T=1, top-p 0.5": SamplingParams(temperature=1.0, top_p=0.5),
    "T=1, min-p 0.1": SamplingParams(temperature=1.0, min_p=0.1),
    "T=0 (greedy)": SamplingParams(temperature=0.0),
}
probs = {}
for name, sp in settings.items():
    q = process_logits(z[None], sp)[0]
    probs[name] = q
    print(
        f"{name:16s} kept {int((q > 0).sum()):6d} tokens   entropy {entropy(q):6.3f} nats   max p {float(q.max()):.3f}"
    )

assert int((probs["T=1, top-k 5"] > 0).sum()) == 5
assert entropy(probs["T=0.5"]) < entropy(probs["T=1"]) < entropy(probs["T=2"])
kept = probs["T=1, top-p 0.5"] > 0
assert float(probs["T=1"][kept].sum()) >= 0.5  # the nucleus holds at least top_p of the original mass
kept = probs["T=1, min-p 0.1"] > 0
assert float(probs["T=1"][kept].min()) >= 0.1 * float(probs["T=1"].max())  # min-p keeps p_i >= 0.1 max p
assert int(probs["T=0 (greedy)"].argmax()) == int(z.argmax()) and float(probs["T=0 (greedy)"].max()) == 1.0

# %% [markdown]
# ## Sampling with passed-in randomness
#
# minimtp never draws random numbers inside its sampling functions: randomness is an argument. `sample` uses
# the **exponential race**: draw $E_i \sim \mathrm{Exp}(1)$ independently and return $\arg\max_i p_i / E_i$.
# Because $E_i / p_i \sim \mathrm{Exp}(p_i)$ and the minimum of independent exponentials is the $i$-th one with
# probability $p_i / \sum_j p_j$, this samples $i$ with probability $p_i$, with no normalisation and no cumulative
# sum. We check it empirically:

# %%
N = 4000 if FAST else 20000
q = probs["T=1, top-k 5"]
gens = make_generators(seed=0, n=N)  # one generator per sample, as the engine keeps one per sequence
draws = sample(q.expand(N, -1), draw_exponentials(gens, q.shape[0]))
freq = torch.bincount(draws, minlength=q.shape[0]).double() / N
support = (q > 0).nonzero()[:, 0].tolist()
for i in support:
    print(f"  token {i:6d}  p = {float(q[i]):.3f}   empirical {float(freq[i]):.3f}")
assert set(draws.unique().tolist()) <= set(support)  # never outside the top-k set
assert float((freq - q.double()).abs().max()) < 4 * (0.25 / N) ** 0.5 + 1e-3  # ≈ 4 standard errors

# %% [markdown]
# ## Sampled decoding
#
# Finally, the engine samples whole continuations. A seed makes a run reproducible; different seeds give
# different text.

# %%
kw = dict(max_new_tokens=N_NEW, temperature=0.8, top_p=0.95, stop_token_ids=[])
a = engine.generate([prompt], seed=1, **kw).tokens[0]
b = engine.generate([prompt], seed=1, **kw).tokens[0]
c = engine.generate([prompt], seed=2, **kw).tokens[0]
print("seed 1:", decode(a))
print("seed 2:", decode(c))
assert a == b
print("tutorial 01 OK")
