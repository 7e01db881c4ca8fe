# %% [markdown]
# # 08 · The verification kernel: Triton vs PyTorch, bit for bit
#
# `minimtp.speculative.verify` (tutorial 04) is written with whole-tensor PyTorch ops. On a GPU with Gemma's
# vocabulary of 262,144 entries, materialising `p - q`, the ratios and the race scores for every row costs
# memory traffic; `minimtp.kernels.verify` does the same work in two Triton launches that stream the vocabulary.
#
# **Why bit-identical is possible.** The randomness is an *input*: uniforms $u$ for the acceptance tests and one
# row of $\mathrm{Exp}(1)$ noise $E$ for the emitted token. Everything else is deterministic, and the rule was
# written so that no result depends on the order of floating-point operations: the acceptance test is one
# division and one comparison ($u < p(x)/q(x)$, IEEE round-to-nearest), the emitted token is an **argmax** of
# $\text{resid}_i / E_i$ (an argmax, unlike a sum, is the same whatever order the vocabulary tiles are visited
# in, once ties go to the lowest id). So the kernel must return *exactly* the same token ids, not just
# statistically the same ones.
#
# The kernels run here on CPU tensors, under Triton's interpreter. That is an explicit opt-in, set in the first
# cell before torch, triton or minimtp are imported: `@triton.jit` decides interpreted or compiled when it
# decorates a function, and torch may import triton early (tutorial 07 has the details; from a shell it is
# `TRITON_INTERPRET=1 python ...`).

# %%
import os

os.environ["TRITON_INTERPRET"] = "1"  # before torch / triton / minimtp are imported: kernels run on the CPU

# %%
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else "tutorials")
from _tiny import FAST, tiny_assistant, tiny_target

import minimtp
from minimtp.sampling import SamplingParams, draw_exponentials, draw_uniforms, make_generators, process_logits, sample
from minimtp.speculative import verify, verify_greedy

torch.set_num_threads(1)  # tiny tensors: threads only add overhead
warnings.filterwarnings("ignore", category=RuntimeWarning)  # the interpreter evaluates masked-off lanes too (0/0)
try:
    from minimtp.kernels import verify as kernel
except ImportError as e:  # pragma: no cover - the kernel module landed after this tutorial was written
    kernel = None
    print(f"NOTE: minimtp.kernels.verify is not available ({e}); only the PyTorch side runs.")

# %% [markdown]
# ## A random batch
#
# $B$ sequences, up to $K$ drafts each (`num_drafts` may be smaller, even 0), a vocabulary of $V$ tokens. The
# target rows $p$ and the drafter rows $q'$ are processed distributions (temperature, top-k, top-p), the drafts
# are sampled from $q'$, and the randomness comes from one generator per sequence.


# %%
PARAMS = SamplingParams(temperature=0.8, top_k=20, top_p=0.95)


def random_batch(B, K, V, seed, params=PARAMS):
    g = torch.Generator().manual_seed(seed)
    zp = 2 * torch.randn(B, K + 1, V, generator=g)
    zq = zp[:, :K] + torch.randn(B, K, V, generator=g)  # a drafter that roughly agrees with the target
    p = process_logits(zp.view(-1, V), params).view(B, K + 1, V)
    q = process_logits(zq.reshape(-1, V), params).view(B, K, V)
    gens = make_generators(seed, B)
    drafts = sample(q.reshape(B * K, V), draw_exponentials(gens * K, V)).view(B, K)
    num_drafts = torch.randint(0, K + 1, (B,), generator=g)
    return p, drafts, q, num_drafts, draw_uniforms(gens, K), draw_exponentials(gens, V)


B, K, V = (6, 3, 50) if FAST else (16, 4, 300)
p, drafts, q, nd, u, e = random_batch(B, K, V, seed=0)
ref_ids, ref_n = verify(p, drafts, q, nd, u, e)
print("drafts per sequence:", nd.tolist())
print("torch verify, emitted per sequence:", ref_n.tolist())
print(ref_ids)

# %% [markdown]
# ## Kernel vs reference
#
# Both draft modes (sampled drafts with $q'$; argmax drafts with `draft_probs=None`) and greedy verification.
# The kernel tiles the vocabulary (`block_v`) and splits it into chunks processed by different programs
# (`num_chunks`); we force small tiles so that several tiles and chunks are exercised even with a tiny $V$.

# %%
if kernel is not None:
    for mode in ("sample", "argmax"):
        for seed in range(2 if FAST else 6):
            p, drafts, q, nd, u, e = random_batch(B, K, V, seed)
            qq = q if mode == "sample" else None
            want = verify(p, drafts, qq, nd, u, e)
            for block_v, chunks in ((16, 1), (16, 2), (None, None)):
                got = kernel.verify(p, drafts, qq, nd, u, e, block_v=block_v, num_chunks=chunks)
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (mode, seed, block_v)
        print(f"{mode:6s} drafts: kernel == torch on every batch (bit-identical ids)")
    logits = torch.randn(B, K + 1, V, generator=torch.Generator().manual_seed(5))
    drafts = logits[:, :K].argmax(-1)
    drafts[0, 1] = (drafts[0, 1] + 1) % V  # one mismatch
    want = verify_greedy(logits, drafts, nd)
    got = kernel.verify_greedy(logits, drafts, nd, block_v=16, num_chunks=2)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    print("greedy: kernel == torch")

# %% [markdown]
# ## Edge cases a kernel must get right
#
# * $u$ exactly equal to the ratio must **reject** (the test is strict, so $p(x) = 0$ is never accepted even with
#   $u = 0$);
# * a vocabulary that is not a multiple of the tile: the padded tail must never win the race (vLLM once emitted
#   ids $\ge V$ this way);
# * zero drafts: the round is plain sampling from $p_0$.

# %%
for seed in range(100):  # find a batch whose first draft has ratio p(x)/q(x) < 1
    p, drafts, q, nd, u, e = random_batch(2, 2, 37, seed=seed)
    x = int(drafts[0, 0])
    ratio = p[0, 0, x] / q[0, 0, x]  # float32, as verify computes it
    if float(ratio) < 1:
        break
u[0, 0] = float(ratio)  # exactly on the threshold
nd = torch.tensor([2, 0])
want = verify(p, drafts, q, nd, u, e)
print("edge batch (V = 37, u on the threshold, second sequence without drafts):", want[0].tolist())
assert int(want[1][0]) == 1 and int(want[0][0, 0]) != x  # rejected; the residual (p - q)^+ is 0 at x
assert int(want[1][1]) == 1 and 0 <= int(want[0].max()) < 37
if kernel is not None:
    got = kernel.verify(p, drafts, q, nd, u, e, block_v=16)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

# %% [markdown]
# ## In the engine
#
# Because the ids are identical, swapping the verification backend cannot change a seeded run.

# %%
if kernel is not None:
    target = tiny_target(seed=0)
    assistant = tiny_assistant(target, seed=1)
    kw = dict(max_new_tokens=8, temperature=1.0, seed=3, stop_token_ids=[], num_speculative_tokens=3)
    a = minimtp.Engine(target, assistant, verify_backend="torch").generate([[2, 17, 5], [3, 4, 10, 11]], **kw)
    b = minimtp.Engine(target, assistant, verify_backend="triton").generate([[2, 17, 5], [3, 4, 10, 11]], **kw)
    print("torch verify :", a.tokens)
    print("triton verify:", b.tokens)
    assert a.tokens == b.tokens
print("tutorial 08 OK")
