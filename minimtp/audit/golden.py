"""``python -m minimtp.audit golden --out DIR``: reference traces of one greedy round, for implementers to diff.

For one prompt (token ids P, positions 0 .. S-1) the trace holds, as ``DIR/golden.safetensors`` with a JSON
manifest ``DIR/manifest.json`` naming every tensor:

* ``target.embeddings`` [S, H] (E[ids]·sqrt(H)), ``target.layer.{i}`` [S, H] (each decoder layer's output),
  ``target.final_norm`` [S, H] (the hidden state the assistant reads), ``target.logits`` [S, V] (softcapped);
* ``target.kv.{type}.k`` / ``.v`` [S, kvh, d]: the store layer's K (RoPE applied) and V of each layer type, which
  the drafter reads;
* the first token t0 = argmax of the last row (pending at position p = S); then, for draft step j = 0 .. k-1 at the
  constant position p: ``draft.{j}.input`` [1, 2H] ([E(token)·sqrt(H) ; h]), ``draft.{j}.layer.{i}`` [1, H_a],
  ``draft.{j}.norm`` [1, H_a], ``draft.{j}.logits`` [1, V] (never softcapped), ``draft.{j}.hidden_out`` [1, H]
  (the projection fed to step j+1); with a centroid head also ``draft.{j}.centroid_logits`` [1, C],
  ``draft.{j}.centroid_top`` [1, K] (the kept centroids) and ``draft.{j}.selected_tokens`` [1, K·V/C] (the tokens
  whose logits are computed; every other token gets min(selected) - 1);
* ``verify.logits`` [k+1, V]: the target's rows for [t0, d_1 .. d_k] at positions p .. p+k.

The manifest also lists, per draft step and drafter layer, the target layer whose K/V it reads and the positions:
full attention [0, p), sliding attention the last W+1, [max(0, p - W - 1), p) (docs: concepts/gemma4-assistant).
The math is the reference's, dense (minimtp.model, minimtp.assistant, minimtp.attention.DraftDenseContext).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

from minimtp.attention import DraftDenseContext
from minimtp.audit.inputs import DEFAULT_PROMPTS, add_pair_flags, load_models, prompt_ids
from minimtp.config import SLIDING
from minimtp.errors import ConfigError, MinimtpError


def _record(module, name: str, store: dict):
    """A forward hook that keeps ``module``'s output (a tensor) under ``name``."""
    return module.register_forward_hook(lambda _m, _i, out: store.__setitem__(name, out.detach().clone()))


@torch.inference_mode()
def golden(target, assistant, prompt: list[int], k: int) -> tuple[dict, dict]:
    """(tensors, manifest) of one greedy round after ``prompt`` (module docstring)."""
    if len(prompt) < 1:
        raise ConfigError("the prompt is empty")
    S = len(prompt)
    t: dict[str, torch.Tensor] = {}
    hooks = [_record(layer, f"target.layer.{i}", t) for i, layer in enumerate(target.model.layers)]
    hooks.append(_record(target.model.embed_tokens, "target.embeddings", t))
    try:
        logits, hidden, kv = target.forward_with_kv(torch.tensor([prompt]))
    finally:
        for h in hooks:
            h.remove()
    t["target.final_norm"] = hidden[0]
    t["target.logits"] = logits[0]
    for lt, (K, V) in sorted(kv.items()):
        t[f"target.kv.{lt}.k"] = K[0]
        t[f"target.kv.{lt}.v"] = V[0]
    first = int(logits[0, -1].float().argmax())
    p = S
    acfg = assistant.config
    ctx = DraftDenseContext(acfg.text, kv, torch.tensor([[p]]))
    pos = torch.tensor([p])
    rope = assistant.rope(pos)
    h = hidden[0, -1:]
    last = first
    drafts = []
    for j in range(k):
        step: dict[str, torch.Tensor] = {}
        hooks = [_record(layer, f"draft.{j}.layer.{i}", step) for i, layer in enumerate(assistant.model.layers)]
        hooks.append(_record(assistant.model.norm, f"draft.{j}.norm", step))
        emb = target.embed(torch.tensor([last]))
        try:
            lg, h_next = assistant.step(emb, h, pos, ctx, rope)
        finally:
            for hk in hooks:
                hk.remove()
        step[f"draft.{j}.input"] = torch.cat([emb, h], -1)
        step[f"draft.{j}.logits"] = lg
        step[f"draft.{j}.hidden_out"] = h_next
        if acfg.use_ordered_embeddings:
            head = assistant.masked_embedding
            c = head.centroids(step[f"draft.{j}.norm"])
            top = torch.topk(c, head.K, dim=-1).indices
            step[f"draft.{j}.centroid_logits"] = c
            step[f"draft.{j}.centroid_top"] = top
            step[f"draft.{j}.selected_tokens"] = head.token_ordering.view(head.C, head.V // head.C)[top].flatten(1)
        t.update(step)
        last = int(lg.float().argmax(-1))
        drafts.append(last)
        h = h_next
    verify = target(torch.tensor([prompt + [first] + drafts]))[0, p:]  # rows at positions p .. p + k
    t["verify.logits"] = verify
    top = verify.float().argmax(-1).tolist()
    accepted = 0
    while accepted < k and drafts[accepted] == top[accepted]:
        accepted += 1
    reads = []
    for i, lt in enumerate(acfg.text.layer_types):
        lo = max(0, p - acfg.text.sliding_window - 1) if lt == SLIDING else 0
        reads.append(
            {"draft_layer": i, "type": lt, "target_layer": target.config.store_layer(lt), "positions": [lo, p]}
        )
    manifest = {
        "format": "minimtp-golden-1",
        "prompt_ids": prompt,
        "first_token": first,
        "position": p,
        "k": k,
        "drafts": drafts,
        "accepted": accepted,
        "emitted": [first] + drafts[:accepted] + [top[accepted]],
        "centroid_head": bool(acfg.use_ordered_embeddings),
        "kv_reads": reads,  # the same for every draft step of the round (the position is constant)
        "tensors": {
            name: {"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")} for name, x in t.items()
        },
    }
    return t, manifest


def write(out_dir: str, tensors: dict, manifest: dict, meta: dict) -> list[str]:
    """``golden.safetensors`` and ``manifest.json`` in ``out_dir`` (created); their paths."""
    os.makedirs(out_dir, exist_ok=True)
    st = os.path.join(out_dir, "golden.safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, st)
    mf = os.path.join(out_dir, "manifest.json")
    with open(mf, "w", encoding="utf-8") as f:
        json.dump({**meta, **manifest}, f, indent=2)
    return [st, mf]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minimtp.audit golden", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for golden.safetensors and manifest.json")
    add_pair_flags(p)
    p.add_argument("--prompt", default=None, help="prompt text (default: a built-in one)")
    p.add_argument("--prompt-ids", default=None, help="comma-separated token ids instead of --prompt")
    p.add_argument("--k", type=int, default=None, help="draft steps (default: the assistant's, else 6)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        target, assistant, tok = load_models(args)
        if args.prompt_ids:
            try:
                ids = [int(x) for x in args.prompt_ids.split(",")]
            except ValueError:
                raise ConfigError(f"--prompt-ids {args.prompt_ids!r}: expected comma-separated integers") from None
        else:
            ids = prompt_ids([args.prompt or DEFAULT_PROMPTS[0]], tok)[0]
        k = args.k if args.k is not None else (assistant.config.num_assistant_tokens or 6)
        if k < 1:
            raise ConfigError(f"--k {k}: expected an integer >= 1")
        tensors, manifest = golden(target, assistant, ids, k)
        meta = {"model": args.model or "embedded default target", "assistant": args.assistant or "embedded default"}
        paths = write(args.out, tensors, manifest, {**meta, "dtype": args.dtype})
    except MinimtpError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(tensors)} tensors to {paths[0]} and the manifest to {paths[1]}")
    return 0
