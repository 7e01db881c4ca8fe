# %% [markdown]
# # 04 · Speculative sampling: the rule, and why it is exact
#
# A drafter proposes a token $x$; the target has a distribution $p$ for the same position. We want to emit a
# token distributed **exactly** as $p$, while emitting $x$ itself as often as possible (each accepted draft is a
# token that cost no extra target forward).
#
# ## The rule (Leviathan et al. 2023, Chen et al. 2023)
#
# If $x \sim q$ was *sampled* from the drafter's distribution $q$:
#
# 1. accept $x$ with probability $\min\!\big(1, \tfrac{p(x)}{q(x)}\big)$ (draw $u \sim U[0,1)$, accept iff
#    $u < p(x)/q(x)$);
# 2. on rejection, emit $y \sim \mathrm{norm}\big((p-q)^+\big)$, the residual.
#
# **Proof.** $P(\text{emit } y \text{ by acceptance}) = q(y)\min(1, p(y)/q(y)) = \min(p(y), q(y))$. The
# rejection probability is $\beta = 1 - \sum_x \min(p(x), q(x)) = \sum_x (p(x)-q(x))^+$, the residual's mass.
# So $P(\text{emit } y) = \min(p(y), q(y)) + \beta\,\frac{(p(y)-q(y))^+}{\beta} = \min(p,q)(y) + (p-q)^+(y) = p(y)$.
# $\square$
#
# The acceptance rate is $\alpha = \sum_x \min(p(x), q(x)) = 1 - \mathrm{TV}(p, q)$.

# %%
import os

import torch

from minimtp.sampling import draw_exponentials, draw_uniforms, make_generators, sample
from minimtp.speculative import verify

torch.set_num_threads(1)  # tiny tensors: threads only add overhead
N = 20000 if os.environ.get("MINIMTP_FAST") == "1" else 200000

p = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
q = torch.tensor([0.5, 0.3, 0.1, 0.1], dtype=torch.float64)


def exact_output(p, q):
    """P(emit y) of the sampled-draft rule, integrated exactly over x ~ q and u."""
    accept = torch.minimum(p, q)  # q(x) * min(1, p(x)/q(x))
    resid = (p - q).clamp_min(0)
    beta = 1 - accept.sum()
    return accept + beta * resid / resid.sum()


alpha = float(torch.minimum(p, q).sum())
print("p             ", p.tolist())
print("q             ", q.tolist())
print("exact output  ", [round(v, 12) for v in exact_output(p, q).tolist()])
print(f"acceptance rate alpha = {alpha:.2f}")
assert torch.allclose(exact_output(p, q), p, atol=1e-15)

# %% [markdown]
# The proof holds for **any** pair $(p, q)$. We check that numerically on random distributions, including ones
# where $q$ puts mass where $p$ has none:

# %%
g = torch.Generator().manual_seed(0)
worst = 0.0
for _ in range(1000):
    V = int(torch.randint(2, 12, (1,), generator=g))
    pp = torch.rand(V, generator=g, dtype=torch.float64) ** 3
    qq = torch.rand(V, generator=g, dtype=torch.float64) ** 3
    pp[torch.rand(V, generator=g) < 0.3] = 0
    pp[0] += 1e-3
    pp, qq = pp / pp.sum(), qq / qq.sum()
    worst = max(worst, float((exact_output(pp, qq) - pp).abs().max()))
print(f"max |P(emit) - p| over 1000 random pairs: {worst:.1e}")
assert worst < 1e-12

# %% [markdown]
# ## The same rule in minimtp, sampled
#
# `minimtp.speculative.verify` implements the rule for a batch of sequences, $k$ drafts each, with the
# randomness passed in: uniforms $u$ (acceptance) and one row of $\mathrm{Exp}(1)$ noise (the exponential race
# of tutorial 01, for the emitted token). We run $N$ independent one-draft rounds in one call.

# %%
gens = make_generators(seed=0, n=N)
p32, q32 = p.float(), q.float()
x = sample(q32.expand(N, -1), draw_exponentials(gens, 4))  # drafts x ~ q
out, n_emit = verify(
    p32.expand(N, 2, -1).contiguous(),  # rows: p for the draft position, p for the bonus (unused here)
    x[:, None],
    q32.expand(N, 1, -1).contiguous(),
    torch.ones(N, dtype=torch.long),
    draw_uniforms(gens, 1),
    draw_exponentials(gens, 4),
)
first = out[:, 0]
freq = torch.bincount(first, minlength=4).double() / N
print("empirical first token:", [round(v, 3) for v in freq.tolist()])
print("empirical acceptance :", round(float((n_emit == 2).double().mean()), 3))
se = (0.25 / N) ** 0.5
assert float((freq - p).abs().max()) < 5 * se
assert abs(float((n_emit == 2).double().mean()) - alpha) < 5 * se

# %% [markdown]
# ## Argmax drafts: a different proposal needs a different rule
#
# The Gemma 4 assistant (and transformers' loop) proposes the **argmax** of the drafter, $x = \arg\max q$, not
# a sample. transformers then verifies it with the rule above, as if $x \sim q$. That is wrong: the proposal is
# the point mass $\delta_x$, and the rule for $\delta_x$ gives
#
# $$P(\text{out}=x) = \min\!\big(1, \tfrac{p(x)}{q(x)}\big), \qquad
#   P(\text{out}=y \ne x) = \Big(1 - \min\!\big(1, \tfrac{p(x)}{q(x)}\big)\Big)\,
#   \frac{(p(y)-q(y))^+}{\sum (p-q)^+}.$$
#
# With our $p$ and $q$: $x = 0$, accepted with probability $0.4/0.5 = 0.8$; the residual $(p-q)^+ = [0,0,0.1,0]$
# sends every rejection to token 2. Output $\approx [0.8, 0, 0.2, 0]$ instead of $[0.4, 0.3, 0.2, 0.1]$: token 1
# can never appear and the draft is doubled. Calling transformers' own `_speculative_sampling`
# (`generation/utils.py`) with this $p$, $q$ and the argmax draft gives $\approx [0.80, 0, 0.20, 0]$ empirically
# (docs: concepts/speculative-decoding, "Three rules that look right and are not", rule 1).
#
# The exact rule for a one-hot proposal: accept $x$ with probability $p(x)$; on rejection sample from $p$ with
# $x$ removed, renormalised. Then $P(x) = p(x)$ and $P(y) = (1-p(x))\,p(y)/(1-p(x)) = p(y)$. In minimtp that is
# `verify(..., draft_probs=None, ...)`.

# %%
x = torch.full((N,), int(q.argmax()))


def hf_rule(u, noise):
    """transformers' _speculative_sampling applied to the argmax draft (written out)."""
    accept = u[:, 0] < (p32[x] / q32[x]).double()
    resid = (p32 - q32).clamp_min(0).expand(N, -1)
    return torch.where(accept, x, sample(resid, noise))


u, noise = draw_uniforms(gens, 1), draw_exponentials(gens, 4)
hf = torch.bincount(hf_rule(u, noise), minlength=4).double() / N
ok, _ = verify(p32.expand(N, 2, -1).contiguous(), x[:, None], None, torch.ones(N, dtype=torch.long), u, noise)
exact = torch.bincount(ok[:, 0], minlength=4).double() / N
print("target p                 ", p.tolist())
print("transformers' rule, argmax", [round(v, 3) for v in hf.tolist()])
print("minimtp one-hot rule      ", [round(v, 3) for v in exact.tolist()])
assert float((hf - torch.tensor([0.8, 0.0, 0.2, 0.0], dtype=torch.float64)).abs().max()) < 5 * se
assert float((exact - p).abs().max()) < 5 * se

# %% [markdown]
# The price of the one-hot rule is acceptance: $p(\arg\max q)$ instead of $\sum \min(p, q)$. Here
# $p(0) = 0.4$ against $\alpha = 0.9$ for sampled drafts. minimtp offers both (`Engine(draft_mode="argmax" |
# "sample")`); both are exact.
#
# ## Several drafts
#
# With $k$ drafts, row $j$ of the target is conditioned on the drafts before it. The rule is applied to draft
# 1; if it is accepted, to draft 2 with the next row, and so on; the first rejection emits a residual sample and
# ends the round; if all $k$ are accepted, a **bonus** token is sampled from row $k$. By induction over
# positions the whole output sequence is distributed as plain sampling from the target
# (`tests/test_exact_enumeration.py` checks this by enumerating every path on a toy model).

# %%
print("tutorial 04 OK")
