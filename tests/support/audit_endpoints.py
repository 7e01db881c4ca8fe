"""In-process endpoints for the sampling audit (minimtp.audit.endpoint.Endpoint) that sample with known rules.

``RuleEndpoint`` runs speculative decoding of one sequence per seed on minimtp's own target and assistant, written
out densely (no cache: the target's full forward each round, the drafter over its K/V through DraftDenseContext), with
one of three verification rules:

* ``"exact"``: argmax drafts verified with the one-hot rule (accept x with p(x), on rejection sample p with x
  removed) - minimtp's rule, so the audit must pass it;
* ``"argmax-as-sampled"``: transformers' rule (``_speculative_sampling``; docs: concepts/speculative-decoding,
  "Three rules that look right and are not"): argmax drafts, but accepted with min(1, p(x)/q(x)) and corrected
  from (p - q)^+ as if x had been sampled from the raw drafter softmax q - biased;
* ``"lagging-penalty"``: the exact rule, but the penalties of verification row j see only the tokens emitted before
  the round, not the drafts d_1 .. d_j the row follows (the penalty state updated once per round) - biased.

``TransformersEndpoint`` is transformers' own ``generate(assistant_model=...)`` with ``do_sample=True``, seeded
with ``torch.manual_seed`` per request. Both return token ids.
"""

from __future__ import annotations

import torch

from minimtp.attention import DraftDenseContext
from minimtp.controls.penalties import Penalties, apply_penalties
from minimtp.sampling import SamplingParams, process_logits

RULES = ("exact", "argmax-as-sampled", "lagging-penalty")


def _draw(probs: torch.Tensor, g: torch.Generator) -> int:
    """One token from an unnormalised distribution."""
    return int(torch.multinomial(probs / probs.sum(), 1, generator=g))


class RuleEndpoint:
    def __init__(self, target, assistant, rule: str, k: int = 2):
        assert rule in RULES, rule
        self.target = target
        self.assistant = assistant
        self.rule = rule
        self.k = k
        self._rows: dict[tuple, torch.Tensor] = {}
        self._drafts: dict[tuple, tuple] = {}

    def complete(self, prompt, seeds, max_tokens, settings):
        params = SamplingParams(settings["temperature"], settings.get("top_k"), settings.get("top_p"))
        pen = Penalties(
            settings.get("repetition_penalty", 1.0),
            settings.get("presence_penalty", 0.0),
            settings.get("frequency_penalty", 0.0),
        )
        with torch.inference_mode():
            return [self._one(list(prompt), max_tokens, params, pen, s) for s in seeds]

    def _p(self, row, prompt, history, params, pen):
        """The processed target distribution of one logits row after ``history`` (the generated tokens)."""
        x = row.double()
        if pen.active:
            x = apply_penalties(x, torch.tensor(prompt), torch.tensor(history, dtype=torch.long), pen)
        return process_logits(x[None], params)[0]

    def _logits(self, ids: list[int]) -> torch.Tensor:
        """The target's logits rows [S, V] of a token sequence (kept)."""
        key = tuple(ids)
        if key not in self._rows:
            self._rows[key] = self.target(torch.tensor([ids]))[0]
        return self._rows[key]

    def _draft(self, ctx_ids: list[int], n: int) -> tuple:
        """n argmax drafts after ``ctx_ids`` (pending token last) and the raw drafter softmaxes q (kept)."""
        key = (tuple(ctx_ids), n)
        if key not in self._drafts:
            pos = len(ctx_ids) - 1  # the pending token's position; the drafter reads the target's K/V before it
            _, hidden, kv = self.target.forward_with_kv(torch.tensor([ctx_ids[:-1]]))
            ctx = DraftDenseContext(self.assistant.config.text, kv, torch.tensor([[pos]]))
            h = hidden[0, -1:]
            last = ctx_ids[-1]
            drafts, qs = [], []
            for _ in range(n):
                lg, h = self.assistant.step(self.target.embed(torch.tensor([last])), h, torch.tensor([pos]), ctx)
                last = int(lg.float().argmax(-1))
                drafts.append(last)
                qs.append(torch.softmax(lg[0].double(), -1))
            self._drafts[key] = (drafts, qs)
        drafts, qs = self._drafts[key]
        return list(drafts), qs

    def _one(self, prompt, m, params, pen, seed):
        g = torch.Generator().manual_seed(seed)
        out = [_draw(self._p(self._logits(prompt)[-1], prompt, [], params, pen), g)]
        while len(out) < m:
            n = min(self.k, m - len(out) - 1)
            ctx_ids = prompt + out
            drafts, qs = self._draft(ctx_ids, n)
            rows = self._logits(ctx_ids + drafts)[len(ctx_ids) - 1 :]
            emitted = None
            for j in range(n + 1):
                history = out if self.rule == "lagging-penalty" else out + drafts[:j]
                p = self._p(rows[j], prompt, history, params, pen)
                if j == n:
                    emitted = _draw(p, g)  # the bonus token
                    break
                x = drafts[j]
                u = float(torch.rand((), generator=g, dtype=torch.float64))
                if self.rule == "argmax-as-sampled":
                    if u < min(1.0, float(p[x] / qs[j][x])):
                        continue
                    resid = (p - qs[j]).clamp_min(0.0)
                else:
                    if u < float(p[x]):
                        continue
                    resid = p.clone()
                    resid[x] = 0.0
                emitted = _draw(resid if resid.sum() > 0 else p, g)
                drafts = drafts[:j]
                break
            out += drafts + [emitted]
        return out[:m]


class TransformersEndpoint:
    """transformers' assisted generation (``model.generate(assistant_model=...)``) at T > 0."""

    def __init__(self, model, assistant):
        self.model = model
        self.assistant = assistant

    def complete(self, prompt, seeds, max_tokens, settings):
        ids = torch.tensor([list(prompt)])
        kw = dict(
            do_sample=True,
            temperature=settings["temperature"],
            top_k=settings.get("top_k") or 0,
            top_p=settings.get("top_p") or 1.0,
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            assistant_model=self.assistant,
        )
        out = []
        with torch.inference_mode():
            for s in seeds:
                torch.manual_seed(s)
                o = self.model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
                out.append(o[0, ids.shape[1] :].tolist())
        return out
