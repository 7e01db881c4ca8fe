# %% [markdown]
# # 05 · Acceptance, draft length and speedup
#
# One speculative **round** costs $k$ drafter steps and one target forward over $k+1$ tokens, and emits between
# $1$ and $k+1$ tokens. Whether that beats plain decoding (one target forward per token) depends on two numbers:
#
# * the **acceptance rate** $\alpha$: the probability that a draft is accepted. For sampled drafts
#   $\alpha = \mathbb{E}\big[\sum_x \min(p(x), q(x))\big]$ (tutorial 04); for argmax drafts $\mathbb{E}[p(\arg\max q)]$;
# * the **cost ratio** $c = t_{draft} / t_{target}$ of one drafter step to one target forward.

# %%
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else "tutorials")
from _tiny import FAST, tiny_assistant, tiny_target

import minimtp
from minimtp.bench.speedup import predicted_speedup

torch.set_num_threads(1)  # tiny tensors: threads only add overhead
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else "tutorials", "_out")
os.makedirs(OUT, exist_ok=True)

# %% [markdown]
# ## Expected tokens per round
#
# Model each draft as accepted independently with probability $\alpha$ (the i.i.d. assumption of Leviathan et
# al.). The round stops at the first rejection, so the number $n$ of accepted drafts satisfies
# $P(n \ge j) = \alpha^j$ for $j \le k$, and the round emits $n + 1$ tokens (the accepted drafts plus the
# correction or bonus):
#
# $$\mathbb{E}[n+1] = \sum_{j=0}^{k} P(n \ge j) = \sum_{j=0}^{k} \alpha^j = \frac{1-\alpha^{k+1}}{1-\alpha}.$$
#
# It grows with $k$ but saturates at $1/(1-\alpha)$: with $\alpha = 0.8$ no $k$ gives more than 5 tokens per
# round. A quick simulation agrees:


# %%
def expected_tokens(alpha, k):
    return (k + 1) if alpha == 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


g = torch.Generator().manual_seed(0)
R = 20000 if FAST else 200000
for alpha in (0.5, 0.8):
    for k in (1, 3, 7):
        acc = torch.rand(R, k, generator=g) < alpha
        n = acc.int().cumprod(1).sum(1)  # leading accepts
        sim = float((n + 1).double().mean())
        print(f"alpha {alpha}, k {k}: formula {expected_tokens(alpha, k):.3f}   simulated {sim:.3f}")
        assert abs(sim - expected_tokens(alpha, k)) < 0.03

# %% [markdown]
# ## Speedup
#
# A round costs $k c + 1$ target-forward units (assuming the verify forward over $k+1$ tokens costs as much as
# a one-token forward, true while decoding is memory-bound). Plain decoding emits 1 token per unit, so
#
# $$\text{speedup}(\alpha, k, c) = \frac{1-\alpha^{k+1}}{(1-\alpha)(k c + 1)}.$$
#
# It exceeds 1 for some $k$ iff $\alpha > c$ (take $k = 1$: $(1+\alpha)/(1+c)$).
# `minimtp.bench.speedup.predicted_speedup` implements it; the best $k$ grows with $\alpha$ and shrinks with $c$.


# %%
def speedup(alpha, k, c):
    return expected_tokens(alpha, k) / (k * c + 1)


assert abs(speedup(0.8, 4, 0.05) - predicted_speedup(0.8, 4, 0.05)) < 1e-12
ks = list(range(1, 13))
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
for alpha in (0.5, 0.7, 0.8, 0.9):
    ax1.plot(ks, [expected_tokens(alpha, k) for k in ks], marker="o", label=f"α = {alpha}")
    ax2.plot(ks, [speedup(alpha, k, 0.05) for k in ks], marker="o", label=f"α = {alpha}")
    best = max(ks, key=lambda k: speedup(alpha, k, 0.05))
    print(f"alpha {alpha}: best k = {best:2d}, speedup {speedup(alpha, best, 0.05):.2f}x (c = 0.05)")
ax1.set(xlabel="draft length k", ylabel="tokens per round", title="(1-α^(k+1)) / (1-α)")
ax2.set(xlabel="draft length k", ylabel="speedup", title="speedup at c = 0.05")
ax2.axhline(1, color="gray", lw=0.8)
for ax in (ax1, ax2):
    ax.legend()
    ax.grid(alpha=0.3)
fig.tight_layout()
path = os.path.join(OUT, "05_speedup.png")
fig.savefig(path, dpi=80)
print("saved", path)
assert speedup(0.3, 1, 0.5) < 1 < speedup(0.6, 1, 0.5)  # pays iff alpha > c

# %% [markdown]
# ## Measured on a real (tiny) pair
#
# The engine counts drafted and accepted tokens (`Stats`). Two conventions (those of vLLM) are easy to mix up:
#
# * `acceptance_rate` = accepted / drafted $= \mathbb{E}[n]/k$, **not** the $\alpha$ of the formula: under the
#   i.i.d. model $\mathbb{E}[n] = \alpha + \alpha^2 + \dots + \alpha^k$;
# * `per_position_acceptance[j]` = $P(n > j)$, the fraction of rounds whose draft $j+1$ was accepted. The i.i.d.
#   model predicts $\alpha^{j+1}$.
#
# Real acceptance is **not** i.i.d.: it depends on the context, and an accepted draft makes the next one more
# likely (easy stretches of text are easy for several tokens). The comparison below shows it.

# %%
target = tiny_target(seed=0)
assistant = tiny_assistant(target, seed=1)
engine = minimtp.Engine(target, assistant, draft_mode="sample")
prompts = [[2, 17, 5, 33, 8], [3, 4, 10, 11, 12], [7, 7, 9], [20, 21, 22, 23]]
k = 3
res = engine.generate(
    prompts, max_new_tokens=16 if FAST else 64, num_speculative_tokens=k, temperature=1.0, seed=0, stop_token_ids=[]
)
s = res.stats
pos = s.per_position_acceptance
a1 = pos[0]  # alpha estimated from the first draft position
print(f"accepted/drafted = {s.acceptance_rate:.3f}; tokens per round {s.mean_acceptance_length:.3f}")
print("P(n > j) measured:", [round(v, 3) for v in pos])
print("i.i.d. prediction:", [round(a1 ** (j + 1), 3) for j in range(k)], f"(alpha = {a1:.3f} from position 1)")
assert 1.0 <= s.mean_acceptance_length <= k + 1
assert s.accepted == sum(s.accepted_per_position) and s.drafted == sum(s.drafted_per_position)
assert all(x >= y for x, y in zip(pos, pos[1:]))  # P(n > j) can only decrease with j
print("tutorial 05 OK")
