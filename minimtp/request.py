"""A request: one prompt with its own settings, and its decoding state.

Every setting of `GenerationSettings` lives here per prompt - sampling parameters, draft length (0 = plain
decoding), draft mode, random stream, stop tokens and strings, budget, controls - so one batch can mix requests,
and a request's tokens do not depend on which others share its rounds (docs: serving, "Continuous batching").
`make_requests` builds the requests of one set of settings with the engine's defaults filled in.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from minimtp.controls.grammar import grammar_source
from minimtp.controls.logits import NO_CONTROLS, Controls, make_controls
from minimtp.controls.stop_strings import StopStrings, check_stop_strings
from minimtp.errors import GenerationError
from minimtp.sampling import SamplingParams, make_generators
from minimtp.settings import GenerationSettings
from minimtp.stats import Stats


@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams = SamplingParams()
    k: int = 0  # drafts per round (0: plain decoding)
    draft_mode: str = "argmax"  # "argmax" | "sample"
    gen: torch.Generator | None = None
    stops: frozenset[int] = frozenset()
    max_new: int = 64
    max_len: int = 1 << 62  # the context limit: positions the model can hold
    controls: Controls = NO_CONTROLS  # penalties, grammar, token healing (controls/)
    stop_strings: StopStrings | None = None
    logprobs: int | None = None  # None, or how many top alternatives each token's logprob entry lists
    on_tokens: Callable | None = None  # on_tokens(request, new token ids), as tokens are accepted
    index: int = 0  # position in its generate call (or any id the caller likes)
    id: int = -1  # its sequence id in the KV cache (set by the scheduler)
    arrival: float = field(default_factory=time.perf_counter)
    # decoding state
    out: list[int] = field(default_factory=list)
    out_logprobs: list[tuple] = field(default_factory=list)  # with logprobs: one (logprob, top) per token of out
    cache_len: int = 0  # positions with K/V in the cache
    hidden: torch.Tensor | None = None  # target hidden state at cache_len - 1
    done: str | None = None  # "stop" | "length" | "context" | "abort" | "error"
    stop_reason: int | str | None = None
    cancelled: bool = False
    stats: Stats = field(default_factory=Stats)

    @property
    def pending(self) -> int:
        """The last emitted token, at position cache_len: not yet run through the target."""
        return self.out[-1]

    @property
    def sampled_drafts(self) -> bool:
        return self.draft_mode == "sample" and not self.params.is_greedy

    def append(self, tokens: list[int], logprobs: list[tuple] | None = None) -> None:
        """Emit ``tokens`` (and their ``logprobs`` entries): append them up to and including the first stop token
        or string, or up to the budget; then the context limit. Streams them to ``on_tokens``."""
        new = []
        for t in tokens:
            new.append(t)
            if t in self.stops:
                self.done = "stop"
                self.stop_reason = t
                break
            if self.stop_strings is not None:
                hit = self.stop_strings.find(self.stop_strings.text(self.out + new))
                if hit:
                    self.done = "stop"
                    self.stop_reason = hit[1]
                    break
            if len(self.out) + len(new) >= self.max_new:
                self.done = "length"
                break
        self.out.extend(new)
        if logprobs is not None:
            self.out_logprobs.extend(logprobs[: len(new)])
        self.stats.generated_tokens += len(new)
        if self.done is None and self.cache_len + 1 >= self.max_len:
            self.done = "context"
        if self.on_tokens is not None and new:
            self.on_tokens(self, new)

    def text(self, tokenizer) -> str | None:
        """The continuation's text, cut at a stop string; None without a tokenizer."""
        if tokenizer is None:
            return None
        return (self.stop_strings or StopStrings(tokenizer, [], prefix=self.controls.healed)).cut(self.out)


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


def make_requests(engine, prompts, settings: GenerationSettings, on_tokens=None) -> list[Request]:
    """The requests of ``prompts`` with one (validated) set of settings; the engine gives the model's facts and
    defaults: its config, tokenizer, assistant and draft mode. ``on_tokens(i, ids)`` streams prompt i's tokens."""
    cfg = engine.cfg
    prompts = check_prompts(prompts, cfg.vocab_size, cfg.max_position_embeddings)
    s = settings.validate()
    params = s.sampling
    penalties = s.penalties
    stop_strs = check_stop_strings(s.stop)
    source = grammar_source(s.json_schema, s.regex, s.grammar)
    controls = [NO_CONTROLS] * len(prompts)
    if source is not None or s.token_healing or penalties.active:
        tok = engine.tokenizer if source is not None or s.token_healing else None
        made = make_controls(prompts, tok, cfg.vocab_size, cfg.eos_token_ids, penalties, source, s.token_healing)
        prompts = [m[0] for m in made]
        controls = [m[1] for m in made]
    k = engine.default_num_speculative_tokens if s.num_speculative_tokens is None else s.num_speculative_tokens
    if engine.assistant is None or not s.use_assistant:
        k = 0
    mode = engine.draft_mode if s.draft_mode is None else s.draft_mode
    stops = frozenset(cfg.eos_token_ids if s.stop_token_ids is None else s.stop_token_ids)
    gens = make_generators(s.seed, len(prompts))
    tok = engine.tokenizer if stop_strs else None
    callback = None if on_tokens is None else (lambda r, new: on_tokens(r.index, new))
    reqs = []
    for i, (p, c, g) in enumerate(zip(prompts, controls, gens)):
        stop_strings = StopStrings(tok, stop_strs, s.include_stop_str_in_output, c.healed) if stop_strs else None
        request = Request(
            p,
            params=params,
            k=k,
            draft_mode=mode,
            gen=g,
            stops=stops,
            max_new=s.max_new_tokens,
            max_len=cfg.max_position_embeddings,
            controls=c,
            stop_strings=stop_strings,
            logprobs=s.logprobs,
            on_tokens=callback,
            index=i,
        )
        reqs.append(request)
    return reqs
