"""The assistant's drafting steps, in minimtp and in transformers, fed the same inputs (docs:
concepts/gemma4-assistant, "Clean semantics, and transformers' off-by-one"), on the tiny checkpoints of
``hf_models`` (``hf_pair``, ``prompt``) or any other pair (``hf_steps``, ``mt_steps``)."""

from __future__ import annotations

import functools

import torch

from minimtp.attention import DraftDenseContext

from .hf_models import build_assistant, build_target

S = 30  # prompt length: longer than W + 1 = 9, so the drafter's sliding window matters


@functools.cache
def hf_pair(family: str, ordered: bool):
    return build_target(family), build_assistant(family, ordered=ordered)


def prompt(length: int = S, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 512, (1, length), generator=g)


def hf_target_states(target, ids):
    with torch.no_grad():
        return target(
            ids,
            attention_mask=torch.ones_like(ids),
            output_hidden_states=True,
            return_shared_kv_states=True,
            use_cache=False,
        )


def hf_steps(assistant, target, ids, out, p: int, steps: int = 2):
    """transformers' drafting at position p: step 1 reads the target's hidden state at p - 1 and embeds ids[p];
    later steps feed the projected state back and embed the previous draft (argmax). K/V cut to positions < p."""
    skv = {t: (k[:, :, :p], v[:, :, :p]) for t, (k, v) in out.shared_kv_states.items()}
    tok, hid, res = ids[:, p : p + 1], out.hidden_states[-1][:, p - 1 : p], []
    with torch.no_grad():
        for _ in range(steps):
            emb = target.get_input_embeddings()(tok)
            o = assistant(
                inputs_embeds=torch.cat([emb, hid], -1), position_ids=torch.tensor([[p]]), shared_kv_states=skv
            )
            res.append((o.logits[0, -1], o.last_hidden_state[0, -1]))
            tok, hid = o.logits[:, -1:].argmax(-1), o.last_hidden_state
    return res


def mt_steps(assistant, target, ids, p: int, steps: int = 2, cut: bool = True):
    _, hidden, kv = target.forward_with_kv(ids)
    if cut:
        kv = {t: (k[:, :p], v[:, :p]) for t, (k, v) in kv.items()}
    ctx = DraftDenseContext(assistant.config.text, kv, torch.tensor([[p]]))
    tok, hid, res = ids[0, p : p + 1], hidden[0, p - 1 : p], []
    for _ in range(steps):
        logits, hid = assistant.step(target.embed(tok), hid, torch.tensor([p]), ctx)
        res.append((logits[0], hid[0]))
        tok = logits.argmax(-1)
    return res
