"""Random inputs of ``minimtp.speculative.verify`` (hypothesis): logits of several styles (normal, extreme, all equal,
one-hot, partly -inf) processed with random sampling settings, drafts sampled from q or arbitrary (occasionally out of
range), uniforms sometimes exactly on the acceptance threshold. Shared by the reference tests
(tests/test_speculative.py) and the Triton kernel tests (tests/test_kernel_verify.py)."""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

from minimtp.sampling import SamplingParams, draw_exponentials, draw_uniforms, make_generators, process_logits, sample
from minimtp.speculative import acceptance_ratio

PARAMS = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.3, 0.7, 1.0, 1.7]) | st.floats(0.05, 5.0),
    top_k=st.none() | st.integers(0, 10),
    top_p=st.none() | st.floats(0.05, 1.0),
    min_p=st.none() | st.floats(0.0, 1.0),
)
STYLES = ["normal", "extreme", "equal", "onehot", "neginf"]


def make_logits(g: torch.Generator, shape, style: str, dtype=torch.float32) -> torch.Tensor:
    """Random logits of a given style; every row keeps at least one finite logit."""
    V = shape[-1]
    if style == "normal":
        x = 3 * torch.randn(shape, generator=g, dtype=torch.float64)
    elif style == "extreme":
        x = 1e4 * (2 * torch.randint(0, 2, shape, generator=g) - 1).double()
    elif style == "equal":
        x = torch.zeros(shape, dtype=torch.float64)
    elif style == "onehot":
        x = torch.full(shape, -1e4, dtype=torch.float64)
        x.scatter_(-1, torch.randint(0, V, shape[:-1] + (1,), generator=g), 1e4)
    else:  # some -inf, never a whole row
        x = 2 * torch.randn(shape, generator=g, dtype=torch.float64)
        ban = torch.rand(shape, generator=g) < 0.4
        ban[..., 0] = False
        x = x.masked_fill(ban, -math.inf)
    return x.to(dtype)


@st.composite
def verify_cases(draw, dtype=torch.float32):
    """A random verify call: (target_probs, draft_ids, draft_probs | None, num_drafts, uniforms, noise)."""
    B, K, V = draw(st.integers(1, 3)), draw(st.integers(0, 4)), draw(st.integers(2, 9))
    mode = draw(st.sampled_from(["sample", "argmax"]))
    style_p, style_q = draw(st.sampled_from(STYLES)), draw(st.sampled_from(STYLES))
    params_p, params_q = draw(PARAMS), draw(PARAMS)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    p = process_logits(make_logits(g, (B * (K + 1), V), style_p, dtype), params_p).view(B, K + 1, V)
    q = process_logits(make_logits(g, (B * max(K, 1), V), style_q, dtype), params_q).view(B, max(K, 1), V)[:, :K]
    gens = make_generators(int(torch.randint(0, 2**31, (1,), generator=g)), B)
    if mode == "sample":  # x_j ~ q'_j, so q'(x) > 0
        draft_ids = sample(q.reshape(B * K, V), draw_exponentials(gens * K, V)).view(B, K) if K else q.new_zeros(B, 0)
        draft_ids = draft_ids.long()
    else:  # any ids (argmax of some other model), occasionally out of range
        draft_ids = torch.randint(0, V, (B, K), generator=g)
        if K and draw(st.booleans()):
            draft_ids[0, 0] = draw(st.sampled_from([-1, V, V + 7]))
    num_drafts = torch.tensor([draw(st.integers(0, K)) for _ in range(B)], dtype=torch.int64)
    uniforms = draw_uniforms(gens, K)
    if K and draw(st.booleans()):  # put u exactly on a threshold: the strict < must reject
        x0 = draft_ids[0, 0].clamp(0, V - 1)
        ratio = acceptance_ratio(p[0, 0, x0], None if mode == "argmax" else q[0, 0, x0])
        if 0 <= float(ratio) < 1:
            uniforms[0, 0] = float(ratio)
    noise = draw_exponentials(gens, V)
    return p, draft_ids, (q if mode == "sample" else None), num_drafts, uniforms, noise
