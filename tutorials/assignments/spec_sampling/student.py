"""Assignment ``spec_sampling``: implement the speculative sampling rule.

Read tutorials/04_speculative_sampling.py first. You write two functions:

* ``propose`` — how a draft token is produced from the drafter's logits, and which q the verifier must use;
* ``verify_one`` — given one sequence's n drafts and the target's n+1 rows, accept a prefix and emit one more
  token, so that the emitted tokens are distributed EXACTLY as sampling from the target one token at a time.

``verify`` at the end of the file is given: it has the batched signature of ``minimtp.speculative.verify``, which
the grader calls, and runs your ``verify_one`` on every sequence of the batch (you need not change it).

Randomness is passed in (never call torch.rand here): ``noise`` rows of Exp(1) draw a token with
``minimtp.sampling.sample(probs, noise)`` (the exponential race), ``u`` are U[0, 1) uniforms for the accept tests.
You may use ``minimtp.sampling`` (``process_logits``, ``sample``); do not import ``minimtp.speculative``.

Grade: ``python tutorials/assignments/grade.py spec_sampling tutorials/assignments/spec_sampling/student.py``
"""

from __future__ import annotations

import torch

from minimtp.sampling import SamplingParams, process_logits, sample  # noqa: F401


def propose(draft_logits: torch.Tensor, params: SamplingParams, mode: str, noise: torch.Tensor):
    """Draft one token per row. ``draft_logits`` [N, V] raw drafter logits, ``noise`` [N, V] Exp(1) noise.

    mode "sample": draw x ~ q' where q' is the drafter distribution processed EXACTLY like the target's
        (temperature, top-k, top-p, min-p: ``process_logits``). Return (x [N] int64, q' [N, V] float32).
    mode "argmax": x = argmax of the raw logits. The proposal is then a point mass at x, so there is no q to
        return: return (x, None).
    """
    # TODO
    raise NotImplementedError("propose")


def verify_one(p: torch.Tensor, drafts: list[int], q: torch.Tensor | None, u: torch.Tensor, noise: torch.Tensor):
    """One sequence with n drafts. ``p`` [n+1, V]: target row j is conditioned on drafts 1..j (row n follows the
    last draft); ``drafts``: n token ids; ``q`` [n, V] the q' each draft was sampled from, or None for argmax
    drafts; ``u`` [n] float64 uniforms; ``noise`` [V] Exp(1). Returns the list of emitted tokens.

    For j = 0, 1, ...: accept drafts[j] with probability min(1, p_j(x)/q_j(x)) (argmax drafts: p_j(x)), using u[j]
    (accept iff u[j] < ratio). At the first rejection emit ONE token from the residual distribution and stop:
    norm(max(p_j - q_j, 0)) for sampled drafts, p_j with x removed for argmax drafts (if the residual is all
    zeros, use p_j). If every draft is accepted emit a bonus token from p_n. A draft id outside [0, V) is rejected.
    Draw the one emitted token with ``sample(dist[None], noise[None])`` (it need not be normalised).
    """
    # TODO
    raise NotImplementedError("verify_one")


def verify(target_probs, draft_ids, draft_probs, num_drafts, uniforms, noise):
    """The batched signature of ``minimtp.speculative.verify`` (given: it calls your ``verify_one``).

    target_probs [B, K+1, V] float32; draft_ids [B, K] int64; draft_probs [B, K, V] float32 or None (argmax
    drafts); num_drafts [B] (sequence b uses its first num_drafts[b] drafts); uniforms [B, K] float64; noise [B, V].
    Returns out_ids [B, K+1] int64 (emitted tokens, then -1) and num_emitted [B] int64.
    """
    B, K1, V = target_probs.shape
    out = torch.full((B, K1), -1, dtype=torch.int64)
    emitted = torch.zeros(B, dtype=torch.int64)
    for b in range(B):
        n = max(0, min(int(num_drafts[b]), K1 - 1))
        q = None if draft_probs is None else draft_probs[b, :n]
        toks = verify_one(target_probs[b, : n + 1], draft_ids[b, :n].tolist(), q, uniforms[b, :n], noise[b])
        out[b, : len(toks)] = torch.tensor(toks, dtype=torch.int64)
        emitted[b] = len(toks)
    return out, emitted
