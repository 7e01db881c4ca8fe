"""A request: one prompt with its own settings, and its decoding state.

Every setting that `Engine.generate` takes lives here per prompt - sampling parameters, draft length (0 = plain
decoding), draft mode, random stream, stop tokens and strings, budget, controls - so one batch can mix requests,
and a request's tokens do not depend on which others share its rounds (docs: serving, "Continuous batching").
`make_requests` validates the keywords of `Engine.generate` and builds the requests of one call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from minimtp.controls import NO_CONTROLS, Controls, Penalties, make_controls
from minimtp.errors import GenerationError
from minimtp.grammar import grammar_source
from minimtp.sampling import SamplingParams, make_generators
from minimtp.stats import Stats
from minimtp.stop_strings import StopStrings, check_stop_strings


@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams = SamplingParams()
    k: int = 0  # drafts per round (0: plain decoding)
    draft_mode: str = "argmax"  # "argmax" | "sample"
    gen: torch.Generator | None = None
    stops: frozenset[int] = frozenset()
    max_new: int = 64
    controls: Controls = NO_CONTROLS  # penalties, grammar, token healing (controls.py)
    stop_strings: StopStrings | None = None
    on_tokens: Callable | None = None  # on_tokens(request, new token ids), as tokens are accepted
    index: int = 0  # position in its generate call (or any id the caller likes)
    id: int = -1  # its sequence id in the KV cache (set by the scheduler)
    arrival: float = field(default_factory=time.perf_counter)
    # decoding state
    out: list[int] = field(default_factory=list)
    cache_len: int = 0  # positions with K/V in the cache
    pending: int = -1  # emitted token at position cache_len, not yet run through the target
    hidden: torch.Tensor | None = None  # target hidden state at cache_len - 1
    done: str | None = None  # "stop" | "length" | "context" | "abort"
    stop_reason: int | str | None = None
    cancelled: bool = False
    stats: Stats = field(default_factory=Stats)

    @property
    def sampled_drafts(self) -> bool:
        return self.draft_mode == "sample" and not self.params.is_greedy

    def text(self, tokenizer) -> str | None:
        """The continuation's text, cut at a stop string; None without a tokenizer."""
        if tokenizer is None:
            return None
        return (self.stop_strings or StopStrings(tokenizer, [], prefix=self.controls.healed)).cut(self.out)


def check_draft_mode(mode: str) -> str:
    if mode not in ("argmax", "sample"):
        raise GenerationError(f"draft_mode = {mode!r}, expected 'argmax' or 'sample'")
    return mode


def check_prompts(prompts, V: int, max_len: int) -> list[list[int]]:
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise GenerationError("prompts must be a non-empty list of token-id lists")
    if all(isinstance(x, int) for x in prompts):
        raise GenerationError("prompts must be a list of token-id lists, e.g. [[2, 651, 1234]], not a flat list")
    out = []
    for b, p in enumerate(prompts):
        if isinstance(p, torch.Tensor):
            p = p.tolist()
        if not isinstance(p, (list, tuple)) or len(p) == 0:
            raise GenerationError(f"prompt {b} is empty (or not a list of token ids)")
        for t in p:
            if isinstance(t, bool) or not isinstance(t, int):
                raise GenerationError(f"prompt {b}: token id {t!r} is not an integer")
            if not 0 <= t < V:
                raise GenerationError(f"prompt {b}: token id {t} out of range, expected 0 <= id < vocab_size {V}")
        if len(p) >= max_len:
            raise GenerationError(
                f"prompt {b} has {len(p)} tokens; the context limit (max_position_embeddings) is {max_len}"
            )
        out.append(list(p))
    return out


def make_requests(engine, prompts, max_new_tokens=64, num_speculative_tokens=None, temperature=0.0, top_k=None,
                  top_p=None, min_p=None, seed=None, stop_token_ids=None, draft_mode=None, use_assistant=True,
                  on_tokens=None, repetition_penalty=None, presence_penalty=None, frequency_penalty=None, stop=None,
                  include_stop_str_in_output=False, json_schema=None, regex=None, grammar=None,
                  token_healing=False) -> list[Request]:  # fmt: skip
    """The requests of one `Engine.generate` call (its keywords, validated; one-line GenerationError otherwise)."""
    cfg = engine.cfg
    prompts = check_prompts(prompts, cfg.vocab_size, cfg.max_position_embeddings)
    params = SamplingParams(temperature, top_k, top_p, min_p).validate()
    pen = Penalties(*(d if v is None else v for v, d in ((repetition_penalty, 1.0), (presence_penalty, 0.0),
                                                         (frequency_penalty, 0.0)))).validate()  # fmt: skip
    stop_strs, source = check_stop_strings(stop), grammar_source(json_schema, regex, grammar)
    controls = [NO_CONTROLS] * len(prompts)
    if source is not None or token_healing or pen.active:
        tok = engine.tokenizer if source is not None or token_healing else None
        made = make_controls(prompts, tok, cfg.vocab_size, cfg.eos_token_ids, pen, source, token_healing)
        prompts, controls = [m[0] for m in made], [m[1] for m in made]
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens = {max_new_tokens!r}, expected an integer >= 1")
    k = engine.default_num_speculative_tokens if num_speculative_tokens is None else num_speculative_tokens
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise GenerationError(f"num_speculative_tokens = {k!r}, expected an integer >= 1")
    k = k if engine.assistant is not None and use_assistant else 0
    mode = check_draft_mode(engine.draft_mode if draft_mode is None else draft_mode)
    stops = frozenset(cfg.eos_token_ids if stop_token_ids is None else stop_token_ids)
    gens = make_generators(seed, len(prompts))
    tok = engine.tokenizer if stop_strs else None
    reqs = []
    for i, (p, c, g) in enumerate(zip(prompts, controls, gens)):
        st = StopStrings(tok, stop_strs, include_stop_str_in_output, c.healed) if stop_strs else None
        cb = None if on_tokens is None else (lambda r, new: on_tokens(r.index, new))
        reqs.append(Request(p, params, k, mode, g, stops, max_new_tokens, c, st, cb, index=i))
    return reqs
