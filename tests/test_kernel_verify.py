"""The Triton verification kernels give exactly the token ids and counts of minimtp/speculative.py.

The randomness (uniforms and the exponential noise row) is passed in, so equality is exact, not statistical:
greedy (argmax drafts accepted while they equal the target argmax), "sample" (drafts from q, residual
(p - q)^+) and "argmax" (one-hot q, residual p with the draft zeroed). Vocabulary sizes that are not a multiple
of the tile, several vocabulary chunks, Gemma's V = 262144, num_drafts 0 and mixed, out-of-range draft ids.
Runs under the Triton interpreter on CPU (conftest.py opts in); with the interpreter off (a CUDA machine) the
kernels get CUDA copies of the inputs and the results come back to the CPU.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from support.verify_cases import verify_cases

from minimtp import speculative as ref
from minimtp.kernels import verify as kv
from minimtp.kernels.runtime import is_interpreted
from minimtp.sampling import draw_exponentials, draw_uniforms, make_generators

pytestmark = [
    pytest.mark.interp,
    # p / q with q = 0 (accept: ratio +inf) and 0 / 0 (reject: NaN) are intended; numpy warns under the interpreter
    pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning"),
]


DEVICE = "cpu" if is_interpreted(kv._race_kernel) else "cuda"


def _on(device, xs):
    return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in xs)


def kernel_verify(*args, **kw):
    """``kv.verify`` on the kernels' device (CPU under the interpreter), results on the CPU."""
    return _on("cpu", kv.verify(*_on(DEVICE, args), **kw))


def kernel_verify_greedy(*args, **kw):
    return _on("cpu", kv.verify_greedy(*_on(DEVICE, args), **kw))


def assert_same(got, want):
    assert got[0].dtype == torch.int64 and got[1].dtype == torch.int64
    assert torch.equal(got[0], want[0]), f"ids\n{got[0]}\n!=\n{want[0]}"
    assert torch.equal(got[1], want[1]), f"num_emitted {got[1]} != {want[1]}"


def make_case(B, K, V, mode, seed, num_drafts=None, sharp=3.0):
    """(target_probs, draft_ids, draft_probs | None, num_drafts, uniforms, noise) like the engine builds them."""
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(sharp * torch.randn(B, K + 1, V, generator=g), -1)
    q = torch.softmax(sharp * torch.randn(B, K, V, generator=g), -1)
    if mode == "argmax":  # drafts are some other model's argmax; correlated with p so that some get accepted
        drafts = torch.where(torch.rand(B, K, generator=g) < 0.5, p[:, :K].argmax(-1), q.argmax(-1))
        q = None
    elif K:
        drafts = torch.multinomial(q.reshape(-1, V), 1, generator=g).view(B, K)
    else:
        drafts = torch.zeros(B, 0, dtype=torch.int64)
    if num_drafts is None:
        num_drafts = torch.randint(0, K + 1, (B,), generator=g)
    gens = make_generators(seed, B)
    return p, drafts, q, torch.as_tensor(num_drafts), draw_uniforms(gens, K), draw_exponentials(gens, V)


# ---- stochastic verification ---------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=verify_cases())
def test_verify_matches_reference_property(case):
    """The property-test cases of test_speculative.py: extreme / equal / one-hot / -inf distributions, u exactly
    on the acceptance threshold, out-of-range draft ids, K = 0."""
    assert_same(kernel_verify(*case), ref.verify(*case))


@pytest.mark.parametrize("mode", ["sample", "argmax"])
@pytest.mark.parametrize(
    "B,K,V,block_v,num_chunks",
    [
        (3, 4, 37, 16, None),  # V not a multiple of the tile, 3 tiles
        (4, 3, 1000, 256, 2),  # 4 tiles in 2 chunks, partial last tile
        (2, 5, 5000, 512, 3),  # 10 tiles in 3 uneven chunks
        (3, 2, 4096, None, None),  # exactly one tile
        (2, 0, 100, None, None),  # no drafts: the bonus token only
        (1, 8, 777, 64, 5),
    ],
)
def test_verify_matches_reference(mode, B, K, V, block_v, num_chunks):
    for seed in range(3):
        case = make_case(B, K, V, mode, seed)
        assert_same(kernel_verify(*case, block_v=block_v, num_chunks=num_chunks), ref.verify(*case))


@pytest.mark.parametrize("mode", ["sample", "argmax"])
def test_verify_all_accepted_and_all_rejected(mode):
    p, d, q, _, u, e = make_case(3, 4, 300, mode, 7)
    nd = torch.tensor([4, 2, 0])
    zeros, ones = torch.zeros_like(u), torch.full_like(u, 1 - 2**-53)
    for uu in (zeros, ones):  # u = 0 accepts every draft with p(x) > 0; u ~ 1 rejects (almost) all
        assert_same(kernel_verify(p, d, q, nd, uu, e, block_v=64), ref.verify(p, d, q, nd, uu, e))
    assert int(kernel_verify(p, d, q, nd, ones, e)[1][2]) == 1


def test_verify_empty_residual_and_zero_probabilities():
    """q == p: the residual is (numerically) empty after a rounding-level rejection -> sample from p; tokens
    with p = 0 never win the race, even in the padded tail."""
    V = 50
    p = torch.zeros(2, 2, V)
    p[..., 3], p[..., 40] = 0.25, 0.75
    q = p[:, :1].clone()
    d = torch.tensor([[40], [3]])
    u = torch.tensor([[0.9999], [0.2]], dtype=torch.float64)
    e = draw_exponentials(make_generators(0, 2), V)
    for block_v in (16, 64):
        got = kernel_verify(p, d, q, torch.tensor([1, 1]), u, e, block_v=block_v)
        assert_same(got, ref.verify(p, d, q, torch.tensor([1, 1]), u, e))
        assert set(got[0][got[0] >= 0].tolist()) <= {3, 40}


def test_verify_out_of_range_drafts_rejected():
    p, d, q, nd, u, e = make_case(3, 3, 64, "argmax", 3, num_drafts=[3, 3, 3])
    d[0, 0], d[1, 1], d[2, 2] = -1, 64, 10**6
    u.zero_()
    got = kernel_verify(p, d, None, nd, u, e, block_v=16)
    assert_same(got, ref.verify(p, d, None, nd, u, e))
    assert got[1].tolist() == [1, 2, 3] and bool((got[0] < 64).all())


# ---- greedy ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("B,K,V,block_v,num_chunks", [(3, 4, 37, 16, None), (4, 3, 1000, 128, 3), (2, 0, 99, None, 1)])
def test_verify_greedy_matches_reference(dtype, B, K, V, block_v, num_chunks):
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        logits = (3 * torch.randn(B, K + 1, V, generator=g)).to(dtype)
        top = logits[:, :K].float().argmax(-1)
        drafts = torch.where(torch.rand(B, K, generator=g) < 0.7, top, torch.randint(0, V, (B, K), generator=g))
        nd = torch.randint(0, K + 1, (B,), generator=g)
        got = kernel_verify_greedy(logits, drafts, nd, block_v=block_v, num_chunks=num_chunks)
        assert_same(got, ref.verify_greedy(logits, drafts, nd))


def test_verify_greedy_ties_take_lowest_id_across_tiles_and_chunks():
    V = 300
    logits = torch.zeros(1, 3, V)
    logits[0, 0, [70, 150, 290]] = 5.0  # tie across tiles (block 64) and chunks
    logits[0, 1, [200, 201]] = 5.0  # tie inside one tile
    logits[0, 2] = float("-inf")  # all -inf: argmax 0, as torch
    for drafts in ([[70, 200]], [[150, 200]], [[70, 201]]):
        d = torch.tensor(drafts)
        for chunks in (1, 2, 5):
            got = kernel_verify_greedy(logits, d, torch.tensor([2]), block_v=64, num_chunks=chunks)
            assert_same(got, ref.verify_greedy(logits, d, torch.tensor([2])))


# ---- Gemma's vocabulary --------------------------------------------------------------------------------------


def test_gemma_vocabulary_size():
    V = 262144
    case = make_case(2, 3, V, "sample", 11, num_drafts=[3, 1], sharp=8.0)
    assert_same(kernel_verify(*case), ref.verify(*case))
    p, d, _, nd, u, e = make_case(2, 3, V, "argmax", 12, num_drafts=[3, 2], sharp=8.0)
    assert_same(kernel_verify(p, d, None, nd, u, e), ref.verify(p, d, None, nd, u, e))
    logits = torch.log(p).to(torch.bfloat16)
    assert_same(kernel_verify_greedy(logits, d, nd), ref.verify_greedy(logits, d, nd))


# ---- wrappers -------------------------------------------------------------------------------------------------


def test_vocab_split():
    for interpret in (True, False):
        assert kv._vocab_split(262144, None, None, interpret)[0] == 8192
        block_v, chunk, n = kv._vocab_split(1000, 256, 3, interpret)
        assert (block_v, chunk, n) == (256, 512, 2)  # 4 tiles in chunks of 2 tiles
        assert kv._vocab_split(37, None, None, interpret) == (64, 64, 1)
    assert kv._vocab_split(262144, None, None, True)[2] == 1  # interpreter: one chunk per row
    assert kv._vocab_split(262144, None, None, False)[2] == 8  # GPU: 8 chunks of 4 tiles


def test_rejects_bad_dtypes():
    p, d, q, nd, u, e = make_case(2, 2, 40, "sample", 0)
    with pytest.raises(ValueError, match="dtypes"):
        kernel_verify(p, d, q, nd, u.float(), e)
    with pytest.raises(ValueError, match="draft_probs"):
        kernel_verify(p, d, q.double(), nd, u, e)


def test_engine_backend_switch():
    from minimtp.engine import _verify_backends

    assert _verify_backends("triton") == (kv.verify, kv.verify_greedy)
