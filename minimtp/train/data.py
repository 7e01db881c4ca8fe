"""Token streams on disk and the deterministic batches drawn from them."""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from minimtp.train.corpus import BOS, EOS, chat_examples, read_corpus
from minimtp.train.tokenizer import load_tokenizer


def prepare_data(tok_dir: str, out_dir: str, max_files: int | None = None) -> dict:
    """Tokenise the corpus once into ``out_dir/{train,val,chat}.npy`` (uint16; documents separated by ``<eos>``)."""
    meta_path = os.path.join(out_dir, "data.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            return json.load(f)
    info, train, val = read_corpus(max_files=max_files)
    tok = load_tokenizer(tok_dir)

    def stream(texts):
        ids = []
        for enc in tok.encode_batch(texts, add_special_tokens=False):
            ids.extend(enc.ids)
            ids.append(EOS)
        return np.asarray(ids, dtype=np.uint16)

    chats = chat_examples(train)
    os.makedirs(out_dir, exist_ok=True)
    arrays = {"train": stream(train), "val": stream(val), "chat": stream(chats)}
    for k, a in arrays.items():
        np.save(os.path.join(out_dir, f"{k}.npy"), a)
    meta = dict(info, tokens={k: int(len(a)) for k, a in arrays.items()}, chat_examples=len(chats))
    meta["bytes_per_token"] = round(info["n_bytes"] / max(1, len(arrays["train"]) + len(arrays["val"])), 3)
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=2)
    return meta


class Batches:
    """Deterministic batches: batch ``step`` depends only on (seed, step), so a resumed run sees the same data.
    Each row is ``<bos>`` + a random window of the code stream (or, with probability ``chat_frac``, of the chat
    stream), ``seq_len + 1`` tokens in all (inputs and shifted labels)."""

    def __init__(
        self,
        data_dir: str,
        split: str,
        batch: int,
        seq_len: int,
        seed: int,
        chat_frac: float = 0.1,
        selfgen_frac: float = 0.0,
    ):
        self.code = np.load(os.path.join(data_dir, f"{split}.npy"))
        chat_path = os.path.join(data_dir, "chat.npy")
        self.chat = np.load(chat_path) if split == "train" and os.path.isfile(chat_path) else None
        self.batch, self.seq_len, self.seed, self.chat_frac = batch, seq_len, seed, chat_frac
        self.selfgen, self.selfgen_frac = None, selfgen_frac
        if selfgen_frac > 0:  # rows written by `selfgen`: <bos> + corpus prompt + the target's own continuation
            self.selfgen = np.load(os.path.join(data_dir, f"selfgen_{split}.npy"))
            if self.selfgen.shape[1] < seq_len + 1:
                raise SystemExit(f"error: selfgen rows have {self.selfgen.shape[1]} tokens, need seq_len + 1")

    def get(self, step: int) -> torch.Tensor:
        """Batch ``step`` as ``[batch, seq_len + 1]`` int64."""
        rng = np.random.default_rng([self.seed, step])
        rows = []
        for _ in range(self.batch):
            if self.selfgen is not None and rng.random() < self.selfgen_frac:
                rows.append(self.selfgen[int(rng.integers(0, len(self.selfgen))), : self.seq_len + 1])
                continue
            src = self.code
            if self.chat is not None and len(self.chat) > self.seq_len and rng.random() < self.chat_frac:
                src = self.chat
            i = int(rng.integers(0, len(src) - self.seq_len))
            rows.append(np.concatenate([[BOS], src[i : i + self.seq_len]]))
        return torch.from_numpy(np.stack(rows).astype(np.int64))
