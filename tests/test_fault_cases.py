"""FAULT_CASES.md F3-F8, F12, F13, F14 (second request) on the tiny random model."""

import pytest
import torch

from adaspec.engine import Engine
from adaspec.speculators import NgramSpeculator
from adaspec.types import SamplingParams
from scripted import EmptySpeculator, RandomSpeculator, ScriptedSpeculator

PROMPT = "import os\nimport sys\n\ndef main():\n"


@pytest.fixture(scope="module")
def prompt_ids(tiny_target):
    return tiny_target.tokenizer.encode(PROMPT)


@pytest.fixture(scope="module")
def plain40(tiny_target, prompt_ids):
    return Engine(tiny_target).generate(prompt_ids, SamplingParams(max_tokens=40, ignore_eos=True))


def oracle(target, plain_ids):
    return ScriptedSpeculator(plain_ids, None, target.vocab_size)


def first_index(ids, tok):
    return ids.index(tok)


def test_f3_stop_token_inside_accepted_block(tiny_target, prompt_ids, plain40):
    stop_tok = plain40.token_ids[4]
    cut = first_index(plain40.token_ids, stop_tok)
    eng = Engine(tiny_target, [oracle(tiny_target, plain40.token_ids)], lookahead=8)
    params = SamplingParams(max_tokens=40, stop_token_ids=[stop_tok], ignore_eos=True)
    r = eng.generate(prompt_ids, params)
    assert r.token_ids == plain40.token_ids[: cut + 1]
    assert r.finish_reason == "stop"
    streamed = list(eng.stream(prompt_ids, params))
    assert sum((d.token_ids for d in streamed), []) == r.token_ids
    assert "".join(d.text for d in streamed) == r.text
    assert streamed[-1].finish_reason == "stop"


@pytest.mark.parametrize("max_tokens,expect_len,reason", [(5, 3, "stop"), (3, 3, "stop"), (2, 2, "length")])
def test_f4_stop_token_vs_length_cap(tiny_target, prompt_ids, plain40, max_tokens, expect_len, reason):
    ids = plain40.token_ids
    stop_tok = ids[2]
    if stop_tok in ids[:2]:
        pytest.skip("random model repeated a token")
    eng = Engine(tiny_target, [oracle(tiny_target, ids)], lookahead=8)
    r = eng.generate(prompt_ids, SamplingParams(max_tokens=max_tokens, stop_token_ids=[stop_tok], ignore_eos=True))
    assert r.token_ids == ids[:expect_len]
    assert r.finish_reason == reason
    assert r.usage.completion_tokens == expect_len


def test_f4_f5_stop_string_cut_everywhere(tiny_target, prompt_ids, plain40):
    """Stop strings ending at each token of an accepted block: equal plain, all cut alike."""
    eng_plain = Engine(tiny_target)
    full_text = plain40.text
    checked = 0
    # Late ones (> 4 * len(stop) + 8 tokens in) take the engine's tail-decoding path.
    for end_tok in (1, 2, 5, 9, 27, 38):  # stop string completes at these token indices
        upto = eng_plain.decode(plain40.token_ids[: end_tok + 1])
        prev = eng_plain.decode(plain40.token_ids[:end_tok])
        if len(upto) <= len(prev) or len(upto) < 2:
            continue
        stop = upto[max(0, len(prev) - 1):]  # spans the token boundary
        params = SamplingParams(max_tokens=40, stop=[stop], ignore_eos=True, logprobs=2)
        want = eng_plain.generate(prompt_ids, params)
        # Independent of the engine: the request ends at the first token whose text completes the stop string.
        first_end = next(m for m in range(1, 41) if stop in eng_plain.decode(plain40.token_ids[:m]))
        assert len(want.token_ids) == first_end
        for k in (3, 8):
            got = Engine(tiny_target, [oracle(tiny_target, plain40.token_ids)], lookahead=k).generate(prompt_ids, params)
            assert got.token_ids == want.token_ids
            assert got.text == want.text == full_text[: full_text.find(stop)]
            assert got.finish_reason == "stop"
            assert len(got.logprobs) == len(got.token_ids) == got.usage.completion_tokens
        checked += 1
    assert checked >= 4


@pytest.mark.parametrize("k", [3, 10])
def test_f6_max_tokens_exact(tiny_target, prompt_ids, k):
    prompt = tiny_target.tokenizer.encode(" a b c" * 20)
    for max_tokens in (1, 2, k, k + 1):
        want = Engine(tiny_target).generate(prompt, SamplingParams(max_tokens=max_tokens, logprobs=0))
        got = Engine(tiny_target, [NgramSpeculator()], lookahead=k).generate(
            prompt, SamplingParams(max_tokens=max_tokens, logprobs=0))
        assert got.token_ids == want.token_ids
        assert len(got.token_ids) <= max_tokens
        if got.finish_reason == "length":
            assert len(got.token_ids) == max_tokens
        assert got.usage.completion_tokens == len(got.token_ids) == len(got.logprobs)


def test_f7_odd_prompts(tiny_target):
    eng_plain, eng = Engine(tiny_target), Engine(tiny_target, [NgramSpeculator(max_ngram=4)], lookahead=4)
    tok = tiny_target.tokenizer
    cases = [[], [tok.bos_token_id], tok.encode("x")[:1], tok.encode("ab")[:2], tok.encode("zq wv ju")]
    for prompt in cases:
        params = SamplingParams(max_tokens=12)
        assert eng.generate(prompt, params).token_ids == eng_plain.generate(prompt, params).token_ids
    # No EOS configured at all.
    eng_noeos = Engine(tiny_target, [NgramSpeculator()], lookahead=4)
    eng_noeos.eos_token_ids = set()
    r = eng_noeos.generate("hi", SamplingParams(max_tokens=10))
    assert len(r.token_ids) == 10 and r.finish_reason == "length"


def test_f7_empty_prompt_without_bos_is_clear_error(tiny_target, monkeypatch):
    eng = Engine(tiny_target)
    monkeypatch.setattr(type(tiny_target), "bos_token_id", property(lambda self: None))
    with pytest.raises(ValueError, match="empty"):
        eng.generate([], SamplingParams(max_tokens=4))


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_f8_logprobs_match_target(tiny_target, temperature):
    eng = Engine(tiny_target, [NgramSpeculator()], lookahead=4)
    prompt = tiny_target.tokenizer.encode("The capital of France is")
    params = SamplingParams(max_tokens=10, temperature=temperature, seed=3, logprobs=3, ignore_eos=True)
    r = eng.generate(prompt, params)
    assert len(r.logprobs) == len(r.token_ids) == 10
    # Reference: one plain forward over prompt + output, raw log-softmax.
    kv = tiny_target.new_cache()
    ids = prompt + r.token_ids
    rows = torch.log_softmax(tiny_target.forward(kv, ids[:-1]).logits, -1)[len(prompt) - 1 :]  # [10, V]
    for i, lp in enumerate(r.logprobs):
        assert lp.token_id == r.token_ids[i]
        assert abs(lp.logprob - float(rows[i, lp.token_id])) < 1e-3
        vals = [v for _, v in lp.top]
        assert len(vals) == 3 and vals == sorted(vals, reverse=True)
        assert abs(vals[0] - float(rows[i].max())) < 1e-3
    if temperature == 0.0:
        plain = Engine(tiny_target).generate(prompt, params)
        for a, b in zip(plain.logprobs, r.logprobs):
            assert abs(a.logprob - b.logprob) < 1e-3


def test_f12_metrics(tiny_target, prompt_ids, plain40):
    ids = plain40.token_ids
    eos = ids[2]
    if eos in ids[:2]:
        pytest.skip("random model repeated a token")
    eng = Engine(tiny_target, [oracle(tiny_target, ids)], lookahead=5)
    r = eng.generate(prompt_ids, SamplingParams(max_tokens=40, stop_token_ids=[eos]))
    s = r.speculation
    assert len(r.token_ids) == 3 == r.usage.completion_tokens
    assert s.accepted <= s.proposed and 0.0 <= s.acceptance_rate <= 1.0
    assert s.draft_steps == 1 and s.target_forwards == 1
    # Oracle ~1, random ~0.
    r = Engine(tiny_target, [oracle(tiny_target, ids)], lookahead=4).generate(
        prompt_ids, SamplingParams(max_tokens=40, ignore_eos=True))
    assert r.speculation.acceptance_rate == 1.0
    assert r.speculation.acceptance_by_position == [1.0] * 4
    r = Engine(tiny_target, [RandomSpeculator(tiny_target.vocab_size)], lookahead=4).generate(
        prompt_ids, SamplingParams(max_tokens=40, ignore_eos=True))
    assert r.speculation.acceptance_rate < 0.05
    # Steps with no draft are not proposals.
    r = Engine(tiny_target, [EmptySpeculator()], lookahead=4).generate(
        prompt_ids, SamplingParams(max_tokens=10, ignore_eos=True))
    s = r.speculation
    assert s.proposed == 0 and s.draft_steps == 0 and s.acceptance_rate == 0.0
    assert s.mean_acceptance_length == 0.0 and s.target_forwards == 10


def test_f13_context_window(tiny_model_dir):
    from adaspec.target import load_target

    target = load_target(str(tiny_model_dir), max_model_len=128)
    prompt = target.tokenizer.encode(" la" * 100)[:100]
    spec = ScriptedSpeculator([], 0, target.vocab_size)
    eng = Engine(target, [spec, NgramSpeculator()], lookahead=8)
    r = eng.generate(prompt, SamplingParams(max_tokens=1000, ignore_eos=True))
    assert r.finish_reason == "length"
    assert len(prompt) + len(r.token_ids) == 128
    # No draft position at or past the window: positions fed stay < 128.
    assert all(pos + k <= 127 for pos, k in zip(spec.positions, spec.calls))
    r2 = Engine(target, [NgramSpeculator()], lookahead=8).generate(prompt, SamplingParams(max_tokens=1000,
                                                                                          ignore_eos=True))
    assert r2.token_ids == r.token_ids
    with pytest.raises(ValueError, match="context window"):
        eng.generate(target.tokenizer.encode(" la" * 200)[:130], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="context window"):
        eng.generate(list(range(5, 133)), SamplingParams(max_tokens=4))


def test_f14_second_request_after_eos_inside_draft(tiny_target, prompt_ids, plain40):
    ids = plain40.token_ids
    stop_tok = ids[3]
    ngram = NgramSpeculator()
    eng = Engine(tiny_target, [oracle(tiny_target, ids)], lookahead=8)
    first = eng.generate(prompt_ids, SamplingParams(max_tokens=40, stop_token_ids=[stop_tok]))
    assert first.token_ids[-1] == stop_tok and first.finish_reason == "stop"
    second_prompt = prompt_ids + first.token_ids + tiny_target.tokenizer.encode(" more")
    eng2 = Engine(tiny_target, [ngram], lookahead=8)
    got = eng2.generate(second_prompt, SamplingParams(max_tokens=30))
    fresh = Engine(tiny_target).generate(second_prompt, SamplingParams(max_tokens=30))
    assert got.token_ids == fresh.token_ids


def test_bad_params_are_value_errors(tiny_target):
    eng = Engine(tiny_target)
    for bad in (dict(max_tokens=0), dict(max_tokens=-3), dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5),
                dict(top_k=-1), dict(logprobs=21), dict(stop=[""])):
        with pytest.raises(ValueError):
            eng.generate("hi", SamplingParams(**bad))
    with pytest.raises(ValueError, match="vocabulary"):
        eng.generate([10**9], SamplingParams(max_tokens=2))


def test_speculator_returning_garbage_is_sanitized(tiny_target, prompt_ids, plain40):
    """Drafts past the lookahead or outside the vocabulary never reach verification."""
    from adaspec.speculators.base import Speculator
    from adaspec.types import DraftProposal

    class Garbage(Speculator):
        name = "garbage"

        def propose(self, ctx, k):
            return DraftProposal(token_ids=[5, -1, 10**9] + [3] * (k + 5))

    r = Engine(tiny_target, [Garbage()], lookahead=4).generate(prompt_ids, SamplingParams(max_tokens=40,
                                                                                          ignore_eos=True))
    assert r.token_ids == plain40.token_ids
    assert max(int(k) for k in r.speculation.lookahead_hist) <= 1


def test_stream_concatenates_to_result(tiny_target, prompt_ids):
    eng = Engine(tiny_target, [NgramSpeculator()], lookahead=4)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    deltas = list(eng.stream(prompt_ids, params))
    final = deltas[-1].result
    assert "".join(d.text for d in deltas) == final.text
    assert sum((d.token_ids for d in deltas), []) == final.token_ids
    assert final.token_ids == Engine(tiny_target).generate(prompt_ids, params).token_ids


def test_tiny_temperature_is_greedy_not_nan(tiny_target):
    """A temperature like 5e-324 would overflow logits / T into NaN; it decodes greedily."""
    prompt = tiny_target.tokenizer.encode("hello")
    want = Engine(tiny_target).generate(prompt, SamplingParams(max_tokens=6)).token_ids
    got = Engine(tiny_target, [NgramSpeculator()], lookahead=4).generate(
        prompt, SamplingParams(max_tokens=6, temperature=5e-324, seed=1)).token_ids
    assert got == want


@pytest.mark.parametrize("speculator", ["suffix", "atlas"])
def test_f17_request_state_does_not_leak_into_the_next_request(tiny_target, speculator):
    """F17: after a request with a long repeated pattern ends (finished, or aborted mid-way), no speculator
    nor the controller keeps state under its id, and an unrelated request right after it gets exactly a
    fresh engine's tokens (greedy and seeded sampling)."""
    from adaspec import config

    def engine():
        cfg = config.EngineConfig(model="tiny", speculator=speculator, calibrate=False)
        return Engine(tiny_target, controller=config.build_controller(cfg, tiny_target))

    pattern = "ab cd ab cd ab cd ab cd ab cd ab cd ab cd ab cd ab cd ab cd"
    other = "The weather in Paris in spring is"
    warm = engine()
    a = warm.start(warm.encode_prompt(pattern), SamplingParams(max_tokens=48, ignore_eos=True), request_id="a")
    while not a.finished:
        warm.step(a)
    cut = warm.start(warm.encode_prompt(pattern + " ab"), SamplingParams(max_tokens=48, ignore_eos=True),
                     request_id="cut")
    for _ in range(3):
        warm.step(cut)
    warm.abort(cut)
    parts = [warm.controller, *warm.speculators.values()]
    for part in parts:
        for attr in ("_requests", "_pending", "_tenant_of"):
            held = getattr(part, attr, None)
            if isinstance(held, dict):
                assert not {"a", "cut"} & set(held), (type(part).__name__, attr)
    assert not warm._live
    for params in (SamplingParams(max_tokens=32, ignore_eos=True),
                   SamplingParams(max_tokens=32, ignore_eos=True, temperature=1.0, seed=7)):
        assert warm.generate(other, params).token_ids == engine().generate(other, params).token_ids
