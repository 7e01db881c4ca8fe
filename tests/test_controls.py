"""Controls (minimtp/controls/: penalties, logits, grammar, token_healing, stop_strings; seeds in sampling.py):
unit tests on tiny vocabularies, then deterministic engine-level tests on the embedded pair (speculative == plain
under every control; stop strings only truncate; per-prompt seeds). The statistical tests are in
test_controls_exact.py and test_controls_distribution.py."""

from __future__ import annotations

import itertools
import json
import math
import random
import re

import pytest
import torch
from support.common import default_pair, one_line_error
from support.tokenizer import char_tokenizer

import minimtp
from minimtp.controls import Controls, Penalties, apply_penalties, make_controls
from minimtp.controls.grammar import Grammar, check_schema_keys, grammar_source
from minimtp.controls.stop_strings import StopStrings, check_stop_strings
from minimtp.controls.token_healing import TokenHealing, heal_prompt, vocab_bytes
from minimtp.errors import GenerationError
from minimtp.sampling import make_generators

# ---------------------------------------------------------------------------------------------------------------
# 1. Penalties
# ---------------------------------------------------------------------------------------------------------------


def _random_row(gen: torch.Generator, V: int) -> torch.Tensor:
    x = torch.randn(V, generator=gen) * 3
    x[torch.randint(V, (5,), generator=gen)] = 0.0  # exact zeros: neither side of the sign test
    x[torch.randint(V, (2,), generator=gen)] = -math.inf  # masked tokens stay masked
    return x


@pytest.mark.parametrize("r", [0.5, 1.0, 1.3, 2.0])
def test_repetition_penalty_equals_transformers(r):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    gen, V = torch.Generator().manual_seed(0), 97
    proc = RepetitionPenaltyLogitsProcessor(r)
    for _ in range(20):
        x = _random_row(gen, V)
        prompt = torch.randint(V, (int(torch.randint(1, 12, (1,), generator=gen)),), generator=gen)
        generated = torch.randint(V, (int(torch.randint(0, 12, (1,), generator=gen)),), generator=gen)
        want = proc(torch.cat([prompt, generated])[None], x[None].clone())[0]
        got = apply_penalties(x, prompt, generated, Penalties(repetition=r))
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("presence, frequency", [(0.7, 0.0), (0.0, 0.4), (1.5, -0.5), (-2.0, 2.0)])
def test_presence_and_frequency_are_the_openai_formula_over_generated_tokens(presence, frequency):
    gen, V = torch.Generator().manual_seed(1), 50
    for _ in range(20):
        x = torch.randn(V, generator=gen, dtype=torch.float64)
        prompt = torch.randint(V, (8,), generator=gen)
        generated = torch.randint(V, (int(torch.randint(0, 15, (1,), generator=gen)),), generator=gen)
        want = x.clone()
        for i in range(V):
            c = int((generated == i).sum())  # prompt tokens are not counted
            want[i] = x[i] - frequency * c - presence * (c > 0)
        got = apply_penalties(x, prompt, generated, Penalties(presence=presence, frequency=frequency))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        # a token only in the prompt is untouched by presence / frequency
        only_prompt = [int(t) for t in prompt if t not in generated.tolist()]
        assert all(got[t] == x[t] for t in only_prompt)


def test_all_three_penalties_compose_in_order():
    gen, V = torch.Generator().manual_seed(2), 40
    x = torch.randn(V, generator=gen)
    prompt, generated = torch.tensor([1, 2, 3]), torch.tensor([3, 3, 4, 5, 5, 5])
    pen = Penalties(1.4, 0.3, 0.2)
    rep = torch.where(x > 0, x / 1.4, x * 1.4)
    seen = torch.zeros(V, dtype=torch.bool)
    seen[[1, 2, 3, 4, 5]] = True
    counts = torch.bincount(generated, minlength=V).float()
    want = torch.where(seen, rep, x) - 0.2 * counts - 0.3 * (counts > 0).float()
    torch.testing.assert_close(apply_penalties(x, prompt, generated, pen), want)
    # Controls applies them row by row, each row with its own history
    c = Controls([1, 2, 3], pen)
    rows = c(torch.stack([x, x]), [[], generated.tolist()])
    torch.testing.assert_close(rows[0], apply_penalties(x, prompt, torch.tensor([], dtype=torch.long), pen))
    torch.testing.assert_close(rows[1], want)


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(repetition=0.0), "repetition_penalty=0.0"),
        (dict(repetition=-1.0), "repetition_penalty=-1.0"),
        (dict(repetition=float("nan")), "repetition_penalty=nan"),
        (dict(repetition=float("inf")), "repetition_penalty=inf"),
        (dict(repetition=True), "repetition_penalty=True"),
        (dict(presence=3), "presence_penalty=3"),
        (dict(presence=float("nan")), "presence_penalty=nan"),
        (dict(frequency=-2.5), "frequency_penalty=-2.5"),
        (dict(frequency="1"), "frequency_penalty='1'"),
    ],
)
def test_penalty_validation(kw, field):
    with pytest.raises(GenerationError) as e:
        Penalties(**kw).validate()
    one_line_error(e, field)


def test_penalties_at_the_bounds_are_valid():
    for kw in (dict(presence=2), dict(presence=-2), dict(frequency=2.0), dict(repetition=1e-3)):
        Penalties(**kw).validate()
    assert not Penalties().active and Penalties(presence=0.1).active


# ---------------------------------------------------------------------------------------------------------------
# 2. Grammars (llguidance) on a character-level tokenizer
# ---------------------------------------------------------------------------------------------------------------

TOKS = ["<eos>", "a", "b", "c", "ab", "bc", "ca", "abc", "cc", "bca", "d", "<pad>"]
EOS = 0


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer(TOKS)


def make_grammar(tok, **kw) -> Grammar:
    return Grammar(tok, grammar_source(**kw), len(TOKS), [EOS])


def text_of(tokens: list[int]) -> str:
    return "".join(TOKS[t] for t in tokens)


def test_grammar_allows_exactly_the_prefixes_of_the_language(tok):
    """Brute force: after g, token t is allowed iff text(g + [t]) is a prefix of a string of (ab|c){1,3}; the end
    token iff text(g) is in the language. Visited in a scrambled order on ONE Grammar (rollbacks everywhere)."""
    lang = {"".join(p) for n in (1, 2, 3) for p in itertools.product(["ab", "c"], repeat=n)}
    prefixes = {s[:i] for s in lang for i in range(len(s) + 1)}
    normal = [t for t, s in enumerate(TOKS) if not s.startswith("<")]
    valid, frontier = [[]], [[]]
    while frontier:  # every token sequence whose text stays a prefix
        frontier = [g + [t] for g in frontier for t in normal if text_of(g + [t]) in prefixes]
        valid += frontier
    invalid = [g + [t] for g in valid for t in normal if text_of(g + [t]) not in prefixes]
    histories = valid + invalid + [g + [EOS] for g in valid if text_of(g) in lang]
    assert len(valid) > 50 and len(invalid) > 100
    random.Random(0).shuffle(histories)
    g = make_grammar(tok, regex="(ab|c){1,3}")
    for h in histories:
        mask = g.allowed(h)
        if h not in valid:
            assert mask is None, (text_of(h), h)
            continue
        want = [text_of(h + [t]) in prefixes for t in range(len(TOKS))]
        want[EOS] = text_of(h) in lang
        want[TOKS.index("<pad>")] = False
        assert mask.tolist() == want, text_of(h)


def _random_histories(rng: random.Random, n: int) -> list[list[int]]:
    """Histories for the regex [abc]{0,120}d: long valid ones (past Grammar.KEEP masks), branches off each other,
    ones that break the grammar (too long, token after "d", after the end token)."""
    letters = [t for t, s in enumerate(TOKS) if s and set(s) <= set("abc")]
    out = []
    base = []
    while len(text_of(base)) < 126:
        base.append(rng.choice(letters[:3] if rng.random() < 0.7 else letters))
    for _ in range(n):
        cut = rng.randrange(len(base) + 1)
        h = base[:cut]
        kind = rng.random()
        if kind < 0.3:  # a branch off the base
            h = h + [rng.choice(letters) for _ in range(rng.randrange(4))]
        elif kind < 0.45:
            h = h + [TOKS.index("d")] + ([rng.choice(letters)] if rng.random() < 0.5 else [])
        elif kind < 0.55:
            h = h + [EOS] + [rng.choice(letters) for _ in range(rng.randrange(2))]
        elif kind < 0.6:
            h = h + [TOKS.index("<pad>")]
        out.append(h)
    return out


def test_grammar_mask_is_a_pure_function_of_the_history(tok):
    rng = random.Random(1)
    histories = _random_histories(rng, 150)
    assert max(len(h) for h in histories) > Grammar.KEEP
    cached = make_grammar(tok, regex="[abc]{0,120}d")
    seen_none = seen_mask = 0
    for h in histories:
        got, want = cached.allowed(h), make_grammar(tok, regex="[abc]{0,120}d").allowed(h)
        assert (got is None) == (want is None), text_of(h)
        if got is not None:
            assert torch.equal(got, want), text_of(h)
            seen_mask += 1
        else:
            seen_none += 1
    assert seen_none > 10 and seen_mask > 50
    # the same history twice in a row, and after a longer one: the same mask
    h = histories[0][:10]
    assert torch.equal(cached.allowed(h), cached.allowed(list(h)))


def test_grammar_is_none_after_an_end_token_or_a_forbidden_token(tok):
    g = make_grammar(tok, regex="(ab|c){1,3}")
    c, ab, b = TOKS.index("c"), TOKS.index("ab"), TOKS.index("b")
    assert g.allowed([c])[EOS]
    assert g.allowed([c, EOS]) is None
    assert g.allowed([c, EOS, c]) is None
    assert g.allowed([b]) is None  # "b" is not a prefix
    assert g.allowed([b, ab]) is None
    assert g.allowed([c, c, c, c]) is None  # 4 repetitions
    assert g.allowed([c, c, c]).tolist() == [t == EOS for t in range(len(TOKS))]  # complete, nothing extends it
    assert g.allowed([]) is not None and not g.allowed([])[EOS]


def test_gbnf_grammar_is_accepted():
    toks = ["<eos>", "a", "1", "2", "a1", "12", "b"]
    tk = char_tokenizer(toks)
    g = Grammar(tk, grammar_source(grammar='root ::= "a" [0-9]+'), len(toks), [0])

    def allowed(h):
        return [toks[i] for i, ok in enumerate(g.allowed(h).tolist()) if ok]

    assert allowed([]) == ["a", "a1"]
    assert allowed([1]) == ["1", "2", "12"]
    assert allowed([1, 2]) == ["<eos>", "1", "2", "12"]
    assert allowed([4, 5]) == ["<eos>", "1", "2", "12"]
    assert g.allowed([6]) is None


def test_lark_grammar_masks(tok):
    g = make_grammar(tok, grammar='start: "ab" tail\ntail: "c" | "d"\n')
    allowed = lambda h: [TOKS[i] for i, ok in enumerate(g.allowed(h).tolist()) if ok]
    assert allowed([]) == ["a", "ab", "abc"]
    assert allowed([TOKS.index("a")]) == ["b", "bc"]
    assert allowed([TOKS.index("ab")]) == ["c", "d"]
    assert allowed([TOKS.index("abc")]) == ["<eos>"]


def test_json_schema_grammar_masks():
    """JSON Schema in the one layout. Text the grammar forces (here '{"a": ') may be allowed only as the tokenizer
    splits it (llguidance fast-forwards forced bytes: "{" then '"' is not allowed where the vocabulary has '{"';
    llguidance issue #263): still a pure function of g, so speculation stays exact."""
    toks = ["<eos>", "{", "}", '"', "a", ":", " ", ",", ", ", ": ", "1", "2", '{"']
    tk = char_tokenizer(toks)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    schema["additionalProperties"] = False
    g = Grammar(tk, grammar_source(json_schema=schema), len(toks), [0])

    def allowed(text):
        mask = g.allowed([toks.index(t) for t in text])
        return None if mask is None else [toks[i] for i, ok in enumerate(mask.tolist()) if ok]

    assert allowed([]) == ['{"']
    assert allowed(["{", '"']) is None  # the forced text split another way
    assert allowed(['{"', "a", '"']) == [": "]  # no whitespace but the layout's
    assert allowed(['{"', "a", '"', ": "]) == ["1", "2"]
    assert allowed(['{"', "a", '"', ": ", "1"]) == ["}", "1", "2"]
    assert allowed(['{"', "a", '"', ": ", "1", "}"]) == ["<eos>"]


@pytest.mark.parametrize(
    "kw, needles",
    [
        (dict(json_schema={"type": "object", "propertes": {}}), ["json_schema at #", "'propertes'"]),
        (
            dict(json_schema={"type": "object", "properties": {"a": {"tpye": "string"}}}),
            ["#/properties/a", "'tpye'"],
        ),
        (
            dict(json_schema={"type": "array", "items": {"anyOf": [{"type": "string"}, {"typ": "x"}]}}),
            ["#/items/anyOf/1", "'typ'"],
        ),
        (dict(json_schema={"$defs": {"p": {"minLenght": 1}}}), ["#/$defs/p", "'minLenght'"]),
        (dict(json_schema="{not json"), ["json_schema is not valid JSON"]),
        (dict(json_schema=[1]), ["expected an object or a boolean"]),
        (dict(json_schema=False), ["json_schema is false"]),
        (dict(json_schema={"type": "foo"}), ["invalid grammar"]),
        (dict(json_schema={"type": "integer", "minimum": 5, "maximum": 1}), ["invalid grammar"]),
        (dict(regex="(ab"), ["invalid grammar", "unclosed group"]),
        (dict(regex=""), ["regex=''"]),
        (dict(grammar="start: foo("), ["invalid grammar"]),
        (dict(grammar="start: x\nx: y\n"), ["invalid grammar", "unknown name"]),
        (dict(grammar="start: /[/"), ["invalid grammar", "unclosed character class"]),
        (dict(grammar='root ::= "a'), ["grammar"]),
        (dict(grammar="  \n"), ["grammar is empty"]),
        (dict(json_schema={}, regex="a"), ["json_schema and regex given"]),
        (dict(regex="a", grammar='start: "a"'), ["regex and grammar given"]),
        (dict(json_schema={}, regex="a", grammar='start: "a"'), ["json_schema and regex and grammar given"]),
    ],
)
def test_grammar_errors_are_one_line(tok, kw, needles):
    with pytest.raises(GenerationError) as e:
        make_grammar(tok, **kw)
    one_line_error(e, *needles)


def test_boolean_schemas_and_schema_key_check():
    check_schema_keys(True)
    check_schema_keys({"type": "object", "properties": {"a": False}, "x-guidance": {"whitespace_flexible": True}})
    assert grammar_source(json_schema=True) is not None  # true: any JSON value
    assert grammar_source(json_schema="true") is not None
    assert grammar_source() is None


def test_grammar_and_token_healing_are_exclusive(tok):
    src = grammar_source(regex="a+")
    with pytest.raises(GenerationError) as e:
        make_controls([[1, 2]], tok, len(TOKS), [EOS], Penalties(), src, True)
    one_line_error(e, "token_healing")


# ---------------------------------------------------------------------------------------------------------------
# 3. Token healing
# ---------------------------------------------------------------------------------------------------------------


def test_vocab_bytes_and_heal_prompt(tok):
    vocab = vocab_bytes(tok, len(TOKS) + 2)  # ids past the tokenizer: b""
    assert vocab == [b"" if s.startswith("<") else s.encode() for s in TOKS] + [b"", b""]
    ab, c = TOKS.index("ab"), TOKS.index("c")
    assert heal_prompt([c, ab], vocab) == ([c], b"ab")
    assert heal_prompt([c, c, ab], vocab) == ([c, c], b"ab")
    assert heal_prompt([ab], vocab) == ([ab], b"")  # one token: nothing to heal
    assert heal_prompt([c, EOS], vocab) == ([c, EOS], b"")  # a special last token
    assert heal_prompt([c, TOKS.index("<pad>")], vocab) == ([c, TOKS.index("<pad>")], b"")


def test_token_healing_mask_brute_force(tok):
    """After g whose bytes b are a proper prefix of the removed bytes r, t is allowed iff b + t is a prefix of r or
    starts with r (and t is not special); once r is re-spelled the constraint is off (None), and a row after a
    forbidden token is None."""
    vocab = vocab_bytes(tok, len(TOKS))
    for removed in (b"ab", b"abc", b"c", b"bca"):
        th = TokenHealing(removed, vocab)
        for n in range(4):
            for g in itertools.product(range(len(TOKS)), repeat=n):
                b = b"".join(vocab[t] for t in g)
                mask = th.allowed(list(g))
                partial = [b"".join(vocab[t] for t in g[:i]) for i in range(n + 1)]
                if any(len(p) >= len(removed) for p in partial[1:]) or not removed.startswith(b):
                    assert mask is None, (removed, g)
                    continue
                want = [bool(v) and (removed.startswith(b + v) or (b + v).startswith(removed)) for v in vocab]
                assert mask.tolist() == want, (removed, g)


def test_token_healing_multi_token_paths(tok):
    vocab = vocab_bytes(tok, len(TOKS))
    th = TokenHealing(b"ab", vocab)
    names = lambda h: [TOKS[i] for i, ok in enumerate(th.allowed(h).tolist()) if ok]
    a = TOKS.index("a")
    assert names([]) == ["a", "ab", "abc"]  # "a" then "b", or "ab", or a token starting with "ab"
    assert names([a]) == ["b", "bc", "bca"]
    assert th.allowed([a, TOKS.index("b")]) is None  # healed: free from here on
    assert th.allowed([TOKS.index("abc")]) is None
    assert th.allowed([TOKS.index("b")]) is None  # forbidden first token
    prompts = make_controls([[TOKS.index("c"), TOKS.index("ab")]], tok, len(TOKS), [EOS], Penalties(), None, True)
    (prompt, controls, removed_text), *_ = prompts
    assert prompt == [TOKS.index("c")] and removed_text == "ab"
    x = controls(torch.zeros(2, len(TOKS)), [[], [a]])
    assert [TOKS[i] for i in torch.isfinite(x[0]).nonzero().flatten().tolist()] == ["a", "ab", "abc"]
    assert [TOKS[i] for i in torch.isfinite(x[1]).nonzero().flatten().tolist()] == ["b", "bc", "bca"]


# ---------------------------------------------------------------------------------------------------------------
# 4. Stop strings
# ---------------------------------------------------------------------------------------------------------------


def test_check_stop_strings():
    assert check_stop_strings(None) == []
    assert check_stop_strings("ab") == ["ab"]
    assert check_stop_strings(["a", "\n"]) == ["a", "\n"]
    assert check_stop_strings(("a",)) == ["a"]
    bad = [("", "stop[0]=''"), (["a", ""], "stop[1]=''"), (["a", 3], "stop[1]=3"), (5, "stop=5"), ({"a"}, "stop=")]
    for stop, needle in bad:
        with pytest.raises(GenerationError) as e:
            check_stop_strings(stop)
        one_line_error(e, needle)


def ids(*names):
    return [TOKS.index(n) for n in names]


def test_stop_strings_cut(tok):
    toks = ids("ab", "ca", "b", "<eos>")  # "abcab"
    assert StopStrings(tok, ["ca"]).cut(toks) == "ab"
    assert StopStrings(tok, ["ca"], include=True).cut(toks) == "abca"
    assert StopStrings(tok, ["ca", "b"]).cut(toks) == "a"  # the earliest stop wins, not the first listed
    assert StopStrings(tok, ["b", "ca"], include=True).cut(toks) == "ab"
    assert StopStrings(tok, ["x"]).cut(toks) == "abcab"  # no stop: all the text (the end token has none)
    assert StopStrings(tok, ["ab"]).cut(toks) == ""
    assert StopStrings(tok, ["ca"]).find("abcab") == (2, "ca")
    assert StopStrings(tok, ["ca"]).find("abab") is None


def test_stop_strings_skip_the_healed_prefix(tok):
    st = StopStrings(tok, ["b"], prefix="ab")
    assert st.text(ids("a")) == ""  # the prefix is not re-spelled yet: no continuation, no stop
    assert st.find(st.text(ids("a", "b"))) is None  # the "b" of the prefix is not a stop
    assert st.text(ids("abc", "b")) == "cb"
    assert st.cut(ids("abc", "b", "c")) == "c"
    assert StopStrings(tok, ["b"], include=True, prefix="ab").cut(ids("abc", "b", "c")) == "cb"
    assert StopStrings(tok, [], prefix="ab").cut(ids("a", "bca")) == "ca"


# ---------------------------------------------------------------------------------------------------------------
# 5-7. The engine on the embedded pair (float32)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair():
    target, assistant, tokenizer = default_pair()
    return minimtp.Engine(target, assistant, tokenizer=tokenizer), tokenizer


def spec_and_plain(engine, prompt_ids, k=5, **kw):
    spec = engine.generate([prompt_ids], num_speculative_tokens=k, **kw)
    plain = engine.generate([prompt_ids], use_assistant=False, **kw)
    assert spec.tokens == plain.tokens, kw
    assert spec.texts == plain.texts and spec.finish_reasons == plain.finish_reasons
    assert spec.stop_reasons == plain.stop_reasons
    assert spec.stats.drafted > 0 and plain.stats.drafted == 0
    return spec


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "admin": {"type": "boolean"},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("prompt", ["person = ", 'user = {"name": "Ada", "age": 36}\nother = '])
def test_json_schema_speculative_equals_plain_and_validates(pair, prompt):
    import jsonschema

    engine, tok = pair
    res = spec_and_plain(engine, tok(prompt)["input_ids"], max_new_tokens=80, json_schema=PERSON)
    assert res.finish_reasons == ["stop"] and res.stop_reasons[0] in engine.cfg.eos_token_ids, res.texts
    value = json.loads(res.texts[0])
    jsonschema.validate(value, PERSON)
    assert res.texts[0] == json.dumps(value)  # the one layout
    # in a batch, each prompt has its own grammar state: the same tokens as alone
    other = tok("config = ")["input_ids"]
    both = engine.generate([tok(prompt)["input_ids"], other], max_new_tokens=80, json_schema=PERSON)
    assert both.tokens[0] == res.tokens[0]
    assert both.tokens[1] == engine.generate([other], max_new_tokens=80, json_schema=PERSON).tokens[0]
    jsonschema.validate(json.loads(both.texts[1]), PERSON)


def test_regex_speculative_equals_plain(pair):
    engine, tok = pair
    rx = r"[a-z_]{1,20}\([a-z_, ]{0,30}\):"
    res = spec_and_plain(engine, tok("def ")["input_ids"], max_new_tokens=64, regex=rx)
    assert res.finish_reasons == ["stop"]
    assert re.fullmatch(rx, res.texts[0]), res.texts


LARK = 'start: "return " NAME (" " OP " " NAME)? "\\n"\nOP: "+" | "-" | "*"\nNAME: /[a-z_]{1,10}/\n'
GBNF = 'root ::= "x = " [0-9] [0-9]? "\\n"'


@pytest.mark.parametrize(
    "grammar, prompt, rx",
    [
        (LARK, "def add(a, b):\n    ", r"return [a-z_]{1,10}( [-+*] [a-z_]{1,10})?\n"),
        (GBNF, "import os\n", r"x = [0-9]{1,2}\n"),
    ],
)
def test_lark_and_gbnf_grammars_speculative_equal_plain(pair, grammar, prompt, rx):
    engine, tok = pair
    res = spec_and_plain(engine, tok(prompt)["input_ids"], max_new_tokens=48, grammar=grammar)
    assert res.finish_reasons == ["stop"] and re.fullmatch(rx, res.texts[0]), res.texts


def test_repetition_penalty_speculative_equals_plain(pair):
    engine, tok = pair
    prompt = tok("import os\n")["input_ids"]
    free = engine.generate([prompt], max_new_tokens=48, use_assistant=False)
    res = spec_and_plain(engine, prompt, max_new_tokens=48, repetition_penalty=1.3)
    assert res.tokens != free.tokens  # the penalty does something here ("import sys" repeated otherwise)


def test_presence_and_frequency_penalties_speculative_equal_plain(pair):
    engine, tok = pair
    prompt = tok("import os\n")["input_ids"]
    free = engine.generate([prompt], max_new_tokens=48, use_assistant=False)
    res = spec_and_plain(engine, prompt, max_new_tokens=48, presence_penalty=0.8, frequency_penalty=0.5)
    assert res.tokens != free.tokens
    spec_and_plain(engine, tok("def fibonacci(n):")["input_ids"], max_new_tokens=48, frequency_penalty=-0.3)


def _stop_completed_by(tok, tokens: list[int], i: int) -> str:
    """A stop string that first appears in the text with token i: the shortest suffix of text(tokens[: i + 1])
    that text(tokens[:i]) does not contain."""
    before = tok.decode(tokens[:i], skip_special_tokens=True)
    after = tok.decode(tokens[: i + 1], skip_special_tokens=True)
    assert after.startswith(before) and len(after) > len(before)
    return next(after[-n:] for n in range(1, len(after) + 1) if after[-n:] not in before)


def _cut_at_stops(tok, tokens: list[int], stops: list[str], eos) -> list[int]:
    """Plain decoding's rule: emit tokens until an end token or until the text contains a stop string."""
    for j, t in enumerate(tokens):
        if t in eos or any(s in tok.decode(tokens[: j + 1], skip_special_tokens=True) for s in stops):
            return tokens[: j + 1]
    return tokens


def test_stop_string_inside_an_accepted_draft_block(pair):
    engine, tok = pair
    prompt = tok("def fibonacci(n):")["input_ids"]
    blocks = []
    full = engine.generate(
        [prompt], max_new_tokens=48, num_speculative_tokens=5, on_tokens=lambda i, t: blocks.append(t)
    )
    assert sum(blocks, []) == full.tokens[0]
    # a token in the middle of a block of accepted drafts (not the round's last token)
    starts = list(itertools.accumulate([0] + [len(b) for b in blocks]))
    mids = [s + 1 for s, b in zip(starts, blocks) if len(b) >= 3 and s > 0]
    assert mids, blocks
    i = mids[0]
    stop = _stop_completed_by(tok, full.tokens[0], i)
    res = spec_and_plain(engine, prompt, max_new_tokens=48, stop=[stop])
    assert res.tokens[0] == full.tokens[0][: i + 1]
    assert res.finish_reasons == ["stop"] and res.stop_reasons == [stop]
    text = tok.decode(full.tokens[0][: i + 1], skip_special_tokens=True)
    assert res.texts[0] == text[: text.find(stop)]
    inc = spec_and_plain(engine, prompt, max_new_tokens=48, stop=stop, include_stop_str_in_output=True)
    assert inc.tokens == res.tokens and inc.texts[0] == text[: text.find(stop) + len(stop)]
    # several stops: the earliest in the text ends it
    res2 = spec_and_plain(engine, prompt, max_new_tokens=48, stop=["zzzz", stop])
    assert res2.tokens == res.tokens and res2.stop_reasons == [stop]


def test_token_healing_natural_prompt(pair):
    engine, tok = pair
    prompt = tok("def binary_search(items, target):\n")["input_ids"]
    res = spec_and_plain(engine, prompt, max_new_tokens=32, token_healing=True)
    text = res.texts[0]
    assert text.strip() and text[0] in " \t", text
    assert res.healed_prompts == [prompt[:-1]]
    decoded = tok.decode(res.tokens[0], skip_special_tokens=True)
    assert decoded.startswith("\n") and decoded[1:] == text  # the first token re-spells the removed "\n"
    # a stop string inside the re-spelled prefix does not count: "\n" stops at the NEXT newline
    st = spec_and_plain(engine, prompt, max_new_tokens=32, token_healing=True, stop="\n")
    assert st.texts[0] and "\n" not in st.texts[0] and text.startswith(st.texts[0])
    assert st.finish_reasons == ["stop"] and st.stop_reasons == ["\n"]
    # nothing to heal after a special token: the prompt runs unchanged
    bos_only = engine.generate([[2]], max_new_tokens=4, token_healing=True)
    assert bos_only.healed_prompts == [[2]]


@pytest.mark.parametrize("mode", ["argmax", "sample", "plain"])
def test_stop_strings_only_truncate_under_sampling(pair, mode):
    """T=1, seeds 0..19: with stop strings, each sequence is the no-stop run's sequence cut right after the token
    that completes a stop string (the same seed gives the same draws up to there)."""
    engine, tok = pair
    prompt = tok("def main():\n    ")["input_ids"]
    kw = dict(use_assistant=False) if mode == "plain" else dict(num_speculative_tokens=4, draft_mode=mode)
    kw.update(max_new_tokens=24, temperature=1.0, seed=list(range(20)))
    stops = ["(", "\n"]
    full = engine.generate([prompt] * 20, **kw)
    cut = engine.generate([prompt] * 20, stop=stops, **kw)
    eos = set(engine.cfg.eos_token_ids)
    shortened = 0
    for b in range(20):
        want = _cut_at_stops(tok, full.tokens[b], stops, eos)
        assert cut.tokens[b] == want, b
        shortened += len(want) < len(full.tokens[b])
        if cut.stop_reasons[b] in stops:
            text = tok.decode(want, skip_special_tokens=True)
            assert cut.texts[b] == text[: min(i for s in stops if (i := text.find(s)) >= 0)]
            assert cut.finish_reasons[b] == "stop"
    assert shortened >= 10, shortened


def test_seed_list_equals_each_prompt_alone(pair):
    engine, tok = pair
    p1, p2 = tok("class Stack:\n")["input_ids"], tok("for i in range(")["input_ids"]
    kw = dict(max_new_tokens=20, temperature=1.0, num_speculative_tokens=4, draft_mode="sample")
    both = engine.generate([p1, p2], seed=[11, 5], **kw)
    assert both.tokens[0] == engine.generate([p1], seed=11, **kw).tokens[0]
    assert both.tokens[1] == engine.generate([p2], seed=5, **kw).tokens[0]
    assert both.tokens[1] == engine.generate([p2], seed=[5], **kw).tokens[0]
    swapped = engine.generate([p2, p1], seed=[5, 11], **kw)
    assert swapped.tokens == both.tokens[::-1]


def test_neighbouring_seeds_share_no_sequence(pair):
    engine, tok = pair
    prompt = tok("x = ")["input_ids"]
    kw = dict(max_new_tokens=16, temperature=1.0, num_speculative_tokens=4)
    a = engine.generate([prompt] * 4, seed=3, **kw).tokens
    b = engine.generate([prompt] * 4, seed=4, **kw).tokens
    assert len({tuple(t) for t in a + b}) == 8  # seed s + 1 does not replay seed s's streams shifted by one
    assert engine.generate([prompt] * 4, seed=3, **kw).tokens == a


@pytest.mark.parametrize(
    "seed, n, needle",
    [
        (-1, 1, "seed=-1"),
        (1.5, 1, "seed=1.5"),
        (True, 1, "seed=True"),
        ("3", 1, "seed='3'"),
        ([1], 2, "a list of 1 seeds for 2 prompts"),
        ([1, -2], 2, "seed=-2"),
    ],
)
def test_bad_seeds(seed, n, needle):
    with pytest.raises(GenerationError) as e:
        make_generators(seed, n)
    one_line_error(e, needle)


def test_seed_streams():
    draws = lambda gens: [torch.rand(4, generator=g).tolist() for g in gens]
    assert draws(make_generators([7, 9], 2)) == draws(make_generators(7, 1)) + draws(make_generators(9, 1))
    assert draws(make_generators(7, 3))[0] == draws(make_generators(7, 1))[0]
    assert draws(make_generators(7, 2))[1] != draws(make_generators(8, 1))[0]


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(repetition_penalty=0), "repetition_penalty=0"),
        (dict(presence_penalty=3), "presence_penalty=3"),
        (dict(frequency_penalty=float("nan")), "frequency_penalty=nan"),
        (dict(stop=[""]), "stop[0]=''"),
        (dict(json_schema={"type": "object", "properties": {"a": {"maxLen": 3}}}), "'maxLen'"),
        (dict(regex="a(", json_schema={}), "json_schema and regex given"),
        (dict(regex="[a-"), "invalid grammar"),
        (dict(regex="a+", token_healing=True), "token_healing"),
        (dict(seed=[1, 2]), "a list of 2 seeds for 1 prompts"),
        (dict(seed=-5), "seed=-5"),
    ],
)
def test_engine_control_errors_are_one_line(pair, kw, needle):
    engine, _ = pair
    with pytest.raises(GenerationError) as e:
        engine.generate([[2, 651]], max_new_tokens=4, **kw)
    one_line_error(e, needle)
