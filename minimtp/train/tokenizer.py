"""The byte-level BPE tokenizer: trained on the corpus, saved with a minimal Gemma-style chat template."""

from __future__ import annotations

import json
import os
import time

from minimtp.train.corpus import BOS, SPECIAL_TOKENS, read_corpus

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


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
    """A ``tokenizers.Tokenizer`` from a directory holding ``tokenizer.json`` (or from the file itself)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path)


def cmd_tokenizer(args) -> None:
    """``tokenizer``: train the BPE on the corpus and print the corpus record."""
    info, train, _ = read_corpus(max_files=args.max_files)
    t = time.time()
    train_tokenizer(train, args.vocab, args.out)
    print(json.dumps(info, indent=2))
    print(f"tokenizer ({args.vocab}) trained in {time.time() - t:.1f} s -> {args.out}")
