"""Speculation under a grammar (and logit bias / penalties / min_p) equals constrained plain decoding.

Greedy: identical tokens under scripted speculators reaching every
accept/reject case, a random drafter (every draft cut by the grammar), the
grammar's own forced drafts alone, and the real ngram and suffix
speculators. Sampling: the histogram of outputs under a small grammar matches
the exact masked distribution with point-mass and sampled (draft_probs)
drafters whose drafts the grammar often cuts. JSON-schema output always
parses and validates.
"""

import itertools
import json
from collections import Counter

import pytest
import torch

from adaspec.constraints import (RequestConstraint, check_grammar, json_schema_grammar, tool_calls_grammar)
from adaspec.engine import GRAMMAR_DRAFTER, Engine
from adaspec.sampling import process_logits
from adaspec.speculators import NgramSpeculator
from adaspec.speculators.suffix import SuffixSpeculator
from adaspec.types import SamplingParams
from conftest import tv
from scripted import EmptySpeculator, RandomSpeculator, SampledDraftSpeculator, ScriptedSpeculator

SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 9}},
    "required": ["city", "unit", "days"], "additionalProperties": False}


def _prompt(target):
    return list(target.tokenizer.encode("Weather in Paris as JSON:", add_special_tokens=False))


def _run(target, specs, params, k=4):
    eng = Engine(target, specs, lookahead=k)
    state = eng.start(_prompt(target), params)
    while not state.finished:
        eng.step(state)
        if not state.finished:
            assert state.kv.length == len(state.prompt_ids) + len(state.output_ids) - 1
    return eng.result(state), state


def _params(**kw):
    base = dict(max_tokens=40, grammar=json_schema_grammar(SCHEMA))
    base.update(kw)
    return SamplingParams(**base)


@pytest.fixture(scope="module")
def plain(tiny_target):
    return _run(tiny_target, [], _params())[0]


def test_plain_constrained_output_validates(tiny_target, plain):
    import jsonschema_rs

    # A random model, forced by the grammar: the JSON ends well inside 40 tokens only if the
    # grammar bounds it; the schema bounds every field, so it does.
    assert plain.finish_reason == "stop", plain.text
    obj = json.loads(plain.text)
    jsonschema_rs.validate(SCHEMA, obj)


@pytest.mark.parametrize("num_right", [None, 0, 1, 3])
@pytest.mark.parametrize("k", [1, 4, 8])
def test_greedy_scripted_equals_constrained_plain(tiny_target, plain, num_right, k):
    spec = ScriptedSpeculator(plain.token_ids, num_right, tiny_target.vocab_size)
    res, _ = _run(tiny_target, [spec], _params(), k=k)
    assert res.token_ids == plain.token_ids
    if num_right is None:
        assert res.speculation.accepted > 0


def test_greedy_random_and_empty_drafters_equal_plain(tiny_target, plain):
    for spec in (RandomSpeculator(tiny_target.vocab_size, seed=3), EmptySpeculator()):
        res, _ = _run(tiny_target, [spec], _params(), k=6)
        assert res.token_ids == plain.token_ids, spec.name


def test_forced_tokens_are_free_accepted_drafts(tiny_target, plain):
    res, _ = _run(tiny_target, [EmptySpeculator()], _params(), k=8)
    assert res.token_ids == plain.token_ids
    steps = res.speculation.to_dict()["steps_by_speculator"]
    assert steps.get(GRAMMAR_DRAFTER, 0) > 0  # the grammar drafted with no speculator draft at all
    # Forced tokens are the grammar's only continuation bytes: every one is accepted.
    assert res.speculation.accepted == res.speculation.proposed
    assert res.speculation.accepted >= 10  # '{"city": "', '", "unit": "', ... are forced


@pytest.mark.parametrize("make", [lambda: NgramSpeculator(), lambda: SuffixSpeculator()], ids=["ngram", "suffix"])
def test_greedy_real_speculators_equal_plain(tiny_target, plain, make):
    spec = make()
    for _ in range(2):  # the second run drafts from what the first taught the suffix trie
        res, _ = _run(tiny_target, [spec], _params(), k=5)
        assert res.token_ids == plain.token_ids


def test_tool_call_grammar_forces_valid_calls(tiny_target):
    tools = [("get_weather", SCHEMA), ("get_time", {"type": "object", "properties": {
        "tz": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["tz"], "additionalProperties": False})]
    g = tool_calls_grammar(tools, parallel=False)
    plain, _ = _run(tiny_target, [], SamplingParams(max_tokens=60, grammar=g))
    res, _ = _run(tiny_target, [NgramSpeculator()], SamplingParams(max_tokens=60, grammar=g), k=6)
    assert res.token_ids == plain.token_ids
    assert plain.finish_reason == "stop"
    body = plain.text.strip()
    assert body.startswith("<tool_call>\n") and body.endswith("\n</tool_call>")
    call = json.loads(body[len("<tool_call>\n"): -len("\n</tool_call>")])
    assert call["name"] in ("get_weather", "get_time") and isinstance(call["arguments"], dict)


def test_invalid_schema_raises_naming_the_problem(tiny_target):
    with pytest.raises(ValueError, match="foo"):
        check_grammar(json_schema_grammar({"type": "foo"}), tiny_target.tokenizer, tiny_target.vocab_size)
    with pytest.raises(ValueError, match="must be an object"):
        json_schema_grammar(["not", "a", "schema"])


def test_bias_and_penalties_equal_plain_under_speculation(tiny_target):
    prompt = _prompt(tiny_target)
    eng = Engine(tiny_target)
    ref = eng.generate(prompt, SamplingParams(max_tokens=30))
    banned = ref.token_ids[0]
    kw = dict(max_tokens=30, presence_penalty=2.0, frequency_penalty=2.0, logit_bias={13: 4.0, banned: -100.0})
    plain = eng.generate(prompt, SamplingParams(**kw))
    assert plain.token_ids != ref.token_ids and banned not in plain.token_ids
    # Reference: penalties recomputed from scratch at every position.
    ids, out = list(prompt), []
    for _ in range(30):
        z = tiny_target.forward(tiny_target.new_cache(), ids).logits[-1].float().clone()
        z[13] += 4.0
        z[banned] -= 100.0
        c = torch.zeros_like(z)
        for o in out:
            c[o] += 1.0
        z -= 2.0 * c + 2.0 * (c > 0).float()
        t = int(torch.argmax(z))
        out.append(t)
        ids.append(t)
        if t in tiny_target.eos_token_ids:
            break
    assert plain.token_ids == out
    for spec in (ScriptedSpeculator(plain.token_ids, None, tiny_target.vocab_size),
                 ScriptedSpeculator(plain.token_ids, 2, tiny_target.vocab_size), NgramSpeculator()):
        res = Engine(tiny_target, [spec], lookahead=4).generate(prompt, SamplingParams(**kw))
        assert res.token_ids == plain.token_ids, spec.name


def test_logit_bias_outside_vocabulary_raises(tiny_target):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Engine(tiny_target).generate([1, 2, 3], SamplingParams(logit_bias={10**7: 1.0}))


# ------------------------------------------------------------------ sampling under a grammar
RUNS = 1200
REGEX_GRAMMAR_LETTERS = "abcd"


@pytest.fixture
def deterministic_urandom(monkeypatch):
    counter = itertools.count(1)
    monkeypatch.setattr("adaspec.engine.os.urandom", lambda n: next(counter).to_bytes(n, "little"))


def _letters(tok):
    return [tok.convert_tokens_to_ids(c) for c in REGEX_GRAMMAR_LETTERS]


def _exact_outputs(t, grammar, prompt, temp, min_p, **penalties):
    """The exact distribution of whole outputs (up to EOS) under the grammar: {token tuple: probability}."""
    eos = sorted(t.eos_token_ids)
    out = {}

    def walk(prefix, p):
        c = RequestConstraint(grammar, t.tokenizer, t.vocab_size, eos, **penalties)
        c.commit(prefix)
        z = c.adjust_logits(t.forward(t.new_cache(), prompt + prefix).logits[-1:], [])
        probs = process_logits(z, temp, min_p=min_p)[0]
        for tok in torch.nonzero(probs).flatten().tolist():
            q = p * float(probs[tok])
            if tok in eos:
                out[tuple(prefix + [tok])] = q
            else:
                walk(prefix + [tok], q)

    walk([], 1.0)
    return out


GRAMMARS = {"letters": "[abcd][abcd]", "forced": "x[abcd]y[abcd]"}


@pytest.mark.parametrize("drafter,rule,grammar_name", [
    ("point_mass", "rejection", "letters"), ("sampled", "rejection", "letters"),
    ("point_mass", "coupled", "letters"), ("sampled", "coupled", "letters"),
    ("sampled", "rejection", "forced")])
def test_sampling_distribution_under_grammar(tiny_target, drafter, rule, grammar_name, deterministic_urandom):
    """Whole-output histograms under a small grammar match the exact masked distribution.

    The sampled drafter reports draft_probs with half its mass on tokens the
    grammar forbids, so drafts are often cut (the residual rule at the cut);
    the "forced" grammar adds grammar-forced drafts ('x', 'y') joined with
    sampled ones (one-hot rows in the draft distribution).
    """
    import llguidance

    t = tiny_target
    grammar = llguidance.LLMatcher.grammar_from_regex(GRAMMARS[grammar_name])
    prompt = _prompt(t)
    temp = 3.0  # soften the tiny model's peaky logits so several letters have mass
    letters = _letters(t.tokenizer)
    # Penalties and a bias too (F18): the letter drawn first is less likely second.
    penalties = dict(logit_bias={letters[1]: 1.5}, presence_penalty=0.8, frequency_penalty=0.4)
    params = dict(max_tokens=6, temperature=temp, grammar=grammar, min_p=0.02, **penalties)
    exact = {k: v * RUNS for k, v in _exact_outputs(t, grammar, prompt, temp, 0.02, **penalties).items()}
    assert len(exact) >= 4 and abs(sum(exact.values()) - RUNS) < 1e-3 * RUNS
    if drafter == "sampled":  # half its mass on letters, half on tokens the grammar forbids
        row = torch.zeros(t.vocab_size)
        row[letters] = 0.5 / len(letters)
        row[[100, 200, 300, 400, 500]] = 0.1
        spec = SampledDraftSpeculator(row, seed=4)
    else:
        class LetterOrJunk(RandomSpeculator):
            def propose(self, ctx, k):
                d = super().propose(ctx, k)
                d.token_ids = [letters[x % 4] if x % 3 else x for x in d.token_ids]
                return d

        spec = LetterOrJunk(t.vocab_size, seed=2)
    eng = Engine(t, [spec], lookahead=3)
    plain_eng = Engine(t)
    hist = Counter()
    for seed in range(RUNS):
        s = seed if rule == "coupled" else None
        r = eng.generate(prompt, SamplingParams(seed=s, **params))
        assert r.finish_reason == "stop" and r.token_ids[-1] in t.eos_token_ids
        hist[tuple(r.token_ids)] += 1
        if rule == "coupled" and seed < 150:
            p = plain_eng.generate(prompt, SamplingParams(seed=s, **params))
            assert p.token_ids == r.token_ids  # seeded: identical to plain whatever the drafts
    assert set(hist) <= {k for k, w in exact.items() if w > 0}
    assert tv(hist, Counter(exact)) < 0.08


def test_grammar_engine_failure_ends_the_request_instead_of_nan(tiny_target, monkeypatch):
    """A row where the grammar engine allows nothing (an internal limit) becomes EOS-only, never NaN."""
    c = RequestConstraint(json_schema_grammar(SCHEMA), tiny_target.tokenizer, tiny_target.vocab_size,
                          sorted(tiny_target.eos_token_ids))

    class Dead:
        def __init__(self, m):
            self.m = m

        def __getattr__(self, name):
            return getattr(self.m, name)

        def compute_logit_bias(self):
            return bytes(tiny_target.vocab_size)

    c.matcher = Dead(c.matcher)
    z = c.adjust_logits(torch.randn(1, tiny_target.vocab_size), [])
    assert int(torch.argmax(z)) in tiny_target.eos_token_ids and torch.isfinite(z).sum() >= 1
    assert c.engine_errors == 1


def test_forced_drafts_never_use_a_special_token_the_grammar_refuses():
    """Qwen2.5 has "<tool_call>" as a special token: llguidance's fast-forward tokens gave it, its
    validator refused it, and the next step raised (a 500 through the server, found by hand)."""
    from transformers import AutoTokenizer

    from adaspec.constraints import RequestConstraint, tool_calls_grammar
    from adaspec.models import DEFAULT_MODEL, resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL, progress=False))
    spelled = tok.encode("<tool_call>", add_special_tokens=False)  # before the tag has its own token
    tok.add_tokens(["<tool_call>"])  # a fresh copy, Qwen-like: an added token (not marked special)
    special = tok.convert_tokens_to_ids("<tool_call>")
    g = tool_calls_grammar([("get_weather", {"type": "object", "properties": {"city": {"type": "string"}},
                                             "required": ["city"]})])
    c = RequestConstraint(g, tok, len(tok), [tok.eos_token_id])
    forced = c.forced_tokens(32)
    assert special not in forced and c.legal_prefix(forced) == len(forced)
    assert special not in spelled and c.legal_prefix(spelled) == len(spelled)
    after = c.forced_after(spelled, 32)  # the tail the grammar forces once the tag is spelled
    assert after and c.legal_prefix(spelled + after) == len(spelled + after)
    assert c.forced_after([special], 8) == []  # refused quietly, the matcher untouched
    assert c.legal_prefix(spelled) == len(spelled)
    logits = torch.zeros(1, len(tok))
    logits[0, special] = 10.0  # the model's favourite: the special token
    z = c.adjust_logits(logits, [])
    assert z[0, special] == float("-inf") and torch.isfinite(z[0]).any()


def test_tool_call_tags_that_are_single_tokens_are_written_as_tokens():
    """Qwen2.5's tokenizer has "<tool_call>" / "</tool_call>" as added tokens: the grammar names them."""
    from transformers import AutoTokenizer

    from adaspec.constraints import RequestConstraint, tool_calls_grammar, tool_tag_terminals
    from adaspec.models import DEFAULT_MODEL, resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL, progress=False))
    assert tool_tag_terminals(tok) == (None, None)  # SmolLM2 spells them
    tok.add_tokens(["<tool_call>", "</tool_call>"])
    open_id, close_id = tok.convert_tokens_to_ids(["<tool_call>", "</tool_call>"])
    tags = tool_tag_terminals(tok)
    assert tags == (f"<[{open_id}]>", f"<[{close_id}]>")
    g = tool_calls_grammar([("f", {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]})],
                           parallel=False, tags=tags)
    c = RequestConstraint(g, tok, len(tok), [tok.eos_token_id])
    forced = c.forced_tokens(32)
    assert forced[0] == open_id and c.legal_prefix(forced) == len(forced)
    z = c.adjust_logits(torch.zeros(1, len(tok)), [])
    assert torch.isfinite(z[0, open_id]) and int(torch.isfinite(z[0]).sum()) == 1
    body = tok.encode('{"name": "f", "arguments": {"x": 7}}\n', add_special_tokens=False)
    done = [open_id] + tok.encode("\n", add_special_tokens=False) + body + [close_id]
    assert c.legal_prefix(done) == len(done)
