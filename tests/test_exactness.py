"""Greedy exactness against plain decoding (fp32) with scripted speculators.

Covers FAULT_CASES F1, F2, F11, F14, F16 on the tiny random model and, for the
cases where the real thing is the point, on the real default model.
"""

import math

import pytest

from adaspec.engine import Engine
from adaspec.speculators import NgramSpeculator
from adaspec.types import SamplingParams
from scripted import RandomSpeculator, ScriptedSpeculator

PROMPT = "def fibonacci(n):\n    # return the n-th Fibonacci number\n"


def plain_ids(target, prompt_ids, max_tokens, **kw):
    return Engine(target).generate(prompt_ids, SamplingParams(max_tokens=max_tokens, **kw)).token_ids


def run_checked(target, spec, prompt_ids, max_tokens, k, **kw):
    """Generate with ``spec`` and check the cache invariant after every step (F2)."""
    eng = Engine(target, [spec], lookahead=k)
    state = eng.start(prompt_ids, SamplingParams(max_tokens=max_tokens, **kw))
    while not state.finished:
        eng.step(state)
        if not state.finished:
            assert state.kv.length == len(state.prompt_ids) + len(state.output_ids) - 1
            assert state.kv.cache.get_seq_length() == state.kv.length
    return eng.result(state)


@pytest.mark.parametrize("k", [1, 3, 4, 8])
def test_scripted_every_accept_reject_case_tiny(tiny_target, k):
    prompt = tiny_target.tokenizer.encode(PROMPT)
    plain = plain_ids(tiny_target, prompt, 40, ignore_eos=True)
    V = tiny_target.vocab_size
    for num_right in [None] + list(range(0, k + 1)):
        spec = ScriptedSpeculator(plain, num_right, V)
        r = run_checked(tiny_target, spec, prompt, 40, k, ignore_eos=True)
        assert r.token_ids == plain, f"k={k} num_right={num_right}"
        s = r.speculation
        if num_right is None:  # oracle: all accepted
            assert s.accepted == s.proposed
        elif num_right == 0:
            assert s.accepted == 0
        else:
            assert s.accepted <= s.proposed


def test_one_token_prompt_f2(tiny_target):
    prompt = [tiny_target.tokenizer.encode("Hello")[0]]
    plain = plain_ids(tiny_target, prompt, 50, ignore_eos=True)
    for num_right in (None, 0, 2):
        r = run_checked(tiny_target, ScriptedSpeculator(plain, num_right, tiny_target.vocab_size), prompt, 50, 4,
                        ignore_eos=True)
        assert r.token_ids == plain


@pytest.mark.parametrize("k", [1, 4])
def test_oracle_full_acceptance_f11(tiny_target, k):
    prompt = tiny_target.tokenizer.encode(PROMPT)
    plain = plain_ids(tiny_target, prompt, 32, ignore_eos=True)
    r = run_checked(tiny_target, ScriptedSpeculator(plain, None, tiny_target.vocab_size), prompt, 32, k,
                    ignore_eos=True)
    assert r.token_ids == plain
    assert r.speculation.accepted == r.speculation.proposed
    assert r.speculation.target_forwards == math.ceil(32 / (k + 1))


def test_always_wrong_200_tokens_f14(tiny_target):
    prompt = tiny_target.tokenizer.encode(PROMPT)
    plain = plain_ids(tiny_target, prompt, 200, ignore_eos=True)
    for num_right in range(0, 4):
        r = run_checked(tiny_target, ScriptedSpeculator(plain, num_right, tiny_target.vocab_size), prompt, 200, 4,
                        ignore_eos=True)
        assert r.token_ids == plain
    r = run_checked(tiny_target, RandomSpeculator(tiny_target.vocab_size), prompt, 200, 4, ignore_eos=True)
    assert r.token_ids == plain


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_repeated_word_ngram_f1_tiny(tiny_target, k):
    prompt = tiny_target.tokenizer.encode(" hello" * 48)
    plain = plain_ids(tiny_target, prompt, 32)
    r = Engine(tiny_target, [NgramSpeculator()], lookahead=k).generate(prompt, SamplingParams(max_tokens=32))
    assert r.token_ids == plain


# ---------------------------------------------------------------- real model
@pytest.mark.real_model
def test_real_model_scripted_exactness(real_target):
    prompt = real_target.tokenizer.encode("The three primary colors are")
    plain = plain_ids(real_target, prompt, 24)
    k = 4
    for num_right in [None, 0, 1, 2, 3, 4]:
        r = run_checked(real_target, ScriptedSpeculator(plain, num_right, real_target.vocab_size), prompt, 24, k)
        assert r.token_ids == plain, f"num_right={num_right}"


@pytest.mark.real_model
def test_real_model_f1_repeated_word(real_target):
    prompt = real_target.tokenizer.encode(" echo" * 48)
    plain = plain_ids(real_target, prompt, 32)
    for k in (1, 2, 4, 8):
        r = Engine(real_target, [NgramSpeculator()], lookahead=k).generate(prompt, SamplingParams(max_tokens=32))
        assert r.token_ids == plain, f"k={k}"


@pytest.mark.real_model
def test_real_model_f16_output_independent_of_k(real_target):
    eng = Engine(real_target)
    prompt = eng.encode_prompt("Write a Python function that reverses a string, with a docstring.", chat=True)
    plain = plain_ids(real_target, prompt, 128)
    for k in (1, 2, 3, 5, 8):
        r = Engine(real_target, [NgramSpeculator()], lookahead=k).generate(prompt, SamplingParams(max_tokens=128))
        assert r.token_ids == plain, f"k={k}"


@pytest.mark.real_model
def test_real_model_int8_speculation_equals_int8_plain():
    """The default fast path stays exact: greedy with speculation equals plain on the same int8 weights."""
    from adaspec.speculators import SuffixSpeculator
    from adaspec.target import load_target

    target = load_target("smollm2-135m-instruct", dtype="int8")
    eng = Engine(target)
    prompt = eng.encode_prompt("Write a Python function that checks whether a number is prime.", chat=True)
    plain = plain_ids(target, prompt, 64)
    for spec, k in ((NgramSpeculator(), 8), (SuffixSpeculator(), 16)):
        for _ in range(2):  # the suffix speculator drafts long blocks the second time
            r = Engine(target, [spec], lookahead=k).generate(prompt, SamplingParams(max_tokens=64))
            assert r.token_ids == plain, spec.name
