"""Context-dependent toy language models for the distribution tests.

`ToyLM.logits(prefix)` is a fixed pseudo-random function of the WHOLE prefix (a hash of the token tuple
seeds the draw), so row j of a verify call really depends on the drafts before it: a bug that conditions a
row on the wrong prefix, or that mixes up positions, changes the enumerated distribution. Some contexts
ban a token (logit -inf) so p(x) = 0 and q(x) = 0 cases occur naturally.

A drafter is a ToyLM with `base=target`: its logits are `mix * target + (1 - mix) * own noise`, so it
agrees with the target often but not always, like a real MTP head.
"""

from __future__ import annotations

import functools
import math
import zlib

import torch

from minimtp.sampling import SamplingParams, process_logits


class ToyLM:
    def __init__(self, vocab: int, salt: int, scale: float = 1.5, base: ToyLM | None = None, mix: float = 0.6):
        self.vocab, self.salt, self.scale, self.base, self.mix = vocab, salt, scale, base, mix

    @functools.cache  # noqa: B019 - a handful of long-lived test objects
    def logits(self, prefix: tuple[int, ...]) -> torch.Tensor:
        """[V] float64 logits for the next token after `prefix` (deterministic)."""
        h = zlib.crc32(repr((self.salt, prefix)).encode())
        g = torch.Generator().manual_seed(h)
        x = self.scale * torch.randn(self.vocab, generator=g, dtype=torch.float64)
        if h % 3 == 0:  # context-dependent ban
            x[h % self.vocab] = -math.inf
        if self.base is not None:
            x = self.mix * self.base.logits(prefix) + (1 - self.mix) * x
        return x

    @functools.cache  # noqa: B019
    def probs(self, prefix: tuple[int, ...], params: SamplingParams) -> torch.Tensor:
        """[V] float64 processed distribution (minimtp.sampling.process_logits on float64 logits)."""
        return process_logits(self.logits(prefix)[None], params)[0]


def make_pair(vocab: int = 5, seed: int = 0) -> tuple[ToyLM, ToyLM]:
    """(target, drafter) over `vocab` tokens."""
    target = ToyLM(vocab, salt=seed)
    return target, ToyLM(vocab, salt=seed + 1000, base=target)
