"""Statistical harness for the REAL engine: sample many continuations, compare with the exact target distribution.

A tiny Gemma 4 target (vocabulary 24, two layers: sliding window 3 + full) and a matching assistant are built
directly with minimtp, with random but seeded weights (norm weights and layer scalars perturbed). The target's
LM head is untied and the assistant's LM head is a copy of it, with the assistant's pre-projection passing the
last token's embedding through, so the drafter is correlated with the target and drafts are often accepted.

`continuation_logits` enumerates every continuation of the prompt up to `depth` tokens with ONE batched full
forward of the target (`target(input_ids)` -> logits, no KV cache); `exact_tables` applies
`minimtp.sampling.process_logits` to every row, giving the exact probability of every prefix: marginals of
later positions sum over the earlier tokens.

`sample_tokens` runs `engine.generate` once on N identical prompts with per-sequence generators (`seed=`) and
`stop_token_ids=[]`, so every row has the same length. `chi2_gof` is Pearson's χ² goodness-of-fit with cells of
expected count < 5 pooled; its p-value is the χ² survival function computed with `torch.special.gammaincc`
(no scipy needed).

`run_and_test` is one whole run of tests/test_distribution.py (SETTINGS, LENGTH, DEPTH): sample, tabulate, test;
`pair()` is the pair built once per process.
"""

from __future__ import annotations

import functools
import itertools
import time
import zlib
from dataclasses import dataclass

import torch

import minimtp
from minimtp.assistant import Gemma4Assistant
from minimtp.config import FULL, SLIDING, AssistantConfig, parse_text_config
from minimtp.model import Gemma4
from minimtp.sampling import SamplingParams, process_logits

V = 24  # vocabulary
H = 32  # hidden size of target and assistant (equal, so the assistant can share the LM head)
PROMPT = [3, 17, 5, 11, 2]


def _text_dict(**over) -> dict:
    d = dict(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        global_head_dim=16,
        layer_types=[SLIDING, FULL],
        sliding_window=3,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=V,
        final_logit_softcapping=30.0,
        tie_word_embeddings=False,
        max_position_embeddings=256,
        eos_token_id=1,
    )
    d.update(over)
    return d


def _perturb(model: torch.nn.Module, g: torch.Generator) -> None:
    """Norm weights ~ 1 ± 0.2 and layer scalars ~ 1 ± 0.1: nothing is left at its neutral init."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
    for name, b in model.named_buffers():
        if name.endswith("layer_scalar"):
            b.copy_(1.0 + 0.1 * torch.randn(b.shape, generator=g))


@torch.no_grad()
def build_pair(
    seed: int = 0, embed_std: float = 0.5, lm_std: float = 0.4, noise: float = 0.1
) -> tuple[Gemma4, Gemma4Assistant]:
    """(target, assistant), float32, eval mode, random but seeded.

    ``embed_std``/``lm_std``: std of the embedding / LM-head entries (the token embedding dominates the residual
    stream, the layers add a context-dependent part; logits are O(1-3)). The assistant is a noisy copy of the
    target: its layers copy the target's (Q-only: they attend to the target's store-layer K/V), its
    pre-projection passes the last token's embedding through, its LM head is the target's; every assistant
    weight then gets Gaussian noise of relative size ``noise``. So it drafts well but not perfectly."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    target = Gemma4(parse_text_config(_text_dict(), "tiny-target")).eval()
    for p in target.parameters():
        p.copy_(0.3 * torch.randn(p.shape, generator=g))
    target.model.embed_tokens.weight.copy_(embed_std * torch.randn(V, H, generator=g))
    target.lm_head.weight.copy_(lm_std * torch.randn(V, H, generator=g))
    _perturb(target, g)

    # The assistant: every layer reads the target's store K/V (num_kv_shared_layers = num_layers).
    text = parse_text_config(_text_dict(num_kv_shared_layers=2), "tiny-assistant")
    acfg = AssistantConfig(text=text, backbone_hidden_size=H)
    minimtp.assistant.check_pair(target.config, acfg)
    assistant = Gemma4Assistant(acfg).eval()
    tparams = dict(target.named_parameters()) | dict(target.named_buffers())
    for name, p in list(assistant.named_parameters()) + list(assistant.named_buffers()):
        if name == "model.embed_tokens.weight":
            src = target.lm_head.weight  # the assistant's (tied) LM head
        elif name == "pre_projection.weight":
            src = torch.cat([torch.eye(H), torch.zeros(H, H)], dim=1)  # x0 = e(last token)
        elif name == "post_projection.weight":
            src = torch.eye(H)
        else:
            src = tparams[name]
        scale = float(src.abs().mean()) if src.numel() > 1 else 1.0
        p.copy_(src + noise * scale * torch.randn(p.shape, generator=g))
    return target, assistant


# ---------------------------------------------------------------------------------------------------------
# The exact distribution.
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def continuation_logits(target: Gemma4, prompt: list[int], depth: int) -> torch.Tensor:
    """[V^(depth-1), depth, V] raw target logits: row c, column d predicts new token d+1 after the prompt and the
    first d tokens of continuation c (continuations of length depth-1 in lexicographic order). ONE full forward
    (``target(input_ids)``, no KV cache) - independent of the sampling settings, so compute it once."""
    n = depth - 1
    conts = torch.tensor(list(itertools.product(range(V), repeat=n)), dtype=torch.long).view(-1, n)
    ids = torch.cat([torch.tensor(prompt).expand(conts.shape[0], -1), conts], dim=1)
    return target(ids)[:, len(prompt) - 1 :]


def exact_tables(logits: torch.Tensor, params: SamplingParams) -> list[torch.Tensor]:
    """[P_1, ..., P_depth] from `continuation_logits`: P_d has shape [V]*d, P_d[t1..td] = P(first d new tokens),
    with every conditional row processed by `minimtp.sampling.process_logits` (float64 products)."""
    rows_n, depth, _ = logits.shape
    cond = process_logits(logits.reshape(-1, V), params).double().view(rows_n, depth, V)
    tables, prob = [], torch.ones(())
    for d in range(depth):
        # rows whose continuation tokens d+1.. are all 0 represent each (t1..td) once, in lexicographic order
        rows = cond[:: V ** (depth - 1 - d), d].reshape([V] * d + [V])
        prob = prob.unsqueeze(-1) * rows
        tables.append(prob)
    return tables


def marginal(tables: list[torch.Tensor], position: int) -> torch.Tensor:
    """[V] P(token at 1-based ``position``), summing over the earlier tokens."""
    t = tables[position - 1]
    return t.reshape(-1, V).sum(0) if position > 1 else t


def joint(tables: list[torch.Tensor], a: int, b: int) -> torch.Tensor:
    """[V, V] P(token a, token b) for 1-based positions a < b."""
    t = tables[b - 1]
    keep = (a - 1, b - 1)
    other = tuple(i for i in range(b) if i not in keep)
    return t.sum(other) if other else t


# ---------------------------------------------------------------------------------------------------------
# Sampling through the engine.
# ---------------------------------------------------------------------------------------------------------


def sample_tokens(
    engine, n: int, params: SamplingParams, *, length: int, k: int, seed: int, chunk: int = 4000, **kw
) -> torch.Tensor:
    """[n, length] int64 tokens from ``engine.generate`` on n copies of PROMPT (chunks of ``chunk``)."""
    out = []
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        res = engine.generate(
            [PROMPT] * m,
            max_new_tokens=length,
            num_speculative_tokens=k,
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=params.min_p,
            seed=seed + start,
            stop_token_ids=[],
            **kw,
        )
        assert all(len(t) == length for t in res.tokens)
        out.append(torch.tensor(res.tokens))
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------------
# χ² goodness of fit.
# ---------------------------------------------------------------------------------------------------------


def chi2_sf(x: float, df: int) -> float:
    """P(χ²_df > x) = Q(df/2, x/2), the regularised upper incomplete gamma function."""
    if df <= 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(x / 2.0)))


@dataclass
class GofResult:
    stat: float
    df: int
    p_value: float
    outside_support: int  # samples in cells of exact probability 0 (must be 0 for a correct sampler)
    cells: int

    def __str__(self) -> str:
        return f"χ²={self.stat:.1f} df={self.df} p={self.p_value:.3g} outside={self.outside_support}"


def chi2_gof(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> GofResult:
    """Pearson χ² of observed ``counts`` against ``probs`` (same shape, flattened).

    Cells with probability exactly 0 are excluded from the statistic but their count is reported (a correct
    sampler never lands there; any hit makes the p-value 0). Cells with expected count < ``min_expected`` are
    pooled, in increasing order of expectation, into one cell; if the pool stays below ``min_expected`` it is
    merged with the smallest remaining cell."""
    counts, probs = counts.flatten().double(), probs.flatten().double()
    n = float(counts.sum())
    support = probs > 0
    outside = int(counts[~support].sum())
    c, e = counts[support], probs[support] / probs[support].sum() * n
    order = torch.argsort(e)
    c, e = c[order], e[order]
    small = int((e < min_expected).sum())
    if small:
        pool_c, pool_e = c[:small].sum(), e[:small].sum()
        c, e = c[small:], e[small:]
        if pool_e < min_expected and len(e):
            c = torch.cat([c[:1] + pool_c, c[1:]])
            e = torch.cat([e[:1] + pool_e, e[1:]])
        else:
            c = torch.cat([pool_c[None], c])
            e = torch.cat([pool_e[None], e])
    stat = float(((c - e) ** 2 / e).sum())
    df = len(e) - 1
    p = 0.0 if outside else chi2_sf(stat, df)
    return GofResult(stat, df, p, outside, len(e))


def counts_of(tokens: torch.Tensor, positions: tuple[int, ...]) -> torch.Tensor:
    """Histogram of the tokens at 1-based ``positions`` of every row: shape [V]*len(positions)."""
    idx = torch.zeros(tokens.shape[0], dtype=torch.long)
    for pos in positions:
        idx = idx * V + tokens[:, pos - 1]
    return torch.bincount(idx, minlength=V ** len(positions)).view([V] * len(positions))


def check_all(tokens: torch.Tensor, tables: list[torch.Tensor], positions=(1, 2, 3, 4), pairs=((2, 3),)) -> dict:
    """{name: GofResult}: the marginal at each of ``positions`` and the joint of each pair in ``pairs``."""
    out = {f"pos{p}": chi2_gof(counts_of(tokens, (p,)), marginal(tables, p)) for p in positions}
    for a, b in pairs:
        out[f"joint{a}{b}"] = chi2_gof(counts_of(tokens, (a, b)), joint(tables, a, b))
    return out


def min_p_value(results: dict) -> float:
    return min(r.p_value for r in results.values())


def fmt(results: dict) -> str:
    return "; ".join(f"{k}: {v}" for k, v in results.items())


# ---------------------------------------------------------------------------------------------------------
# A vectorised stand-in for the reference paged attention (speed only; checked equal to it by the tests).
# ---------------------------------------------------------------------------------------------------------


def batched_paged_attention(q, k_cache, v_cache, block_tables, seq_lens, cu_q_lens, window=0, scale=1.0):
    """Same signature and semantics as `minimtp.attention.paged_attention` (see its docstring), but one
    masked SDPA over all query rows instead of a Python loop over sequences. Gathers every table entry
    (freed sliding entries read block 0; they are masked out because the window never covers them)."""
    T, Hq, D = q.shape
    B, nb = block_tables.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    blocks = block_tables.long()
    k = k_cache[blocks].reshape(B, nb * bs, Hkv, D)
    v = v_cache[blocks].reshape(B, nb * bs, Hkv, D)
    cu, lens = cu_q_lens.long(), seq_lens.long()
    q_lens = cu[1:] - cu[:-1]
    seq = torch.repeat_interleave(torch.arange(B), q_lens)  # [T] sequence of each query row
    qpos = lens[seq] - q_lens[seq] + (torch.arange(T) - cu[seq])  # absolute position of each query
    kpos = torch.arange(nb * bs)
    mask = kpos[None, :] <= qpos[:, None]
    if window > 0:
        mask &= kpos[None, :] > qpos[:, None] - window
    o = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None, :],  # [T, Hq, 1, D]
        k[seq].transpose(1, 2),  # [T, Hkv, S, D]
        v[seq].transpose(1, 2),
        attn_mask=mask[:, None, None, :],
        scale=scale,
        enable_gqa=Hq != Hkv,
    )
    return o[:, :, 0, :]


def make_engine(target, assistant, *, fast: bool = True, **kw):
    """An `Engine` with block size 4 (several blocks per sequence, sliding blocks freed as it goes); ``fast``
    swaps in `batched_paged_attention` (only the attention function; everything else is the real engine)."""
    eng = minimtp.Engine(target, assistant, block_size=4, **kw)
    if fast:
        eng.attention = batched_paged_attention
    return eng


# ---------------------------------------------------------------------------------------------------------
# One χ² run of the engine (tests/test_distribution.py, and its Triton verifier run in a subprocess).
# ---------------------------------------------------------------------------------------------------------

LENGTH = 5  # new tokens per sample: prefill token + one full k = 3 round (tokens 2-4) + the bonus
DEPTH = 4  # tokens whose marginals are tested

SETTINGS = {
    "T1": SamplingParams(temperature=1.0),
    "T0.7": SamplingParams(temperature=0.7),
    "topk5": SamplingParams(temperature=1.0, top_k=5),
    "topp0.8": SamplingParams(temperature=1.0, top_p=0.8),
    "minp0.1": SamplingParams(temperature=1.0, min_p=0.1),
    "T0.8-k8-p0.9-m0.05": SamplingParams(temperature=0.8, top_k=8, top_p=0.9, min_p=0.05),
}


@functools.cache
def pair() -> tuple[Gemma4, Gemma4Assistant]:
    """``build_pair()``, once per process and shared: build engines on it, deepcopy it before rewriting it."""
    return build_pair()


@functools.cache
def _logits():
    return continuation_logits(pair()[0], PROMPT, DEPTH)


@functools.cache
def tables(setting: str):
    """``exact_tables`` of ``pair()``'s target after PROMPT, DEPTH tokens deep, under ``SETTINGS[setting]``."""
    return exact_tables(_logits(), SETTINGS[setting])


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode()) % 1_000_000 * 100_000


def run_and_test(engine, setting, n, *, k=3, mode="argmax", use_assistant=True, seed_key=None):
    """``n`` samples of LENGTH tokens from ``engine`` under ``SETTINGS[setting]``, χ²-tested against ``tables``
    (marginals of tokens 1..DEPTH, joints (1, 2) and (2, 3)): ({name: GofResult}, acceptance rate). The seed comes
    from the configuration, or from ``seed_key``."""
    t0 = time.perf_counter()
    seed = _seed(setting, mode, k, use_assistant) if seed_key is None else _seed(*seed_key)
    stats = []
    orig = engine.generate

    def generate(*a, **kw):  # keep the stats of every chunk
        res = orig(*a, **kw)
        stats.append(res.stats)
        return res

    engine.generate = generate
    try:
        toks = sample_tokens(
            engine, n, SETTINGS[setting], length=LENGTH, k=k, seed=seed, draft_mode=mode, use_assistant=use_assistant
        )
    finally:
        del engine.generate
    res = check_all(toks, tables(setting), positions=tuple(range(1, DEPTH + 1)), pairs=((1, 2), (2, 3)))
    drafted = sum(s.drafted for s in stats)
    acc = sum(s.accepted for s in stats) / drafted if drafted else 0.0
    what = f"{mode} k={k}" if use_assistant else "plain"
    print(f"\n[{setting} {what} N={n}] acceptance={acc:.3f} ({time.perf_counter() - t0:.1f}s) {fmt(res)}")
    return res, acc
