"""Train the default model pair: a small Gemma 4 target and its MTP assistant, on CPU, in about an hour.

Sub-commands (``python -m minimtp.train <cmd> --help``)::

    tokenizer  train the byte-level BPE on the CPython standard library (also done by ``target``)
    target     pre-train a small ``gemma4_text`` model from scratch (resumable, checkpoints every few minutes)
    assistant  distil a ``gemma4_assistant`` drafter against the frozen target
    export     write a Hugging Face directory (config.json, model.safetensors, ...) from a run's checkpoint
    accept     measure greedy acceptance of a target/assistant pair with a simple drafting loop
    bench      1-token vs k-token forward latency of a target shape (and an assistant step), 1 thread
    report     redraw the loss curves (PNG) of a run

Corpus: the ``.py`` files of the running interpreter's standard library (``sysconfig.get_paths()['stdlib']``)
without test folders, PSF-2.0. The Python version and a SHA-256 of the sorted file list are recorded, because the
content depends on the interpreter. About 2 % of the files (chosen by a hash of their path) are held out for
validation. A small "chat" stream is derived from the same files: for every documented function, the first line of
its docstring as a user request and the function's source as the model's answer, in the chat template shipped with
the tokenizer, so that ``--chat`` produces code rather than noise.

Training (target): next-token cross-entropy, AdamW (β = 0.9/0.95, weight decay 0.1 on matrices), linear warm-up
then cosine decay to 10 % of the peak rate, bf16 autocast over fp32 master weights, gradient clipping at 1.0.
Distillation (assistant): the target is frozen; for every position p of a batch the assistant runs ``draft_steps``
recurrent steps at position p (step j reads the embedding of token p+j-1 and the previous step's hidden state,
step 1 the target's hidden state at p-1) and is trained to match the target's next-token distribution at p+j-1
(cross-entropy with the target's probabilities, i.e. KL plus the target's entropy). Step inputs are the corpus
tokens (teacher forcing), for which the target's distributions are exact labels.

Everything long runs in the background and resumes: a run directory holds ``ckpt/`` (fp32 weights as safetensors,
optimizer state, step), ``log.jsonl`` and, at the end, ``final/`` (the Hugging Face directory) and ``report.png``.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import sysconfig
import textwrap
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from minimtp.assistant import DraftDenseContext, Gemma4Assistant, read_assistant
from minimtp.config import FULL, SLIDING, AssistantConfig, parse_text_config
from minimtp.model import Gemma4, load_target

PAD, EOS, BOS, SOT, EOT = 0, 1, 2, 3, 4
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
TEST_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


# ----------------------------------------------------------------------------------------------------- corpus


def stdlib_files(root: str | None = None) -> tuple[str, list[str]]:
    """(stdlib root, sorted relative paths of its ``.py`` files outside test folders and site-packages)."""
    root = root or sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in TEST_DIRS)
        for name in filenames:
            if name.endswith(".py"):
                out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return root, sorted(out)


def is_validation(relpath: str) -> bool:
    return int(hashlib.sha1(relpath.encode()).hexdigest(), 16) % 50 == 0


def read_corpus(root: str | None = None, max_files: int | None = None) -> tuple[dict, list[str], list[str]]:
    """(info, train texts, validation texts). ``info`` records the interpreter and a hash of the file list."""
    root, files = stdlib_files(root)
    if max_files:
        files = files[:max_files]
    train, val, n_bytes = [], [], 0
    for rel in files:
        with open(os.path.join(root, rel), encoding="utf-8", errors="replace") as f:
            text = f.read()
        n_bytes += len(text.encode())
        (val if is_validation(rel) else train).append(text)
    if not val and len(train) > 1:  # a small subset (tests) may contain no held-out file
        val.append(train.pop())
    info = {
        "source": "CPython standard library (.py, without test/, tests/, idle_test/), PSF-2.0",
        "python_version": sys.version.split()[0],
        "stdlib": root,
        "n_files": len(files),
        "n_validation_files": len(val),
        "n_bytes": n_bytes,
        "file_list_sha256": hashlib.sha256("\n".join(files).encode()).hexdigest(),
    }
    return info, train, val


def chat_examples(texts: list[str], max_chars: int = 1600) -> list[str]:
    """Documented functions as single-turn chats: the docstring's first line → the function's source."""
    out = []
    for text in texts:
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        lines = text.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            src = "\n".join(lines[first - 1 : node.end_lineno])
            if not doc or not src or len(src) > max_chars or node.name.startswith("__"):
                continue
            request = doc.strip().splitlines()[0].strip()
            if len(request) < 12:
                continue
            code = textwrap.dedent(src).strip()
            out.append(
                f"<start_of_turn>user\nWrite a Python function `{node.name}`: {request}<end_of_turn>\n"
                f"<start_of_turn>model\n```python\n{code}\n```<end_of_turn>\n"
            )
    return out


# -------------------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: str, max_len: int = 4096):
    """Byte-level BPE; ids 0-4 are ``<pad> <eos> <bos> <start_of_turn> <end_of_turn>`` (pad/eos/bos as in Gemma).
    Encoding adds ``<bos>`` (like Gemma's tokenizer); ``tokenizer_config.json`` carries a minimal chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS)]
    )
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return tok


def load_tokenizer(path: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path)


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


# ----------------------------------------------------------------------------------------------- configs


def layer_pattern(pattern: str, n: int) -> list[str]:
    """ "sssf" → [sliding, sliding, sliding, full] repeated to n layers; the last layer is always full."""
    kinds = {"s": SLIDING, "f": FULL}
    types = [kinds[pattern[i % len(pattern)]] for i in range(n)]
    types[-1] = FULL
    return types


def _hf_text_config(**kw) -> dict:
    """A ``gemma4_text`` config dict exactly as transformers writes it (built through ``Gemma4TextConfig``)."""
    from transformers import Gemma4TextConfig

    d = Gemma4TextConfig(**kw).to_dict()
    d.pop("transformers_version", None)
    return d


def target_config_dict(a) -> dict:
    return _hf_text_config(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        layer_types=layer_pattern(a.pattern, a.layers),
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        head_dim=a.head_dim,
        global_head_dim=a.global_head_dim,
        sliding_window=a.window,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=a.vocab,
        num_kv_shared_layers=0,
        final_logit_softcapping=30.0,
        tie_word_embeddings=True,
        max_position_embeddings=a.max_positions,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=BOS,
        torch_dtype="bfloat16",
    )


@contextlib.contextmanager
def _patched_kv_sharing():
    """transformers 5.23 cannot build a fully KV-shared config (the assistant; gemma4.md §0): patch temporarily."""
    from transformers.models.gemma4 import configuration_gemma4 as cg

    orig = cg.Gemma4TextConfig.kv_sharing_modes

    def modes(self):
        n, L = self.num_kv_shared_layers, self.num_hidden_layers
        if n is not None and n >= L:
            return ["reuse"] * L
        return orig.fget(self)

    cg.Gemma4TextConfig.kv_sharing_modes = property(modes)
    try:
        yield
    finally:
        cg.Gemma4TextConfig.kv_sharing_modes = orig


def assistant_config_dict(a, target_cfg) -> dict:
    """A ``gemma4_assistant`` config whose per-type KV layout equals the target's store layers."""
    from transformers import Gemma4AssistantConfig, Gemma4TextConfig

    s, f = target_cfg.store_layer(SLIDING), target_cfg.store_layer(FULL)
    if target_cfg.kv_heads[s] != target_cfg.kv_heads[f] and not target_cfg.attention_k_eq_v:
        raise SystemExit("the target's sliding and full store layers have different KV head counts")
    with _patched_kv_sharing():
        text = Gemma4TextConfig(
            vocab_size=target_cfg.vocab_size,
            hidden_size=a.hidden,
            intermediate_size=a.intermediate,
            num_hidden_layers=a.layers,
            layer_types=layer_pattern(a.pattern, a.layers),
            num_attention_heads=a.heads,
            num_key_value_heads=target_cfg.kv_heads[s],
            head_dim=target_cfg.head_dims[s],
            global_head_dim=target_cfg.head_dims[f],
            sliding_window=target_cfg.sliding_window,
            hidden_size_per_layer_input=0,
            vocab_size_per_layer_input=0,
            num_kv_shared_layers=a.layers,
            final_logit_softcapping=None,
            max_position_embeddings=target_cfg.max_position_embeddings,
            pad_token_id=PAD,
            eos_token_id=EOS,
            bos_token_id=BOS,
        )
        d = Gemma4AssistantConfig(
            text_config=text.to_dict(),
            backbone_hidden_size=target_cfg.hidden_size,
            use_ordered_embeddings=False,
            tie_word_embeddings=True,
            torch_dtype="bfloat16",
        ).to_dict()
    d.pop("transformers_version", None)
    d["text_config"].pop("transformers_version", None)
    return d


def parse_assistant_dict(d: dict, num_assistant_tokens: int | None = None) -> AssistantConfig:
    td = dict(d["text_config"])
    td.setdefault("vocab_size_per_layer_input", 0)
    return AssistantConfig(
        text=parse_text_config(td, "assistant text_config"),
        backbone_hidden_size=d["backbone_hidden_size"],
        use_ordered_embeddings=bool(d.get("use_ordered_embeddings", False)),
        num_assistant_tokens=num_assistant_tokens,
    )


def init_weights(model: torch.nn.Module, std: float = 0.02) -> None:
    """N(0, 0.02) for every matrix and embedding, ones for norm weights and layer scalars."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                torch.nn.init.normal_(p, 0.0, std)
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.zero_()
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.fill_(1.0)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------- saving/loading


def _atomic_dir(final: str):
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def save_checkpoint(run_dir: str, model, opt, step: int, extra: dict) -> None:
    """fp32 weights (safetensors) + optimizer state (torch.save; own resume files only) + step, atomically."""
    final = os.path.join(run_dir, "ckpt")
    tmp = _atomic_dir(final)
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, os.path.join(tmp, "model.safetensors"))
    torch.save(opt.state_dict(), os.path.join(tmp, "optim.pt"))
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(dict(extra, step=step), f, indent=2)
    old = final + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(run_dir: str, model, opt=None) -> dict:
    ck = os.path.join(run_dir, "ckpt")
    model.load_state_dict(load_file(os.path.join(ck, "model.safetensors")), strict=True)
    if opt is not None:
        opt.load_state_dict(torch.load(os.path.join(ck, "optim.pt"), weights_only=True))
    with open(os.path.join(ck, "state.json")) as f:
        return json.load(f)


def _write_json(path: str, d: dict) -> None:
    with open(path, "w") as f:
        json.dump(d, f, indent=2, sort_keys=True)
        f.write("\n")


def _shipped_state(model) -> dict:
    sd = model.state_dict()
    return {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def export_target(model: Gemma4, config_dict: dict, tok_dir: str, dest: str, info: dict | None = None) -> None:
    """A Hugging Face ``Gemma4ForCausalLM`` directory: config, bf16 safetensors (tied head omitted), generation
    config (eos = ``<eos>``, ``<end_of_turn>``), tokenizer."""
    os.makedirs(dest, exist_ok=True)
    save_file(_shipped_state(model), os.path.join(dest, "model.safetensors"), metadata={"format": "pt"})
    _write_json(os.path.join(dest, "config.json"), dict(config_dict, architectures=["Gemma4ForCausalLM"]))
    gen = {"bos_token_id": BOS, "eos_token_id": [EOS, EOT], "pad_token_id": PAD, "do_sample": False}
    _write_json(os.path.join(dest, "generation_config.json"), gen)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok_dir, name), os.path.join(dest, name))
    if info:
        _write_json(os.path.join(dest, "training_info.json"), info)


def export_assistant(model: Gemma4Assistant, config_dict: dict, dest: str, k: int, info: dict | None = None):
    os.makedirs(dest, exist_ok=True)
    save_file(_shipped_state(model), os.path.join(dest, "model.safetensors"), metadata={"format": "pt"})
    _write_json(os.path.join(dest, "config.json"), dict(config_dict, architectures=["Gemma4AssistantForCausalLM"]))
    gen = {"bos_token_id": BOS, "eos_token_id": [EOS, EOT], "pad_token_id": PAD, "num_assistant_tokens": k}
    _write_json(os.path.join(dest, "generation_config.json"), gen)
    if info:
        _write_json(os.path.join(dest, "training_info.json"), info)


def load_assistant_dir(path: str, dtype=torch.float32) -> Gemma4Assistant:
    """An assistant directory loaded without a target to validate it against."""
    return read_assistant(path, dtype)


# ------------------------------------------------------------------------------------------------ training


def cosine_lr(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(model, lr: float, weight_decay: float):
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if p.requires_grad and not (p.ndim >= 2 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def _autocast(dtype: str):
    if dtype in ("bf16", "bfloat16"):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lm_loss(model: Gemma4, x: torch.Tensor, dtype: str) -> torch.Tensor:
    with _autocast(dtype):
        logits = model(x[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), ignore_index=PAD)


def _setup(args) -> None:
    torch.set_flush_denormal(True)  # softmax over 8k logits produces subnormals: 10x slowdowns without this
    if args.threads:
        torch.set_num_threads(args.threads)


class _Log:
    def __init__(self, path: str):
        self.path = path

    def write(self, **rec):
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def read(self) -> list[dict]:
        if not os.path.isfile(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]


def _loop(args, model, opt, run_dir: str, step0: int, loss_fn, eval_fn, extra: dict) -> int:
    """The shared optimisation loop: LR schedule, clipping, logging, periodic eval and checkpoints, tqdm.

    With ``--minutes M`` the cosine schedule runs over M minutes of *training compute* (the summed step times,
    kept across resumes) instead of over ``--steps``, and training stops when they are spent: on a shared,
    noisy 2-core machine the step time varies 5x, so a step count is a poor way to hit a time budget."""
    from tqdm import tqdm

    log = _Log(os.path.join(run_dir, "log.jsonl"))
    recs = log.read()
    if recs and recs[-1]["step"] > step0:  # steps logged after the last checkpoint are redone
        recs = [r for r in recs if r["step"] <= step0]
        with open(log.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
    elapsed = sum(r["s"] for r in recs)
    budget = args.minutes * 60 if getattr(args, "minutes", 0) else 0.0
    t_last_ckpt, t0 = time.time(), time.time()
    total = args.steps
    bar = tqdm(range(step0, total), initial=step0, total=total, mininterval=5, file=sys.stderr)
    step = step0
    for step in bar:
        if budget:
            progress = min(1.0, elapsed / budget)
            lr = cosine_lr(step, step + 1, args.lr, args.warmup) if step < args.warmup else None
            lr = lr or args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        else:
            lr = cosine_lr(step, total, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        ts = time.time()
        loss, metrics = loss_fn(step)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        rec = dict(step=step + 1, loss=round(loss.item(), 4), lr=lr, gnorm=round(gnorm, 3))
        rec["s"] = round(time.time() - ts, 3)
        elapsed += rec["s"]
        rec["elapsed_min"] = round(elapsed / 60, 2)
        rec.update(metrics)
        done = step + 1 == total or (budget and elapsed >= budget)
        if (step + 1) % args.eval_every == 0 or done:
            rec.update(eval_fn())
        log.write(**rec)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", **({"val": f"{rec['val_loss']:.3f}"} if "val_loss" in rec else {}))
        if time.time() - t_last_ckpt > args.ckpt_minutes * 60 or done:
            save_checkpoint(run_dir, model, opt, step + 1, extra)
            t_last_ckpt = time.time()
        if done:
            break
    bar.close()
    print(f"trained steps {step0}..{step + 1} in {(time.time() - t0) / 60:.1f} min", file=sys.stderr)
    return step + 1


def _save_args(run_dir: str, args) -> None:
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump({k: v for k, v in vars(args).items() if k != "func"}, f, indent=2)


def cmd_tokenizer(args) -> None:
    info, train, _ = read_corpus(max_files=args.max_files)
    t = time.time()
    train_tokenizer(train, args.vocab, args.out)
    print(json.dumps(info, indent=2))
    print(f"tokenizer ({args.vocab}) trained in {time.time() - t:.1f} s -> {args.out}")


def cmd_target(args) -> None:
    _setup(args)
    run = args.out
    os.makedirs(run, exist_ok=True)
    resume = args.resume and os.path.isfile(os.path.join(run, "ckpt", "state.json"))
    if resume:  # the run's own settings win over the command line (except --steps)
        with open(os.path.join(run, "args.json")) as f:
            saved = json.load(f)
        for k, v in saved.items():
            if k not in ("steps", "minutes", "resume", "threads", "ckpt_minutes", "out"):
                setattr(args, k, v)
    tok_dir = os.path.join(run, "tokenizer")
    if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        if args.tokenizer:
            os.makedirs(tok_dir, exist_ok=True)
            for name in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(os.path.join(args.tokenizer, name), os.path.join(tok_dir, name))
        else:
            _, train, _ = read_corpus(max_files=args.max_files)
            train_tokenizer(train, args.vocab, tok_dir)
    args.vocab = load_tokenizer(tok_dir).get_vocab_size()
    meta = prepare_data(tok_dir, os.path.join(run, "data"), args.max_files)
    cfg_dict = target_config_dict(args)
    cfg = parse_text_config(cfg_dict)
    torch.manual_seed(args.seed)
    model = Gemma4(cfg)
    init_weights(model)
    if args.dtype == "bf16-weights":
        model.to(torch.bfloat16)
    opt = make_optimizer(model, args.lr, args.weight_decay)
    step0 = load_checkpoint(run, model, opt)["step"] if resume else 0
    _save_args(run, args)
    n = count_params(model)
    print(f"target: {n / 1e6:.2f}M params, data {meta['tokens']}, start at step {step0}", file=sys.stderr)
    train_b = Batches(os.path.join(run, "data"), "train", args.batch_size, args.seq_len, args.seed, args.chat_frac)
    val_b = Batches(os.path.join(run, "data"), "val", args.batch_size, args.seq_len, args.seed + 1, 0.0)
    dt = "bf16" if args.dtype.startswith("bf16") else "fp32"

    def loss_fn(step):
        model.train()
        return lm_loss(model, train_b.get(step), dt), {}

    @torch.no_grad()
    def eval_fn():
        model.eval()
        losses = [lm_loss(model, val_b.get(i), dt).item() for i in range(args.eval_batches)]
        return {"val_loss": round(sum(losses) / len(losses), 4)}

    extra = {"kind": "target", "params": n, "config": cfg_dict, "data": meta}
    _loop(args, model, opt, run, step0, loss_fn, eval_fn, extra)
    info = _target_info(run, args, model, meta)
    export_target(model, cfg_dict, tok_dir, os.path.join(run, "final"), info)
    plot_report(run)
    print(f"exported {os.path.join(run, 'final')}", file=sys.stderr)


def _target_info(run: str, args, model, meta: dict) -> dict:
    recs = _Log(os.path.join(run, "log.jsonl")).read()
    vals = [r["val_loss"] for r in recs if "val_loss" in r]
    tail = [r["loss"] for r in recs[-50:]]
    return {
        "params": count_params(model),
        "steps": recs[-1]["step"] if recs else 0,
        "tokens_seen": (recs[-1]["step"] if recs else 0) * args.batch_size * args.seq_len,
        "train_minutes": round(sum(r["s"] for r in recs) / 60, 1),
        "final_train_loss": round(sum(tail) / max(1, len(tail)), 4),
        "final_val_loss": vals[-1] if vals else None,
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "corpus": meta,
    }


# ---------------------------------------------------------------------------------------------- distillation


def distill_loss(target: Gemma4, asst: Gemma4Assistant, x: torch.Tensor, k: int, dtype: str = "bf16"):
    """Multi-step distillation loss on a batch ``x`` ``[B, S]`` (all positions p >= 1 in parallel).

    Step j (1..k) at position p: input = target embedding of x[p+j-1] and the hidden state (target's at p-1 for
    j = 1, the previous step's projection after), K/V of the target at positions < p. Label: the target's
    next-token distribution at p+j-1. Returns (mean over steps of the soft cross-entropy, metrics with per-step
    KL and top-1 agreement with the target)."""
    B, S = x.shape
    with torch.no_grad(), _autocast(dtype):
        t_logits, t_hidden, kv = target.forward_with_kv(x)
        t_emb = target.embed(x)
    t_logp = torch.log_softmax(t_logits.float(), dim=-1)
    t_p = t_logp.exp()
    t_ent = -(t_p * t_logp).sum(-1)  # [B, S]
    t_arg = t_logits.argmax(-1)
    H = t_hidden.shape[-1]
    pos = torch.arange(S).repeat(B)
    ctx = DraftDenseContext(asst.config.text, kv, pos.view(B, S))
    hid = torch.cat([torch.zeros(B, 1, H, dtype=t_hidden.dtype), t_hidden[:, :-1]], 1).reshape(B * S, H)
    total, metrics = 0.0, {}
    for j in range(1, k + 1):
        src = torch.arange(S) + (j - 1)  # the token the step reads / the label position
        valid = ((torch.arange(S) >= 1) & (src < S)).repeat(B)
        srcc = src.clamp(max=S - 1)
        tok = t_emb[:, srcc].reshape(B * S, H)
        with _autocast(dtype):
            logits, hid = asst.step(tok, hid, pos, ctx)
        logp = torch.log_softmax(logits.float(), dim=-1)
        lbl = t_p[:, srcc].reshape(B * S, -1)
        ce = -(lbl * logp).sum(-1)
        loss_j = ce[valid].mean()
        total = total + loss_j
        with torch.no_grad():
            kl = (ce - t_ent[:, srcc].reshape(-1))[valid].mean().item()
            agree = (logits.argmax(-1) == t_arg[:, srcc].reshape(-1))[valid].float().mean().item()
        metrics[f"kl{j}"], metrics[f"top1_{j}"] = round(kl, 4), round(agree, 4)
    return total / k, metrics


def cmd_assistant(args) -> None:
    _setup(args)
    run = args.out
    os.makedirs(run, exist_ok=True)
    resume = args.resume and os.path.isfile(os.path.join(run, "ckpt", "state.json"))
    if resume:
        with open(os.path.join(run, "args.json")) as f:
            saved = json.load(f)
        for k, v in saved.items():
            if k not in ("steps", "minutes", "resume", "threads", "ckpt_minutes", "out"):
                setattr(args, k, v)
    target = load_target(args.target, torch.float32)
    # the tokenized corpus: the selfgen data directory already holds it (prepare_data returns at once there)
    data = (args.selfgen_data or os.path.join(run, "data")) if args.selfgen_frac else os.path.join(run, "data")
    prepare_data(args.target, data, args.max_files)
    cfg_dict = assistant_config_dict(args, target.config)
    acfg = parse_assistant_dict(cfg_dict, args.draft_tokens)
    torch.manual_seed(args.seed)
    asst = Gemma4Assistant(acfg)
    init_weights(asst)
    if args.init_from_target:  # the target's embedding is a good start for the tied head when sizes match
        if target.config.hidden_size == acfg.text.hidden_size:
            with torch.no_grad():
                asst.model.embed_tokens.weight.copy_(target.model.embed_tokens.weight)
    if args.init_from and not resume:  # warm start: continue distilling a shipped assistant
        src = read_assistant(args.init_from, torch.float32).state_dict()
        if args.init_layers:  # a shallower drafter from some of the source's layers (layer j <- layer keep[j])
            keep = [int(i) for i in args.init_layers.split(",")]
            src = {k: v for k, v in src.items() if not k.startswith("model.layers.")} | {
                k.replace(f"model.layers.{i}.", f"model.layers.{j}.", 1): v
                for j, i in enumerate(keep)
                for k, v in src.items()
                if k.startswith(f"model.layers.{i}.")
            }
        missing = asst.load_state_dict(src, strict=False)
        if missing.missing_keys or missing.unexpected_keys:
            raise SystemExit(f"error: --init-from {args.init_from}: shape/key mismatch {missing}")
    opt = make_optimizer(asst, args.lr, args.weight_decay)
    step0 = load_checkpoint(run, asst, opt)["step"] if resume else 0
    _save_args(run, args)
    n = count_params(asst)
    print(f"assistant: {n / 1e6:.2f}M params, start at step {step0}", file=sys.stderr)
    frac = args.selfgen_frac
    train_b = Batches(data, "train", args.batch_size, args.seq_len, args.seed, args.chat_frac, frac)
    val_b = Batches(data, "val", args.batch_size, args.seq_len, args.seed + 1, 0.0, frac)

    def loss_fn(step):
        asst.train()
        return distill_loss(target, asst, train_b.get(step), args.draft_steps, args.dtype)

    @torch.no_grad()
    def eval_fn():
        asst.eval()
        ms = [distill_loss(target, asst, val_b.get(i), args.draft_steps, args.dtype) for i in range(args.eval_batches)]
        out = {"val_loss": round(sum(m[0].item() for m in ms) / len(ms), 4)}
        for key in ms[0][1]:
            out["val_" + key] = round(sum(m[1][key] for m in ms) / len(ms), 4)
        return out

    extra = {"kind": "assistant", "params": n, "config": cfg_dict}
    _loop(args, asst, opt, run, step0, loss_fn, eval_fn, extra)
    asst.eval()
    recs = _Log(os.path.join(run, "log.jsonl")).read()
    info = {
        "params": n,
        "steps": recs[-1]["step"],
        "train_minutes": round(sum(r["s"] for r in recs) / 60, 1),
        "final_val": {k: v for k, v in recs[-1].items() if k.startswith("val_")},
        "args": {k: v for k, v in vars(args).items() if k != "func"},
    }
    export_assistant(asst, cfg_dict, os.path.join(run, "final"), args.draft_tokens, info)
    plot_report(run)
    print(f"exported {os.path.join(run, 'final')}", file=sys.stderr)


# ------------------------------------------------------------------------------- the target's own continuations


def cmd_selfgen(args) -> None:
    """Distillation data the way the drafter is used: the frozen target's own continuations of corpus prompts.

    Each row is ``<bos>`` + ``--prompt-len`` corpus tokens + the target's continuation (greedy, or sampled at
    ``--temperature`` for a ``--sample-frac`` share of the batches), ``--seq-len + 1`` tokens in all, written to
    ``OUT/selfgen_{train,val}.npy`` next to the tokenized corpus. A drafter is judged on the target's outputs,
    not on human code; training on them (as Medusa-2's and EAGLE's self-distillation do) aligns the two."""
    _setup(args)
    from tqdm import tqdm

    from minimtp.engine import Engine

    prepare_data(args.target, args.out, args.max_files)
    target = load_target(args.target, torch.bfloat16)
    engine = Engine(target)
    n_new = args.seq_len - args.prompt_len  # <bos> + prompt + continuation = seq_len + 1 tokens
    for split, n in (("train", args.sequences), ("val", max(args.batch, args.sequences // 50))):
        code = np.load(os.path.join(args.out, f"{split}.npy"))
        rng = np.random.default_rng([args.seed, 0 if split == "train" else 1])
        rows = []
        for b0 in tqdm(range(0, n, args.batch), desc=f"selfgen {split}", file=sys.stderr):
            m = min(args.batch, n - b0)
            starts = rng.integers(0, len(code) - args.prompt_len, m)
            prompts = [[BOS] + code[i : i + args.prompt_len].tolist() for i in starts]
            sampled = rng.random() < args.sample_frac
            res = engine.generate(
                prompts,
                max_new_tokens=n_new,
                temperature=args.temperature if sampled else 0.0,
                seed=int(rng.integers(1 << 31)),
                stop_token_ids=[],
            )
            rows.extend(p + t for p, t in zip(prompts, res.tokens))
        np.save(os.path.join(args.out, f"selfgen_{split}.npy"), np.asarray(rows, dtype=np.uint16))
        print(f"wrote {len(rows)} x {len(rows[0])} tokens to selfgen_{split}.npy", file=sys.stderr)


# ------------------------------------------------------------------------------------- decoding/acceptance


class CacheContext:
    """A minimal contiguous KV cache for one sequence (benchmarks, greedy decoding, acceptance measurement):
    ``begin(positions)`` before each forward; new K/V are appended; ``crop(n)`` rolls back to n tokens."""

    def __init__(self, cfg):
        self.cfg, self.k, self.v, self.pos = cfg, {}, {}, None

    def begin(self, positions: torch.Tensor):
        self.pos = positions

    def store(self, i, k, v):
        self.k[i] = k if i not in self.k else torch.cat([self.k[i], k])
        self.v[i] = v if i not in self.v else torch.cat([self.v[i], v])

    def crop(self, n: int):
        for i in self.k:
            self.k[i], self.v[i] = self.k[i][:n], self.v[i][:n]

    def attend(self, i, q, window):
        src = self.cfg.kv_source(i)
        k, v = self.k[src], self.v[src]
        kpos = torch.arange(k.shape[0])
        mask = kpos[None, :] <= self.pos[:, None]
        if window:
            mask &= kpos[None, :] > self.pos[:, None] - window
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            attn_mask=mask,
            scale=1.0,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        return o[0].transpose(0, 1)


@torch.no_grad()
def greedy_generate(target: Gemma4, prompt: list[int], n_new: int, stop: tuple[int, ...] = ()) -> list[int]:
    """Plain greedy decoding with :class:`CacheContext`; returns prompt + generated ids."""
    ctx = CacheContext(target.config)
    ids = list(prompt)
    new = torch.tensor(ids)
    for _ in range(n_new):
        start = len(ids) - len(new)
        pos = torch.arange(start, start + len(new))
        ctx.begin(pos)
        out = target.run(new, pos, ctx, logit_rows=slice(-1, None))
        t = int(out.logits[-1].argmax())
        ids.append(t)
        if t in stop:
            break
        new = torch.tensor([t])
    return ids


@torch.no_grad()
def draft_all_positions(target: Gemma4, asst: Gemma4Assistant, seq: list[int], k: int) -> torch.Tensor:
    """Greedy drafts ``[S, k]`` for every round start c (drafting from the accepted token at c) over a fixed
    sequence: step 1 reads embed(seq[c]) and the target's hidden at c-1, later steps their own previous draft."""
    x = torch.tensor([seq])
    S = x.shape[1]
    _, hidden, kv = target.forward_with_kv(x)
    H = hidden.shape[-1]
    pos = torch.arange(S)
    ctx = DraftDenseContext(asst.config.text, kv, pos[None])
    hid = torch.cat([torch.zeros(1, H, dtype=hidden.dtype), hidden[0, :-1]])
    tok = x[0]
    drafts = []
    for _ in range(k):
        logits, hid = asst.step(target.embed(tok), hid, pos, ctx)
        tok = logits.argmax(-1)
        drafts.append(tok)
    return torch.stack(drafts, 1)


def simulate_rounds(seq: list[int], drafts: torch.Tensor, start: int, k: int) -> list[int]:
    """Walk speculative rounds over the target's greedy sequence: from the last accepted position c, count the
    leading drafts equal to the target's tokens; the round emits n + 1 tokens. Returns n for every round."""
    out, c, end = [], start, len(seq) - 1
    while c < end:
        kk = min(k, end - c)
        n = 0
        while n < kk and int(drafts[c, n]) == seq[c + n + 1]:
            n += 1
        out.append(n)
        c += n + 1
    return out


def measure_acceptance(target, asst, prompts: list[list[int]], n_new: int, k: int) -> dict:
    """Greedy acceptance of ``asst`` drafting ``k`` tokens per round for ``target``'s greedy continuations."""
    accepted = []
    for p in prompts:
        seq = greedy_generate(target, p, n_new)
        drafts = draft_all_positions(target, asst, seq, k)
        accepted += simulate_rounds(seq, drafts, len(p) - 1, k)
    rounds = len(accepted)
    per_pos = [sum(n > i for n in accepted) / max(1, sum(n >= i for n in accepted)) for i in range(k)]
    return {
        "k": k,
        "rounds": rounds,
        "mean_accepted": round(sum(accepted) / max(1, rounds), 3),
        "tokens_per_round": round(1 + sum(accepted) / max(1, rounds), 3),
        "acceptance_rate": round(sum(accepted) / max(1, rounds * k), 3),
        "per_position": [round(r, 3) for r in per_pos],
    }


DEFAULT_PROMPTS = [
    "import os\nimport sys\n\n\ndef main():\n",
    "class Stack:\n    def __init__(self):\n",
    "def fibonacci(n):\n",
    '"""Utilities for parsing command line arguments."""\n\nimport re\n',
    "    def __repr__(self):\n        return",
    "for i in range(len(items)):\n",
    "try:\n    import _thread\nexcept ImportError:\n",
    "def read_config(path):\n    with open(path) as f:\n",
]


def cmd_accept(args) -> None:
    _setup(args)
    dt = torch.bfloat16 if args.dtype.startswith("bf16") else torch.float32
    target = load_target(args.target, dt)
    asst = load_assistant_dir(args.assistant, dt)
    tok = load_tokenizer(args.target)
    prompts = [tok.encode(p).ids for p in DEFAULT_PROMPTS]
    res = measure_acceptance(target, asst, prompts, args.new_tokens, args.k)
    print(json.dumps({"simple_loop": res}))
    if args.engine:  # the same prompts through minimtp's engine: acceptance and (noisy) wall-clock speed
        from minimtp.engine import Engine

        eng = Engine(target, asst)
        for _ in range(2):  # warm-up of every shape
            eng.generate(prompts[:1], max_new_tokens=16, num_speculative_tokens=args.k)
            eng.generate(prompts[:1], max_new_tokens=16, use_assistant=False)
        plain, spec = [], []
        for p in prompts:
            plain.append(eng.generate([p], max_new_tokens=args.new_tokens, use_assistant=False, stop_token_ids=[]))
            spec.append(
                eng.generate([p], max_new_tokens=args.new_tokens, num_speculative_tokens=args.k, stop_token_ids=[])
            )
        same = all(a.tokens == b.tokens for a, b in zip(plain, spec))
        acc = sum(r.stats.accepted for r in spec) / max(1, sum(r.stats.drafted for r in spec))
        rounds = sum(r.stats.draft_rounds for r in spec)
        out = {
            "k": args.k,
            "identical_to_plain": same,
            "acceptance_rate": round(acc, 3),
            "mean_acceptance_length": round(1 + sum(r.stats.accepted for r in spec) / max(1, rounds), 3),
            "plain_s": round(sum(r.stats.elapsed_s for r in plain), 3),
            "spec_s": round(sum(r.stats.elapsed_s for r in spec), 3),
        }
        out["speedup"] = round(out["plain_s"] / out["spec_s"], 3)
        print(json.dumps({"engine": out}))


# ---------------------------------------------------------------------------------------------------- bench


def _median_ms(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


@torch.no_grad()
def bench_target(cfg, dtype, past: int = 256, ks=(1, 2, 3, 5), reps: int = 30, rounds: int = 3) -> dict:
    """Median latency (ms) of a k-token cached forward (logits for all k rows) after ``past`` cached tokens."""
    torch.manual_seed(0)
    model = Gemma4(cfg)
    init_weights(model)
    model = model.to(dtype).eval()
    ctx = CacheContext(cfg)
    ids = torch.randint(5, cfg.vocab_size, (past + max(ks),))
    ctx.begin(torch.arange(past))
    model.run(ids[:past], torch.arange(past), ctx, logit_rows="all")

    def step(k):
        pos = torch.arange(past, past + k)
        ctx.begin(pos)
        model.run(ids[past : past + k], pos, ctx, logit_rows="all")
        ctx.crop(past)

    for k in ks:  # warm-up every shape (oneDNN builds primitives per shape)
        for _ in range(10):
            step(k)
    res = {k: [] for k in ks}
    for _ in range(rounds):  # interleave shapes against drift
        for k in ks:
            res[k].append(_median_ms(lambda k=k: step(k), reps))
    return {k: statistics.median(v) for k, v in res.items()}


@torch.no_grad()
def bench_assistant(tcfg, acfg: AssistantConfig, dtype, past: int = 256, reps: int = 50) -> float:
    torch.manual_seed(0)
    target = Gemma4(tcfg)
    init_weights(target)
    target = target.to(dtype).eval()
    asst = Gemma4Assistant(acfg)
    init_weights(asst)
    asst = asst.to(dtype).eval()
    ids = torch.randint(5, tcfg.vocab_size, (1, past))
    _, hidden, kv = target.forward_with_kv(ids)
    ctx = DraftDenseContext(acfg.text, kv, torch.tensor([[past]]))
    emb, h = target.embed(ids[0, -1:]), hidden[0, -1:]
    pos = torch.tensor([past])

    def step():
        logits, nh = asst.step(emb, h, pos, ctx)
        logits.argmax(-1)

    for _ in range(20):
        step()
    return statistics.median(_median_ms(step, reps) for _ in range(3))


def cmd_bench(args) -> None:
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads or 1)
    cfg = parse_text_config(target_config_dict(args))
    model = Gemma4(cfg)
    n = count_params(model)
    out = {"params_M": round(n / 1e6, 2), "threads": torch.get_num_threads(), "past": args.past}
    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        r = bench_target(cfg, dt, args.past)
        out[name] = {f"k{k}_ms": round(v, 3) for k, v in r.items()}
        out[name].update({f"k{k}_ratio": round(v / r[1], 3) for k, v in r.items() if k != 1})
        if args.assistant_layers:
            a = argparse.Namespace(
                hidden=args.assistant_hidden,
                intermediate=4 * args.assistant_hidden,
                layers=args.assistant_layers,
                pattern="s" * (args.assistant_layers - 1) + "f",
                heads=args.assistant_heads,
            )
            acfg = parse_assistant_dict(assistant_config_dict(a, cfg))
            out[name]["assistant_step_ms"] = round(bench_assistant(cfg, acfg, dt, args.past), 3)
    print(json.dumps(out))


# --------------------------------------------------------------------------------------------------- report


def plot_report(run_dir: str, path: str | None = None) -> str | None:
    """Loss curves (train, smoothed; validation) and, for assistants, per-step top-1 agreement, as a PNG."""
    recs = _Log(os.path.join(run_dir, "log.jsonl")).read()
    if not recs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in recs]
    loss = [r["loss"] for r in recs]
    w = max(1, len(loss) // 50)
    smooth = [sum(loss[max(0, i - w + 1) : i + 1]) / len(loss[max(0, i - w + 1) : i + 1]) for i in range(len(loss))]
    val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    agree = sorted(k for k in recs[-1] if k.startswith("val_top1_"))
    ncols = 2 if agree else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot(steps, loss, alpha=0.25, label="train (per step)")
    ax.plot(steps, smooth, label=f"train (mean of {w})")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(os.path.basename(os.path.normpath(run_dir)))
    ax.grid(alpha=0.3)
    ax.legend()
    if agree:
        ax = axes[0][1]
        for key in agree:
            pts = [(r["step"], r[key]) for r in recs if key in r]
            ax.plot(*zip(*pts), "o-", label=f"draft step {key.rsplit('_', 1)[1]}")
        ax.set_xlabel("step")
        ax.set_ylabel("top-1 agreement with the target (validation)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = path or os.path.join(run_dir, "report.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cmd_report(args) -> None:
    print(plot_report(args.out, args.png))


def cmd_export(args) -> None:
    """Export a run's latest checkpoint (target or assistant) as a Hugging Face directory."""
    with open(os.path.join(args.out, "ckpt", "state.json")) as f:
        state = json.load(f)
    with open(os.path.join(args.out, "args.json")) as f:
        run_args = argparse.Namespace(**json.load(f))
    if state["kind"] == "target":
        model = Gemma4(parse_text_config(state["config"]))
        load_checkpoint(args.out, model)
        info = _target_info(args.out, run_args, model, state["data"])
        export_target(model, state["config"], os.path.join(args.out, "tokenizer"), args.to, info)
    else:
        model = Gemma4Assistant(parse_assistant_dict(state["config"]))
        load_checkpoint(args.out, model)
        recs = _Log(os.path.join(args.out, "log.jsonl")).read()
        vals = [r for r in recs if "val_loss" in r]
        info = {
            "params": count_params(model),
            "steps": state["step"],
            "train_minutes": round(sum(r["s"] for r in recs) / 60, 1),
            "final_val": {k: v for k, v in vals[-1].items() if k.startswith("val_")} if vals else {},
            "args": vars(run_args),
        }
        export_assistant(model, state["config"], args.to, run_args.draft_tokens, info)
    print(f"step {state['step']} -> {args.to}")


# ------------------------------------------------------------------------------------------------------ CLI


def _common(p, steps, bs, seq, lr):
    p.add_argument("--out", required=True, help="run directory (checkpoints, logs, final export)")
    p.add_argument("--steps", type=int, default=steps, help="maximum number of steps")
    p.add_argument("--minutes", type=float, default=0, help="time budget: cosine schedule over M compute minutes")
    p.add_argument("--batch-size", type=int, default=bs)
    p.add_argument("--seq-len", type=int, default=seq)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt if present")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "bf16-weights"])
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--ckpt-minutes", type=float, default=3.0)
    p.add_argument("--chat-frac", type=float, default=0.1, help="share of rows drawn from the chat stream")
    p.add_argument("--max-files", type=int, default=None, help="use only the first N stdlib files (tests)")


def _target_shape(p):
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--pattern", default="ssf", help="layer types, s=sliding f=full, repeated; last is full")
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--global-head-dim", type=int, default=128)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--max-positions", type=int, default=4096)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m minimtp.train", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("tokenizer", help="train the byte-level BPE on the stdlib")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--max-files", type=int, default=None)
    p.set_defaults(func=cmd_tokenizer)

    p = sub.add_parser("target", help="pre-train the target")
    _common(p, 1500, 16, 512, 2e-3)
    _target_shape(p)
    p.add_argument("--tokenizer", default=None, help="directory with a trained tokenizer (else train one)")
    p.set_defaults(func=cmd_target)

    p = sub.add_parser("assistant", help="distil the assistant against a frozen target")
    _common(p, 500, 16, 256, 2e-3)
    p.add_argument("--target", required=True, help="the target's Hugging Face directory")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--pattern", default="sf")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--draft-steps", type=int, default=4, help="recurrent steps trained per position")
    p.add_argument("--draft-tokens", type=int, default=4, help="num_assistant_tokens written to generation_config")
    p.add_argument("--init-from-target", action="store_true", help="copy the target embedding when sizes match")
    p.add_argument("--init-from", default=None, help="warm start from an assistant directory of the same shape")
    p.add_argument("--init-layers", default=None, help="with --init-from: source layers to keep, e.g. '1'")
    p.add_argument("--selfgen-frac", type=float, default=0.0, help="share of rows from the target's continuations")
    p.add_argument("--selfgen-data", default=None, help="data directory written by `selfgen` (default OUT/data)")
    p.set_defaults(func=cmd_assistant)

    p = sub.add_parser("selfgen", help="the frozen target's own continuations of corpus prompts (distillation data)")
    p.add_argument("--target", required=True, help="the target's Hugging Face directory")
    p.add_argument("--out", required=True, help="data directory (the tokenized corpus is written there too)")
    p.add_argument("--sequences", type=int, default=1024)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256, help="row length - 1 (the assistant's --seq-len)")
    p.add_argument("--sample-frac", type=float, default=0.25, help="share of batches sampled instead of greedy")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--max-files", type=int, default=None)
    p.set_defaults(func=cmd_selfgen)

    p = sub.add_parser("export", help="Hugging Face directory from a run's latest checkpoint")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--to", required=True, help="destination directory")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("accept", help="greedy acceptance of a pair (simple drafting loop)")
    p.add_argument("--target", required=True)
    p.add_argument("--assistant", required=True)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--dtype", default="fp32", choices=["bf16", "fp32"])
    p.add_argument("--engine", action="store_true", help="also run minimtp.engine (acceptance, plain vs spec time)")
    p.set_defaults(func=cmd_accept)

    p = sub.add_parser("bench", help="1-token vs k-token forward latency, 1 thread, bf16 and fp32")
    _target_shape(p)
    p.add_argument("--past", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--assistant-layers", type=int, default=0)
    p.add_argument("--assistant-hidden", type=int, default=256)
    p.add_argument("--assistant-heads", type=int, default=4)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("report", help="redraw the loss curves of a run")
    p.add_argument("--out", required=True)
    p.add_argument("--png", default=None)
    p.set_defaults(func=cmd_report)

    args = ap.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()


__all__ = [
    "train_tokenizer",
    "read_corpus",
    "prepare_data",
    "Batches",
    "target_config_dict",
    "assistant_config_dict",
    "distill_loss",
    "measure_acceptance",
    "greedy_generate",
    "export_target",
    "export_assistant",
    "load_target",
    "load_assistant_dir",
]
