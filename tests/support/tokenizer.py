"""A character-level Hugging Face tokenizer of a few tokens, for controls tests on tiny vocabularies.

``char_tokenizer(["<eos>", "a", "b", "ab"])`` gives a ``PreTrainedTokenizerFast`` whose id i is ``tokens[i]``:
names in ``<...>`` are special tokens, the rest are byte-level BPE tokens (multi-character ones get the merges
that build them), so llguidance reads their bytes exactly as it reads a real Gemma tokenizer's.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

_B2U = bytes_to_unicode()


def _bl(text: str) -> str:
    return "".join(_B2U[b] for b in text.encode("utf-8"))


def char_tokenizer(tokens: list[str], eos: str = "<eos>") -> PreTrainedTokenizerFast:
    vocab = {(t if t.startswith("<") else _bl(t)): i for i, t in enumerate(tokens)}
    merges = []
    for t in tokens:
        if not t.startswith("<") and len(t) > 1:
            merges.append((_bl(t[:-1]), _bl(t[-1])))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    specials = [t for t in tokens if t.startswith("<")]
    out = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos, additional_special_tokens=specials)
    assert [out.convert_tokens_to_ids(k) for k in vocab] == list(range(len(tokens)))
    return out
