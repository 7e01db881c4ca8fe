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

DEFAULT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_model")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minimtp.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="local Gemma 4 checkpoint directory (default: the embedded model)")
    p.add_argument("--assistant", help="local Gemma 4 assistant directory (default: the embedded assistant)")
    p.add_argument("--no-assistant", action="store_true", help="plain decoding, no speculation")
    p.add_argument("--prompt", help="the prompt text (default: --prompt-file, else stdin)")
    p.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument(
        "--num-speculative-tokens",
        "-k",
        type=int,
        default=None,
        help="drafts per round (default: the assistant's num_assistant_tokens, else 6)",
    )
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (the default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--generation-config",
        default="minimtp",
        help="auto: sampling defaults from the model's generation_config.json (flags still win); a directory: from "
        "its generation_config.json; minimtp (default): greedy unless flags say otherwise",
    )
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
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto (the checkpoint's dtype)")
    p.add_argument(
        "--draft-dtype",
        default="auto",
        help="assistant dtype: float32 | bfloat16 | float16 | int8 (weight-only, a fast-path twin) | auto (int8 on "
        "CPU for a 16-bit target, else the target's dtype; the target's dtype with --reference)",
    )
    p.add_argument(
        "--reference",
        action="store_true",
        help="run the pure PyTorch reference (minimtp.Engine) instead of the CPU fast path (minimtp.fast.FastEngine)",
    )
    p.add_argument("--draft-mode", choices=["argmax", "sample"], default="argmax")
    p.add_argument("--attention", choices=["torch", "triton"], default="torch", help="paged-attention backend")
    p.add_argument("--verifier", choices=["torch", "triton"], default="torch", help="verification backend")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    return p


def _checkpoint_dtype(model_dir: str) -> str:
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return "float32"
    dt = cfg.get("dtype") or cfg.get("torch_dtype") or (cfg.get("text_config") or {}).get("dtype")
    return dt if dt in ("float32", "bfloat16", "float16") else "float32"


def draft_dtype(arg: str, target, reference: bool = False) -> str | None:
    """The assistant's dtype. ``auto``: weight-only ``int8`` on CPU when the target runs in 16 bits, else the target's
    dtype (None). A draft step is a chain of one-row matmuls that stream every drafter weight once, so on a CPU its
    cost follows the bytes of the weights: int8 halves them (measured: docs/benchmarks.md). The drafter only
    proposes; the target's distribution is untouched (docs: concepts/speculative-decoding). int8 is a fast-path
    twin (``minimtp.fast``): the reference drafts in a float dtype."""
    import torch

    from minimtp.errors import GenerationError

    if arg == "int8" and reference:
        raise GenerationError(
            "--draft-dtype int8 needs the fast path: drop --reference, or pick float32/bfloat16/float16"
        )
    if arg != "auto":
        return arg
    w = target.model.embed_tokens.weight
    fast_cpu = not reference and w.device.type == "cpu"
    return "int8" if (fast_cpu and w.dtype in (torch.bfloat16, torch.float16)) else None


SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def sampling_settings(args, model_dir: str) -> tuple[dict, str]:
    """The sampling keywords for Engine.generate and a line saying where they came from: the flags, else (with
    ``--generation-config auto`` or DIR) the model's ``generation_config.json`` (transformers' keys; vLLM's flag),
    else greedy. ``do_sample: false`` there means greedy, as in transformers."""
    from minimtp.errors import ConfigError

    given = {k: getattr(args, k) for k in SAMPLING_KEYS if getattr(args, k) is not None}
    found: dict = {}
    if args.generation_config != "minimtp":
        d = model_dir if args.generation_config == "auto" else args.generation_config
        path = os.path.join(d, "generation_config.json")
        try:
            with open(path, encoding="utf-8") as f:
                gc = json.load(f)
        except FileNotFoundError:
            gc = {} if args.generation_config == "auto" else None
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: cannot read the generation config ({e})") from None
        if gc is None:
            raise ConfigError(f"{path}: no such file (--generation-config takes auto, minimtp or a directory)")
        found = {k: gc[k] for k in SAMPLING_KEYS if gc.get(k) is not None}
        used = ", ".join(found)
        if gc.get("do_sample") is True and "temperature" not in found:  # transformers' default temperature
            found, used = {"temperature": 1.0, **found}, ", ".join(["do_sample=true", *found])
        if gc.get("do_sample") is False:
            found, used = {"temperature": 0.0}, "do_sample=false"
    settings = {**found, **given}
    shown = ", ".join(f"{k}={v}" for k, v in settings.items() if k != "temperature" or v) or "greedy"
    if settings.get("temperature", 0) == 0 and shown != "greedy":
        shown = "greedy, " + shown
    src = [f"{used} from generation_config.json"] if found else []
    src += ["flags"] if given else []
    return settings, f"[settings: {shown} ({'; '.join(src) or 'defaults'})]"


def control_settings(args, embedded: bool) -> dict:
    """Engine.generate keywords of the penalties, stops, grammar and token healing flags (files read here)."""
    from minimtp.errors import GenerationError

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


def load_pair(model_dir: str, asst_dir: str | None, args):
    """(target, assistant or None, engine) as the flags ask: ``--dtype``, ``--draft-dtype``, ``--reference``,
    ``--attention``; shared with ``python -m minimtp.bench``."""
    from minimtp import Engine, load_assistant, load_target
    from minimtp.fast import FastEngine

    dtype = _checkpoint_dtype(model_dir) if args.dtype == "auto" else args.dtype
    target = load_target(model_dir, dtype=dtype)
    want = draft_dtype(args.draft_dtype, target, args.reference)
    assistant = None
    if asst_dir:  # an int8 drafter is quantized from its bfloat16 weights by the fast path
        assistant = load_assistant(asst_dir, target, dtype="bfloat16" if want == "int8" else want)
    kw = dict(attention_backend=args.attention, verify_backend=getattr(args, "verifier", "torch"))
    kw["draft_mode"] = getattr(args, "draft_mode", "argmax")
    if args.reference:
        return target, assistant, Engine(target, assistant, **kw)
    return target, assistant, FastEngine(target, assistant, draft_dtype="int8" if want == "int8" else None, **kw)


def load_tokenizer(model_dir: str):
    """The tokenizer of a model directory (``tokenizer.json`` via transformers; never downloads)."""
    from minimtp.errors import ConfigError

    if not os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
        raise ConfigError(f"{model_dir}: no tokenizer.json (the CLI takes the tokenizer from the model directory)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # transformers raises many types; report one line
        msg = str(e).splitlines()[0] if str(e) else ""
        raise ConfigError(f"{model_dir}: cannot load the tokenizer ({type(e).__name__}: {msg})") from None


def read_prompt(args) -> str:
    from minimtp.errors import GenerationError

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
    from minimtp.errors import GenerationError

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
        import torch

        from minimtp.errors import MinimtpError
    except ImportError as e:  # pragma: no cover
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return _run(args, torch)
    except MinimtpError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `... | head`: the reader left; exit quietly like other Unix tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _run(args, torch) -> int:
    from minimtp.errors import ConfigError

    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = args.model or os.path.join(DEFAULT_DIR, "target")
    asst_dir = None
    if not args.no_assistant:
        asst_dir = args.assistant or (None if args.model else os.path.join(DEFAULT_DIR, "assistant"))
    if args.model is None and not os.path.isdir(model_dir):
        raise ConfigError(f"{model_dir}: the embedded default model is missing from this install; pass --model DIR")
    for d, what in ((model_dir, "model"), (asst_dir, "assistant")):
        if d is not None and not os.path.isdir(d):
            raise ConfigError(f"{d}: no such {what} directory")
    prompt = read_prompt(args)
    tok = load_tokenizer(model_dir)
    target, assistant, engine = load_pair(model_dir, asst_dir, args)
    ids = encode(tok, prompt, args.chat)
    settings, settings_line = sampling_settings(args, model_dir)
    controls = control_settings(args, embedded=args.model is None)
    engine._tokenizer = tok
    from minimtp.stop_strings import StopStrings, TextStream

    # token healing: the first tokens re-spell the removed last prompt token (a special token decodes to "")
    healed = tok.decode(ids[-1:], skip_special_tokens=True) if controls["token_healing"] and len(ids) > 1 else ""
    shown = TextStream(StopStrings(tok, args.stop or [], args.include_stop_str_in_output, healed))
    generated: list[int] = []

    def stream(_i, new):
        generated.extend(new)
        sys.stdout.write(shown.delta(generated))
        sys.stdout.flush()

    res = engine.generate(
        [ids],
        max_new_tokens=args.max_new_tokens,
        num_speculative_tokens=args.num_speculative_tokens,
        seed=args.seed,
        on_tokens=None if args.json else stream,
        **settings,
        **controls,
    )
    s = res.stats
    if args.json:
        out = {
            "text": res.texts[0],
            "token_ids": res.tokens[0],
            "prompt_token_ids": ids,
            "finish_reason": res.finish_reasons[0],
            "stop_reason": res.stop_reasons[0],
            "settings": settings,
            "token_healing": controls["token_healing"],
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
                "num_speculative_tokens": (
                    (args.num_speculative_tokens or engine.default_num_speculative_tokens) if assistant else 0
                ),
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
