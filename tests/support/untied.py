"""Untied LM heads and ragged prompts for greedy-equivalence tests on the tiny checkpoints of ``hf_models``.

The tiny random targets have tied embeddings scaled x20, so greedy decoding falls into one repeated token
within a few steps (measured: 1-10 distinct tokens in 200) - a weak equivalence test. Untying the head with a
fixed row permutation of the embedding (same in minimtp and transformers) gives 100-190 distinct tokens per
200 and top-1/top-2 logit gaps >= 6e-4 along every greedy path here (fp32 noise between batch shapes ~1e-6).
"""

from __future__ import annotations

import dataclasses

import torch

V = 512  # the vocabulary of the hf_models families (unified_12b aside)


def make_prompts(lengths=(5, 13, 27), seed=2) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, V, (n,), generator=g).tolist() for n in lengths]


PROMPTS = make_prompts()

PERM = torch.randperm(V, generator=torch.Generator().manual_seed(9))


def untie_minimtp(target):
    target.config = dataclasses.replace(target.config, tie_word_embeddings=False)
    target.lm_head = torch.nn.Linear(target.config.hidden_size, V, bias=False).requires_grad_(False)
    target.lm_head.weight.copy_(target.model.embed_tokens.weight[PERM])
    return target


def untie_hf(model):
    head = torch.nn.Linear(model.config.hidden_size, V, bias=False).requires_grad_(False)
    head.weight.copy_(model.model.embed_tokens.weight[PERM])
    model.lm_head = head
    return model
