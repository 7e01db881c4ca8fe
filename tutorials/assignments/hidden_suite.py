"""The instructor-only hidden suite of the assignment grader (never shipped to students: the release leaves out every
``hidden*`` file).

It runs the public suite's invariants on NEW cases drawn from a secret the instructor passes
(``grade.py ASSIGNMENT FILE --hidden SECRET`` or ``MINIMTP_GRADER_SECRET``): other vocabulary sizes, K, temperatures
and top-k / top-p; other block sizes, partly full pools and longer operation sequences; Hq:Hkv up to 8:1, head dims
that are not powers of two, softmax scales != 1, sequences much longer than the sliding window; other batches, k and
drafter initialisations for the distillation loss and its gradient, and a larger held-out set for the acceptance.
Each test's seed is a hash of (secret, assignment, test name), so a student cannot tune a file to the public seeds,
and the instructor's grade is still reproducible. Every suite totals 80 points; with a secret the grade is the mean
of the public and the hidden suite.

A correct solution fails one χ² test (α = 1e-4) with probability at most α: the hidden spec_sampling suite runs 12,
so a correct file fails it with probability at most 1.2e-3 for a given secret.
"""

from __future__ import annotations

import torch


def loss_variant(target, drafter, x, k, div="ce", label_shift=0, tok="advance", hidden="drafter", reduce="mean",
                 positions="valid", ctx_shift=0, hidden0=-1, vocab="sum"):  # fmt: skip
    """The distillation loss from its definition (defaults), with switches for the classic mistakes: ``div`` "ce" |
    "fkl" (KL(p||q)) | "rkl" (KL(q||p)) | "hard" (CE with the sampled next token); ``label_shift`` +1 / -1 rows;
    ``tok`` "advance" | "fixed" (every step reads x[p]) | "ahead" (step j reads x[p+j]); ``hidden`` "drafter" |
    "teacher" (later steps read the target's hidden state); ``reduce`` "mean" | "sum" over steps; ``positions``
    "valid" | "all"; ``ctx_shift`` 1 (the context sees position p); ``hidden0`` 0 (step 1 reads the hidden state at
    p); ``vocab`` "mean" (the CE averaged over the vocabulary)."""
    from minimtp.attention import DraftDenseContext

    B, S = x.shape
    with torch.no_grad():
        logits, t_hidden, kv = target.forward_with_kv(x)
        t_prob = torch.softmax(logits, -1)
    V, H = t_prob.shape[-1], t_hidden.shape[-1]
    ar = torch.arange(S)
    pos = ar.repeat(B)
    ctx = DraftDenseContext(drafter.config.text, kv, (pos + ctx_shift).view(B, S))
    t_prev = torch.cat([torch.zeros(B, 1, H), t_hidden[:, :-1]], 1) if hidden0 == -1 else t_hidden
    hid = t_prev.reshape(B * S, H)
    total = 0.0
    for j in range(1, k + 1):
        off = {"advance": j - 1, "fixed": 0, "ahead": j}[tok]
        src = (ar + off).clamp(max=S - 1)
        lab = (ar + j - 1 + label_shift).clamp(0, S - 1)
        valid = (ar >= 1) & (ar + j - 1 <= S - 1) & (ar + j - 1 + label_shift <= S - 1) & (ar + off <= S - 1)
        if div == "hard":
            valid &= ar + j <= S - 1
        if positions == "all":
            valid = torch.ones(S, dtype=torch.bool)
        valid = valid.repeat(B)
        if hidden == "teacher" and j > 1:
            hid = torch.cat([t_prev, t_hidden[:, -1:]], 1)[:, (ar + j - 1).clamp(max=S)].reshape(B * S, H)
        z, hid = drafter.step(target.embed(x[:, src]).reshape(B * S, H), hid, pos, ctx)
        logq = torch.log_softmax(z, -1)
        p = t_prob[:, lab].reshape(B * S, V)
        if div == "ce":
            d = -(p * logq).sum(-1) if vocab == "sum" else -(p * logq).mean(-1)
        elif div == "fkl":
            d = (p * (p.clamp_min(1e-30).log() - logq)).sum(-1)
        elif div == "rkl":
            d = (logq.exp() * (logq - p.clamp_min(1e-30).log())).sum(-1)
        else:  # hard labels: the token that follows, x[p + j]
            d = -logq.gather(-1, x[:, (ar + j).clamp(max=S - 1)].reshape(B * S, 1))[:, 0]
        total = total + d[valid].mean()
    return total / k if reduce == "mean" else total


def register(G) -> None:
    """Add the hidden tests to ``G.HIDDEN`` (G: the grader module)."""
    mistakes = {  # the grader's names of the classic loss mistakes -> loss_variant's switches
        G.DD_REVERSE_KL: dict(div="rkl"),
        G.DD_FORWARD_KL: dict(div="fkl"),
        G.DD_LABEL: dict(label_shift=1),
        G.DD_LABEL_BACK: dict(label_shift=-1),
        G.DD_HARD: dict(div="hard"),
        G.DD_TOKEN: dict(tok="fixed"),
        G.DD_TOKEN_SHIFT: dict(tok="ahead"),
        G.DD_HIDDEN: dict(hidden="teacher"),
        G.DD_SUM: dict(reduce="sum"),
        G.DD_POSITIONS: dict(positions="all"),
        G.DD_CONTEXT: dict(ctx_shift=1),
        G.DD_HIDDEN0: dict(hidden0=0),
        G.DD_VOCAB: dict(vocab="mean"),
    }
    G.distil_drafter.LOSS_VARIANT = lambda target, drafter, x, k, name: loss_variant(
        target, drafter, x, k, **mistakes[name]
    )

    def hidden(assignment, hint, points=0, bug="", gate=False, chi2=0, name=None, library=True):
        return G.test(assignment, hint, points=points, bug=bug, gate=gate, chi2=chi2, name=name, registry=G.HIDDEN,
                      suite="hidden", library=library)  # fmt: skip

    def hint(assignment: str, name: str) -> str:
        return next(t.hint for t in G.TESTS[assignment] if t.name == name)

    def gen(seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed % (2**62))

    def pick(g, options):
        return options[int(torch.randint(0, len(options), (1,), generator=g))]

    def rint(g, lo, hi):  # lo .. hi inclusive
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    def params(g):
        T = pick(g, [0.5, 0.7, 1.0, 1.3])
        kind = pick(g, ["plain", "top_k", "top_p"])
        if kind == "top_k":
            return G.SamplingParams(T, top_k=pick(g, [2, 3, 4]))
        if kind == "top_p":
            return G.SamplingParams(T, top_p=pick(g, [0.8, 0.9]))
        return G.SamplingParams(T)

    # ------------------------------------------------------------------------------------------- spec_sampling
    SP = G.SP

    @hidden(SP, hint(SP, "no_library_shortcut"), bug=G.SP_SHORTCUT, gate=True, name="no_library_shortcut")
    def _(mod, seed):
        G.no_library_shortcut(mod)

    @hidden(SP, "propose(): see the public test of the same name.", points=8, bug=G.SP_PROPOSE, name="propose_api",
            library=False)  # fmt: skip
    def _(mod, seed):
        g = gen(seed)
        G.check_propose(mod, seed % 10_000, rint(g, 5, 13), params(g))

    @hidden(SP, "the drafts must be sampled from the q' you return.", points=8, bug=G.SP_DRAFTS, chi2=2,
            name="drafts_follow_q", library=False)  # fmt: skip
    def _(mod, seed):
        g = gen(seed)
        for _ in range(2):
            V, p = rint(g, 4, 10), params(g)
            _, Zq = G._case(V, 1, rint(g, 0, 10**6), p)
            G.check_drafts_follow_q(mod, f"V={V} {p}", Zq, p, 4000, rint(g, 0, 10**6))

    @hidden(SP, "accept iff u < min(1, p(x)/q(x)) (argmax drafts: u < p(x)), for every noise row.", points=14,
            bug=G.SP_ACCEPT, name="acceptance_exact_in_u")  # fmt: skip
    def _(mod, seed):
        g = gen(seed)
        G.check_acceptance(mod, g, rint(g, 3, 12), 8)

    @hidden(SP, "at the first rejection emit one token from norm((p_j - q_j)^+) (argmax drafts: p_j without x).",
            points=5, bug=G.SP_RESIDUAL, chi2=2, name="residual_after_rejection")  # fmt: skip
    def _(mod, seed):
        g = gen(seed)
        G.check_residual(mod, g, rint(g, 4, 10), 4000, rint(g, 0, 10**6))

    @hidden(SP, "all drafts accepted: the bonus token comes from row num_drafts.", points=5, bug=G.SP_BONUS, chi2=2,
            name="bonus_after_acceptance")  # fmt: skip
    def _(mod, seed):
        g = gen(seed)
        G.check_bonus(mod, g, rint(g, 4, 10), 4000, rint(g, 0, 10**6))

    @hidden(SP, hint(SP, "invariants"), points=6, bug=G.SP_LAYOUT, name="invariants")
    def _(mod, seed):
        G.check_invariants(mod, gen(seed), trials=30, max_v=13)

    @hidden(SP, "a numerically empty residual (p <= q everywhere after a rejection) must fall back to p_j.", points=4,
            bug=G.SP_EMPTY_RESIDUAL, name="empty_residual_falls_back_to_p")  # fmt: skip
    def _(mod, seed):
        G.check_empty_residual(mod, gen(seed), trials=6)

    for i, mode in enumerate(("sample", "argmax", "sample")):

        def dist(mod, seed, mode=mode):
            g = gen(seed)
            V, K, p = rint(g, 4, 8), rint(g, 1, 3), params(g)
            P, Zq = G._case(V, K, rint(g, 0, 10**6), p, agree=pick(g, [0.5, 1.0, 1.5]))
            G.check_distribution(mod, f"V={V} k={K} {p}, {mode}", P, Zq, p, mode, 4000, rint(g, 0, 10**6))

        hidden(SP, G._HINTS[mode], points=10, bug=G.SP_OUTPUT, chi2=2, name=f"distribution: random case {i + 1} "
               f"({mode})")(dist)  # fmt: skip

    # ------------------------------------------------------------------------------------------- kv_rollback
    KV = G.KV

    @hidden(KV, hint(KV, "no_library_cache"), bug=G.KV_SHORTCUT, gate=True, name="no_library_cache")
    def _(mod, seed):
        G.no_library_cache(mod)

    @hidden(
        KV,
        "append: take ceil((length+T)/block_size) - len(table) blocks, write position i at "
        "(table[i // block_size], i % block_size).",
        points=12,
        bug=G.KV_APPEND,
        name="append_and_gather",
    )
    def _(mod, seed):
        g = gen(seed)
        bs, dim = pick(g, [2, 3, 5, 8]), rint(g, 1, 4)
        ops = [(rint(g, 0, 2), rint(g, 0, 2 * bs + 1)) for _ in range(12)]
        need = sum(G._blocks(sum(T for s2, T in ops if s2 == s), bs) for s in range(3))
        G.check_append(mod, g, need + rint(g, 0, 3), bs, dim, ops)

    @hidden(KV, "a failed append (pool too small) raises CacheFullError and changes nothing; an exact fit succeeds.",
            points=12, bug=G.KV_ATOMIC, name="pool_full")  # fmt: skip
    def _(mod, seed):
        g = gen(seed)
        bs = pick(g, [2, 3, 4, 8])
        n0 = rint(g, 1, 4) * bs + rint(g, 1, bs - 1)  # sequence 0 ends inside a block: a partly full pool
        G.check_pool_full(mod, g, bs, rint(g, 1, 3), (n0, rint(g, 1, 3 * bs)), rint(g, 1, 3))

    @hidden(KV, "rollback(seq, n) forgets every position >= n.", points=14, bug=G.KV_STALE,
            name="rollback_then_append")  # fmt: skip
    def _(mod, seed):
        g = gen(seed)
        bs = pick(g, [2, 3, 5, 8])
        total = rint(g, 2 * bs, 5 * bs)
        keeps = sorted({0, total, bs, 2 * bs, rint(g, 1, total), rint(g, 1, total)})
        G.check_rollback(mod, g, bs, rint(g, 1, 3), total, keeps, rint(g, 1, 2 * bs))

    @hidden(KV, "after rollback(seq, n) the table holds exactly ceil(n / block_size) blocks.", points=10,
            bug=G.KV_ROLLBACK_LEAK, name="rollback_frees_blocks")  # fmt: skip
    def _(mod, seed):
        g = gen(seed)
        bs = pick(g, [2, 3, 4, 8])
        # every draw rolls back more than 2 blocks' worth (grow - keep > 2 bs): at least two blocks must be freed in
        # every round, so a rollback that frees nothing, or only one block, fails every draw
        grow = rint(g, 2 * bs + 1, 3 * bs + 1)
        G.check_rollback_frees(mod, g, 12 * bs, bs, grow, rint(g, 0, grow - 2 * bs - 1), 30)

    @hidden(KV, "trim(seq, keep) frees exactly the blocks whose positions are all < length - keep.", points=14,
            bug=G.KV_TRIM_WINDOW, name="trim_window")  # fmt: skip
    def _(mod, seed):
        g = gen(seed)
        bs = pick(g, [2, 3, 4, 8])
        chunks = [rint(g, 1, 3 * bs) for _ in range(5)]
        G.check_trim(mod, g, bs, rint(g, 1, 3), G._blocks(sum(chunks), bs) + 2, chunks, rint(g, 1, 3 * bs))
        # and in every draw the adversarial length: L - keep + 1 a multiple of the block size with the last block
        # partly full, where keeping keep - 1 positions, or counting from the table's capacity, frees a live block
        keep = pick(g, [k for k in range(1, 3 * bs + 1) if k % bs != 1])
        L = rint(g, 1, 3) * bs + keep - 1
        G.check_trim(mod, g, bs, rint(g, 1, 3), G._blocks(L, bs) + 2, [L], keep)

    @hidden(KV, "random operations must read back what a plain list holds and conserve the pool.", points=18,
            bug=G.KV_RANDOM, name="random_operations")  # fmt: skip
    def _(mod, seed):
        g = gen(seed)
        G.check_random(mod, g, rint(g, 30, 60), pick(g, [2, 3, 4, 6]), rint(g, 1, 3), 300, rint(g, 2, 10))

    # ------------------------------------------------------------------------------------------- kernel
    PA = G.PA

    @hidden(PA, hint(PA, "is_a_triton_kernel"), bug=G.PA_DRESSED, gate=True, name="is_a_triton_kernel")
    def _(mod, seed):
        G.check_triton_integrity(mod)

    def kernel(name, points, make, hint):
        def fn(mod, seed):
            g = gen(seed)
            q_lens, seq_lens, Hq, Hkv, D, bs, window, nan = make(g)
            scale = pick(g, [0.125, 0.3, 0.5, 0.7, 1.5])
            G.check_attention(mod, name, q_lens, seq_lens, Hq, Hkv, D, bs, window, scale, nan, seed=rint(g, 0, 10**6))

        hidden(PA, hint, points=points, bug=G.PA_OUTPUT, name="kernel: " + name)(fn)

    heads = [(8, 1), (4, 2), (6, 3), (4, 4), (2, 1), (8, 2)]

    def decode_case(g):
        return ([1, 1, 1], [rint(g, 1, 9), rint(g, 10, 40), rint(g, 1, 70)], *pick(g, heads), pick(g, [8, 16]),
                pick(g, [2, 4, 8]), 0, False)  # fmt: skip

    kernel("decode, random GQA", 12, decode_case, hint(PA, "kernel: decode (q_len 1), GQA 4:2"))

    def verify_case(g):
        ql = rint(g, 2, 5)
        return ([ql, ql], [rint(g, ql, ql + 8), rint(g, ql + 9, ql + 30)], *pick(g, heads), 8, pick(g, [4, 8]), 0,
                False)  # fmt: skip

    kernel("verify, random q_len and scale", 14, verify_case, G._MASK)

    def prefill_case(g):
        p = rint(g, 3, 9)
        return ([p, 1, 2, 1], [p, rint(g, 2, 20), 2, 1], *pick(g, heads), pick(g, [8, 16]), 4, 0, False)

    kernel("prefill + decode + tiny prompts", 14, prefill_case, G._MASK)

    def long_window(g):
        w = rint(g, 3, 9)
        return ([rint(g, 1, 4), 1], [rint(g, 50, 90), rint(g, 20, 40)], *pick(g, heads), 8, pick(g, [4, 8]), w, True)

    kernel("sequence much longer than the window, freed blocks hold NaN", 14, long_window, G._WINDOW)

    def odd_dim(g):
        # head dims above the public suite's (<= 16) and not powers of two, in every draw
        return ([2, 1], [rint(g, 33, 70), rint(g, 17, 40)], 8, 1, pick(g, [20, 24, 40]), 4, 0, False)

    kernel(
        "8:1, head dim 20-40 (not a power of two, above the public suite's), several tiles",
        14,
        odd_dim,
        hint(PA, "kernel: GQA 8:1, head dim 12, scale 0.3, 40 keys (several tiles)"),
    )

    def small_window(g):
        w = rint(g, 2, 6)
        return ([w + 1, 2], [w + 1, rint(g, 10, 30)], *pick(g, heads), 8, pick(g, [2, 16]), w, True)

    kernel("window with a prefill shorter / longer than it, block sizes 2 and 16", 12, small_window, G._WINDOW)

    # ------------------------------------------------------------------------------------------- distil_drafter
    DD = G.DD

    @hidden(DD, hint(DD, "no_library_loss"), bug=G.DD_SHORTCUT, gate=True, name="no_library_loss")
    def _(mod, seed):
        G.no_library_loss(mod)

    def rows(g, n):
        return G._distil_setup()["train"][torch.randperm(48, generator=g)[:n]]

    @hidden(DD, hint(DD, "loss_matches_definition"), points=20, bug=G.DD_LOSS, name="loss_matches_definition")
    def _(mod, seed):
        g = gen(seed)
        # sequences shorter than the public suite's 16 tokens in every draw (a loss that hard-codes S fails)
        x = rows(g, 4)[:, : rint(g, 9, 14)]
        G.check_loss_value(mod, x, (1, 2, 4), rint(g, 10, 10**6))

    @hidden(
        DD,
        hint(DD, "loss_gradient_matches_reference"),
        points=15,
        bug=G.DD_GRAD,
        name="loss_gradient_matches_reference",
    )
    def _(mod, seed):
        g = gen(seed)
        G.check_loss_gradient(mod, rows(g, 4)[:, : rint(g, 9, 14)], rint(g, 2, 3), rint(g, 10, 10**6))

    @hidden(DD, hint(DD, "loss_has_gradients"), points=5, bug=G.DD_DETACHED, name="loss_has_gradients")
    def _(mod, seed):
        G.loss_has_gradients(mod)

    _heldout: dict = {}

    @hidden(DD, hint(DD, "acceptance_after_training"), points=30, bug=G.DD_ACCEPT, name="acceptance_after_training")
    def _(mod, seed):
        st = G._distil_setup()
        g = gen(seed)
        target = st["target"]
        starts = torch.randint(2, target.config.vocab_size, (32, 1), generator=g)
        heldout = _heldout["last"] = G.sample_sequences(target, starts, 15, rint(g, 3, 10**6))
        return G.check_acceptance_after_training(mod, heldout)

    @hidden(DD, hint(DD, "train_as_good_as_the_given_loop"), points=10, bug=G.DD_TRAIN,
            name="train_as_good_as_the_given_loop")  # fmt: skip
    def _(mod, seed):
        heldout = _heldout.get("last", G._distil_setup()["heldout"])  # the acceptance test's, just before
        return G.check_train_vs_given(mod, heldout)
