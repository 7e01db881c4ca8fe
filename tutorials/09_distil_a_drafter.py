# %% [markdown]
# # 09 · Distilling a drafter
#
# A drafter is only useful if its distribution $q$ is close to the target's $p$: the acceptance rate of sampled
# drafts is $\alpha = \sum_x \min(p(x), q(x)) = 1 - \mathrm{TV}(p, q)$ (tutorial 04). So we train it to imitate
# the **frozen target**: *distillation*. For every position of a batch of token sequences we know the target's
# exact next-token distribution, which is a far richer label than the one token that happens to follow.
#
# The loss at one position is the cross-entropy with the target's probabilities,
#
# $$\mathcal{L} = -\sum_x p(x)\log q(x) = \mathrm{KL}(p\,\|\,q) + H(p),$$
#
# minimised exactly when $q = p$. The assistant drafts **several** tokens per round, each step reading its own
# previous hidden state, so we train the unrolled recurrence: step $j$ at position $p$ reads the token at
# $p+j-1$ (teacher forcing: the true token, not its own draft) and must predict the target's distribution for
# position $p+j$. The same recipe, at scale, is `python -m minimtp.train assistant`.

# %%
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else "tutorials")
from _tiny import FAST, tiny_assistant, tiny_target

import minimtp
from minimtp.attention import DraftDenseContext

torch.manual_seed(0)
torch.set_num_threads(1)  # tiny tensors: threads only add overhead
target = tiny_target(seed=0, mix=0.5).requires_grad_(False)
drafter = tiny_assistant(target, seed=3, correlate=False)  # random weights: it knows nothing yet
V = target.config.vocab_size
print(f"target: {sum(p.numel() for p in target.parameters()):,} parameters (frozen); "
      f"drafter: {sum(p.numel() for p in drafter.parameters()):,}")  # fmt: skip

# %% [markdown]
# ## The distillation loss
#
# One dense target forward gives, for a batch `x [B, S]`, the target's logits, its final hidden states and the
# K/V of its store layers. The drafter then runs at **every position at once**: a query at position $p$ sees the
# target's K/V at positions $< p$ (`DraftDenseContext`), exactly what it sees when drafting at $p$.


# %%
@torch.no_grad()
def teacher(x):
    """The frozen target's view of a batch, computed once: label distributions, hidden states, store-layer K/V."""
    t_logits, t_hidden, kv = target.forward_with_kv(x)
    return torch.softmax(t_logits, -1), t_hidden, kv  # row i of the probs predicts token i+1


def distill_loss(x, teach, k=2):
    """Mean over draft steps j = 1..k and positions p >= 1 of CE(target's row p+j-1, drafter's step j at p)."""
    B, S = x.shape
    t_prob, t_hidden, kv = teach
    pos = torch.arange(S).repeat(B)
    ctx = DraftDenseContext(drafter.config.text, kv, pos.view(B, S))
    H = t_hidden.shape[-1]
    # step 1 at position p reads the target's hidden state at p-1 (zeros at p = 0, which is masked out)
    hid = torch.cat([torch.zeros(B, 1, H), t_hidden[:, :-1]], 1).reshape(B * S, H)
    total = 0.0
    for j in range(1, k + 1):
        src = (torch.arange(S) + j - 1).clamp(max=S - 1)  # the token step j reads, and its label row
        valid = ((torch.arange(S) >= 1) & (torch.arange(S) + j - 1 < S)).repeat(B)
        logits, hid = drafter.step(target.embed(x[:, src]).reshape(B * S, H), hid, pos, ctx)
        ce = -(t_prob[:, src].reshape(B * S, V) * torch.log_softmax(logits, -1)).sum(-1)
        total = total + ce[valid].mean()
    return total / k


# %% [markdown]
# ## Measuring acceptance exactly
#
# We do not need to sample to know the acceptance rate: for held-out sequences, compute the target's $p$ and the
# drafter's first-step $q$ at every position and average $\sum_x \min(p, q)$ (sampled drafts, temperature 1) and
# $p(\arg\max q)$ (argmax drafts).


# %%
@torch.no_grad()
def acceptance(x, teach):
    B, S = x.shape
    t_prob, t_hidden, kv = teach
    pos = torch.arange(S).repeat(B)
    ctx = DraftDenseContext(drafter.config.text, kv, pos.view(B, S))
    H = t_hidden.shape[-1]
    hid = torch.cat([torch.zeros(B, 1, H), t_hidden[:, :-1]], 1).reshape(B * S, H)
    logits, _ = drafter.step(target.embed(x).reshape(B * S, H), hid, pos, ctx)
    keep = pos >= 1  # position 0 has no K/V to read and never drafts
    p, q = t_prob.reshape(B * S, V)[keep], torch.softmax(logits, -1)[keep]
    alpha_sample = torch.minimum(p, q).sum(-1).mean()
    alpha_argmax = p.gather(-1, q.argmax(-1, keepdim=True)).mean()
    return float(alpha_sample), float(alpha_argmax)


def batch(n, S, g):
    """Training text: sequences sampled from the target itself (temperature 1), so the drafter learns on the
    contexts it will see at inference."""
    starts = [[int(t)] for t in torch.randint(2, V, (n,), generator=g)]
    seed = int(torch.randint(0, 2**31, (1,), generator=g))
    res = engine.generate(starts, max_new_tokens=S - 1, temperature=1.0, seed=seed, stop_token_ids=[])
    return torch.tensor([s + t for s, t in zip(starts, res.tokens)])


engine = minimtp.Engine(target)
g = torch.Generator().manual_seed(0)
S = 16
heldout = batch(16, S, g)
heldout_teach = teacher(heldout)
before = acceptance(heldout, heldout_teach)
print(f"before training: alpha (sampled drafts) {before[0]:.3f}, alpha (argmax drafts) {before[1]:.3f}")

# %% [markdown]
# ## Training
#
# Adam, a few hundred steps on a small pool of target samples. The loss falls towards the target's entropy (the
# floor: $\mathrm{KL} = 0$), and the acceptance rate rises.

# %%
steps = 80 if FAST else 400
pool = batch(48 if FAST else 256, S, g)
pool_teach = teacher(pool)


def rows(teach, idx):
    t_prob, t_hidden, kv = teach
    return t_prob[idx], t_hidden[idx], {t: (k[idx], v[idx]) for t, (k, v) in kv.items()}


opt = torch.optim.Adam(drafter.parameters(), lr=3e-3)
drafter.train()
history = []
for step in range(steps + 1):
    idx = torch.randint(0, pool.shape[0], (16,), generator=g)
    loss = distill_loss(pool[idx], rows(pool_teach, idx))
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % (steps // 4) == 0:
        drafter.eval()
        a = acceptance(heldout, heldout_teach)
        drafter.train()
        history.append(a)
        print(f"step {step:4d}  loss {loss.item():.3f}  alpha sampled {a[0]:.3f}  argmax {a[1]:.3f}")
drafter.eval()

# %% [markdown]
# ## In the engine
#
# The trained drafter drafts for real; its measured acceptance follows the exact estimate.

# %%
after = acceptance(heldout, heldout_teach)
eng = minimtp.Engine(target, drafter, draft_mode="sample")
res = eng.generate([[5, 9, 2], [17, 3]], max_new_tokens=24, num_speculative_tokens=3, temperature=1.0, seed=0,
                   stop_token_ids=[])  # fmt: skip
print(f"after training: alpha (sampled) {after[0]:.3f}, was {before[0]:.3f}")
st = res.stats
print(
    f"engine: first-draft acceptance {st.per_position_acceptance[0]:.2f}, tokens/round {st.mean_acceptance_length:.2f}"
)
assert after[0] > before[0] + 0.15, (before, after)
print("tutorial 09 OK")
