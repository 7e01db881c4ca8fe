"""``python -m minimtp.generate``: generate text with a Gemma 4 target, sped up by its assistant.

With no model flags the embedded default pair (``minimtp/default_model``) is used. Decoding runs on
``minimtp.fast.FastEngine`` (the reference Engine with the CPU fast twins); ``--reference`` runs the pure reference.
Tokens are streamed as they are accepted; a stats line follows on stderr (acceptance as llama.cpp prints it:
"a accepted / g drafted"). Errors print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from minimtp.controls.stop_strings import StopStrings, TextStream
from minimtp.errors import GenerationError, MinimtpError
from minimtp.flags import add_pair_flags, load_pair, pair_dirs, sampling_settings
from minimtp.settings import GenerationSettings
from minimtp.tokenizer import load_tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minimtp.generate", description=__doc__.split("\n\n")[0])
    add_pair_flags(p)
    p.add_argument("--prompt", help="the prompt text (default: --prompt-file, else stdin)")
    p.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (the default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None, help="transformers' definition (1 = off)")
    p.add_argument("--presence-penalty", type=float, default=None, help="OpenAI's definition, in [-2, 2]")
    p.add_argument("--frequency-penalty", type=float, default=None, help="OpenAI's definition, in [-2, 2]")
    p.add_argument("--stop", action="append", default=None, help="stop at this text (repeatable); not printed")
    p.add_argument("--include-stop-str-in-output", action="store_true", help="print the stop string too")
    p.add_argument("--json-schema", metavar="FILE", help="constrain the output to this JSON Schema")
    p.add_argument("--regex", help="constrain the output to this regular expression")
    p.add_argument("--grammar", metavar="FILE", help="constrain the output to this Lark or GBNF grammar")
    p.add_argument(
        "--token-healing",
        choices=["auto", "on", "off"],
        default="auto",
        help="re-spell the prompt's last token (auto: on for the embedded model without a grammar)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    return p


def control_settings(args, embedded: bool) -> dict:
    """GenerationSettings fields of the penalties, stops, grammar and token healing flags (files read here)."""

    def read(path, what):
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise GenerationError(f"{path}: cannot read the {what} file ({e.strerror})") from None

    kw = dict(presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty, regex=args.regex)
    kw.update(stop=args.stop, include_stop_str_in_output=args.include_stop_str_in_output)
    if args.json_schema:
        text = read(args.json_schema, "JSON Schema")
        try:
            kw["json_schema"] = json.loads(text)
        except ValueError as e:
            raise GenerationError(f"{args.json_schema}: not valid JSON ({e})") from None
    if args.grammar:
        kw["grammar"] = read(args.grammar, "grammar")
    constrained = any(kw.get(k) is not None for k in ("json_schema", "regex", "grammar"))
    kw["token_healing"] = args.token_healing == "on" or (args.token_healing == "auto" and embedded and not constrained)
    return kw


def read_prompt(args) -> str:
    if args.prompt is not None:
        text = args.prompt
    elif args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise GenerationError(f"{args.prompt_file}: cannot read the prompt file ({e.strerror})") from None
    elif not sys.stdin.isatty():
        text = sys.stdin.read()
    else:
        raise GenerationError("no prompt: pass --prompt TEXT, --prompt-file FILE or pipe text on stdin")
    if not text:
        raise GenerationError("the prompt is empty")
    return text


def encode(tok, text: str, chat: bool) -> list[int]:
    if chat:
        if not getattr(tok, "chat_template", None):
            raise GenerationError("--chat: the tokenizer has no chat_template")
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tok(text)["input_ids"])


def stats_line(s) -> str:
    line = f"[{s.generated_tokens} tokens, {s.tokens_per_second:.1f} tok/s, TTFT {s.ttft_s * 1000:.0f} ms"
    if s.drafted:
        line += (
            f", draft acceptance rate {s.acceptance_rate:.3f} ({s.accepted} accepted / {s.drafted} drafted)"
            f", mean acceptance length {s.mean_acceptance_length:.2f}"
        )
    return line + f", {s.target_steps} target steps]"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except MinimtpError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `... | head`: the reader left; exit quietly like other Unix tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def run(args) -> int:
    """Load, encode, generate, print: the command behind :func:`main`."""
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir, asst_dir = pair_dirs(args)
    prompt = read_prompt(args)
    tok = load_tokenizer(model_dir)
    _, assistant, engine = load_pair(model_dir, asst_dir, args, tokenizer=tok)
    ids = encode(tok, prompt, args.chat)
    sampling, settings_line = sampling_settings(args, model_dir)
    controls = control_settings(args, embedded=args.model is None)
    settings = GenerationSettings.of(
        max_new_tokens=args.max_new_tokens,
        num_speculative_tokens=args.num_speculative_tokens,
        seed=args.seed,
        **sampling,
        **controls,
    )
    # token healing: the first tokens re-spell the removed last prompt token (a special token decodes to "")
    healed = tok.decode(ids[-1:], skip_special_tokens=True) if settings.token_healing and len(ids) > 1 else ""
    shown = TextStream(StopStrings(tok, args.stop or [], args.include_stop_str_in_output, healed))
    generated: list[int] = []

    def stream(_i, new):
        generated.extend(new)
        sys.stdout.write(shown.delta(generated))
        sys.stdout.flush()

    res = engine.generate([ids], settings=settings, on_tokens=None if args.json else stream)
    s = res.stats
    if args.json:
        k = (args.num_speculative_tokens or engine.default_num_speculative_tokens) if assistant else 0
        out = {
            "text": res.texts[0],
            "token_ids": res.tokens[0],
            "prompt_token_ids": ids,
            "finish_reason": res.finish_reasons[0],
            "stop_reason": res.stop_reasons[0],
            "settings": sampling,
            "token_healing": settings.token_healing,
            "stats": {
                "tokens_per_second": s.tokens_per_second,
                "mean_acceptance_length": s.mean_acceptance_length,
                "acceptance_rate": s.acceptance_rate,
                "accepted": s.accepted,
                "drafted": s.drafted,
                "target_steps": s.target_steps,
                "ttft_s": s.ttft_s,
                "generated_tokens": s.generated_tokens,
                "elapsed_s": s.elapsed_s,
                "per_position_acceptance": s.per_position_acceptance,
                "num_speculative_tokens": k,
            },
        }
        print(json.dumps(out))
    else:
        sys.stdout.write(shown.delta(generated, final=True) + "\n")
        sys.stdout.flush()
        print(settings_line, file=sys.stderr)
        print(stats_line(s), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
