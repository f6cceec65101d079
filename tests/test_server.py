"""The OpenAI-compatible server against a real uvicorn on a loopback port, through the openai client.

The engine serves a tiny random llama (conftest) with two speculators: the
n-gram speculator, and a scripted oracle that proposes the plain continuation
of the prompts registered with it (every draft accepted). A test controller
picks the oracle for registered prompts and n-gram otherwise, so one server
mixes long accepted drafts, rejected drafts and plain steps. "Plain" is the
same target decoded with speculation off (FAULT_CASES.md).
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence

import httpx
import openai
import pytest

from adaspec.controller import Controller, Decision
from adaspec.engine import Engine
from adaspec.server import create_app, load_api_keys
from adaspec.server.testing import BackgroundServer
from adaspec.speculators import NgramSpeculator
from adaspec.speculators.base import Speculator
from adaspec.types import DraftProposal, ProposeContext, SamplingParams

MODEL = "tiny-test"
LOOKAHEAD = 8


class OracleSpeculator(Speculator):
    """Proposes the plain continuation of registered prompts (all accepted under greedy)."""

    name = "oracle"

    def __init__(self) -> None:
        self.table: dict[tuple[int, ...], list[int]] = {}
        self._prompts: dict[str, tuple[int, ...]] = {}

    def start_request(self, request_id: str, prompt_ids: Sequence[int], tenant: str = "default") -> None:
        self._prompts[request_id] = tuple(prompt_ids)

    def propose(self, ctx: ProposeContext, max_draft_tokens: int) -> DraftProposal:
        plain = self.table.get(self._prompts.get(ctx.request_id, ()))
        if plain is None:
            return DraftProposal(speculator=self.name)
        pos = len(ctx.token_ids) - ctx.num_prompt_tokens
        return DraftProposal(token_ids=list(plain[pos : pos + max_draft_tokens]), speculator=self.name)

    def stop_request(self, request_id: str) -> None:
        self._prompts.pop(request_id, None)


class ByPromptController(Controller):
    """Oracle for prompts it knows, n-gram for the rest, always lookahead k."""

    def __init__(self, oracle: OracleSpeculator, lookahead: int) -> None:
        self.oracle = oracle
        self.lookahead = lookahead

    def decide(self, ctx: Any, max_lookahead: int) -> Decision:
        k = min(self.lookahead, max_lookahead)
        if k <= 0:
            return Decision(None, 0)
        known = tuple(ctx.token_ids[: ctx.num_prompt_tokens]) in self.oracle.table
        return Decision("oracle" if known else "ngram", k)


def make_engine(target: Any) -> tuple[Engine, OracleSpeculator]:
    oracle = OracleSpeculator()
    engine = Engine(target, [NgramSpeculator(), oracle], controller=ByPromptController(oracle, LOOKAHEAD))
    return engine, oracle


@pytest.fixture(scope="module")
def plain(tiny_target) -> Engine:
    return Engine(tiny_target, [])


@pytest.fixture(scope="module")
def served(tiny_target):
    engine, oracle = make_engine(tiny_target)
    app = create_app(engine, MODEL, max_active=8, max_queue=16, request_timeout_s=120)
    with BackgroundServer(app) as server:
        server.oracle = oracle
        server.scheduler = lambda: app.state.adaspec.scheduler
        yield server


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def plain_run(plain: Engine, prompt: str, max_tokens: int, chat: bool = False, **kw: Any):
    ids = plain.apply_chat_template([{"role": "user", "content": prompt}]) if chat else plain.encode_prompt(prompt)
    return plain.generate(ids, SamplingParams(max_tokens=max_tokens, **kw))


def stream_completion(client: openai.OpenAI, **kw: Any) -> tuple[str, list[Any]]:
    chunks = list(client.completions.create(model=MODEL, stream=True, **kw))
    return "".join(c.choices[0].text for c in chunks if c.choices), chunks


def stream_chat(client: openai.OpenAI, **kw: Any) -> tuple[str, list[Any]]:
    chunks = list(client.chat.completions.create(model=MODEL, stream=True, **kw))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


PROMPTS = [
    "The capital of France is",
    "Ünïcödé: 日本語のテキスト, emoji 🚀🎉 and accents é è ê",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
]


# ------------------------------------------------------------------ basics
def test_health_and_models(served, client) -> None:
    h = httpx.get(served.base_url + "/health").json()
    assert h["status"] == "ok" and h["model"] == MODEL
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other-model")


def test_completion_equals_plain_with_usage_and_stats(client, plain) -> None:
    want = plain_run(plain, PROMPTS[0], 24)
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0)
    assert r.object == "text_completion" and r.model == MODEL
    assert r.choices[0].text == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.usage.prompt_tokens, 24)
    assert r.usage.total_tokens == r.usage.prompt_tokens + 24
    ext = r.model_extra["adaspec"]
    for key in ("proposed", "accepted", "acceptance_rate", "mean_acceptance_length", "steps_by_speculator",
                "lookahead_hist", "speculator_shares", "target_forwards", "tenant", "ttft_s", "elapsed_s"):
        assert key in ext, key
    assert ext["tenant"] == "default" and ext["finish_detail"] is None
    assert sum(ext["steps_by_speculator"].values()) == ext["target_forwards"]
    assert 0.0 <= ext["acceptance_rate"] <= 1.0


def test_default_max_tokens_is_16_for_completions(client) -> None:
    r = client.completions.create(model=MODEL, prompt="Hello", temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


def test_chat_equals_plain(client, plain) -> None:
    want = plain_run(plain, "Say something.", 20, chat=True)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say something."}],
                                       max_tokens=20, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == want.usage.prompt_tokens
    assert r.model_extra["adaspec"]["target_forwards"] >= 1


@pytest.mark.parametrize("prompt", PROMPTS)
def test_streaming_equals_nonstreamed_and_plain(client, plain, prompt) -> None:
    """Greedy: SSE chunks concatenate to the non-streamed text, which equals plain decoding (both endpoints)."""
    n = 48
    want = plain_run(plain, prompt, n)
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0)
    streamed, chunks = stream_completion(client, prompt=prompt, max_tokens=n, temperature=0)
    assert full.choices[0].text == want.text == streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert "adaspec" in chunks[-1].model_extra

    want_chat = plain_run(plain, prompt, n, chat=True)
    full_chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=n, temperature=0)
    streamed_chat, chat_chunks = stream_chat(client, messages=[{"role": "user", "content": prompt}], max_tokens=n,
                                             temperature=0)
    assert full_chat.choices[0].message.content == want_chat.text == streamed_chat
    assert chat_chunks[0].choices[0].delta.role == "assistant"


def test_streaming_exercises_multibyte_characters(client, plain) -> None:
    """The tiny model emits byte-level pieces of multi-byte characters; streaming must not split them."""
    texts = []
    for prompt in PROMPTS:
        streamed, chunks = stream_completion(client, prompt=prompt, max_tokens=48, temperature=0)
        texts.append(streamed)
        for c in chunks:  # no chunk ends inside a character (no U+FFFD that later becomes a real one)
            if c.choices and c.choices[0].text:
                c.choices[0].text.encode("utf-8")
    assert any(ord(ch) > 127 for t in texts for ch in t), "no multi-byte output: pick other prompts"


def test_stream_options_include_usage(client) -> None:
    _, chunks = stream_completion(client, prompt="Hi", max_tokens=5, temperature=0,
                                  stream_options={"include_usage": True})
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])
    assert last.model_extra["adaspec"]["target_forwards"] >= 1
    _, chunks = stream_chat(client, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0)
    assert all(c.usage is None for c in chunks) and chunks[-1].choices[0].finish_reason == "length"


# ------------------------------------------------------------------ stop strings and logprobs
@pytest.mark.parametrize("as_list", [False, True])
def test_stop_string_cuts_like_plain(client, plain, as_list) -> None:
    base = plain_run(plain, PROMPTS[0], 40)
    stop = base.text[12:16]  # ends inside the output, after some tokens
    want = plain_run(plain, PROMPTS[0], 40, stop=[stop])
    assert want.finish_reason == "stop" and stop not in want.text
    arg = [stop, "never-appears-zz"] if as_list else stop
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=arg)
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == want.usage.completion_tokens
    streamed, chunks = stream_completion(client, prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=arg)
    assert streamed == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_completion_logprobs_equal_plain(client, plain) -> None:
    want = plain_run(plain, PROMPTS[0], 10, logprobs=3)
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=10, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens == 10
    for got, exp in zip(lp.token_logprobs, want.logprobs):
        assert got == pytest.approx(exp.logprob, abs=1e-3)
    for top in lp.top_logprobs:
        vals = list(top.values())
        assert 1 <= len(vals) <= 3 and vals == sorted(vals, reverse=True)
    assert "".join(lp.tokens) == r.choices[0].text or "\ufffd" in "".join(lp.tokens)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # Streaming carries the same logprobs, chunk by chunk.
    _, chunks = stream_completion(client, prompt=PROMPTS[0], max_tokens=10, temperature=0, logprobs=3)
    streamed = [v for c in chunks if c.choices and c.choices[0].logprobs
                for v in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-6)


def test_chat_logprobs(client, plain) -> None:
    want = plain_run(plain, "Hi", 8, chat=True, logprobs=2)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 8
    for entry, exp in zip(content, want.logprobs):
        assert entry.logprob == pytest.approx(exp.logprob, abs=1e-3)
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", errors="replace").startswith(
        r.choices[0].message.content[:1])
    r2 = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                        temperature=0)
    assert r2.choices[0].logprobs is None


def test_sampling_is_reproducible_with_seed_and_top_k_1_is_greedy(client, plain) -> None:
    kw = dict(model=MODEL, prompt=PROMPTS[0], max_tokens=12)
    a = client.completions.create(temperature=0.9, top_p=0.9, seed=1234, **kw).choices[0].text
    b = client.completions.create(temperature=0.9, top_p=0.9, seed=1234, **kw).choices[0].text
    assert a == b
    greedy = plain_run(plain, PROMPTS[0], 12).text
    assert client.completions.create(temperature=0.7, extra_body={"top_k": 1}, seed=3, **kw).choices[0].text == greedy


def test_token_id_prompt(client, plain) -> None:
    ids = plain.encode_prompt(PROMPTS[0])
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert r.choices[0].text == plain_run(plain, PROMPTS[0], 8).text


# ------------------------------------------------------------------ tenants and keys
def test_tenant_header(client, served) -> None:
    r = client.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=0,
                                  extra_headers={"X-Adaspec-Tenant": "team-rust"})
    assert r.model_extra["adaspec"]["tenant"] == "team-rust"
    bad = httpx.post(served.base_url + "/v1/completions", json={"model": MODEL, "prompt": "x"},
                     headers={"X-Adaspec-Tenant": "bad tenant!"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-Adaspec-Tenant"


def test_api_keys_map_to_tenants(tiny_target, tmp_path, monkeypatch) -> None:
    assert load_api_keys("k1:alice, k2:bob") == {"k1": "alice", "k2": "bob"}
    assert load_api_keys("solo") == {"solo": "default"}
    (tmp_path / "keys.json").write_text(json.dumps({"keys": [{"key": "j1", "tenant": "carol"}]}))
    assert load_api_keys(str(tmp_path / "keys.json")) == {"j1": "carol"}
    (tmp_path / "keys.toml").write_text('[keys]\nt1 = "dave"\n')
    assert load_api_keys(str(tmp_path / "keys.toml")) == {"t1": "dave"}
    with pytest.raises(ValueError):
        load_api_keys(":nobody")
    engine, _ = make_engine(tiny_target)
    with BackgroundServer(create_app(engine, MODEL, api_keys=load_api_keys("k1:alice,k2:bob"))) as server:
        ok = openai.OpenAI(base_url=server.base_url + "/v1", api_key="k2", max_retries=0)
        r = ok.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=0,
                                  extra_headers={"X-Adaspec-Tenant": "ignored-with-keys"})
        assert r.model_extra["adaspec"]["tenant"] == "bob"
        wrong = openai.OpenAI(base_url=server.base_url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            wrong.completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert e.value.body["code"] == "invalid_api_key"
        assert httpx.get(server.base_url + "/v1/models").status_code == 401
        assert httpx.get(server.base_url + "/health").status_code == 200  # operational endpoints stay open


# ------------------------------------------------------------------ bad input
BAD_INPUTS = [
    # (name, body bytes or JSON object, path, expected status, expected param or None)
    ("malformed json", b'{"model": "tiny-test", "prompt": "x"', "completions", 400, None),
    ("invalid utf-8", b'{"model": "tiny-test", "prompt": "\xff\xfe"}', "completions", 400, None),
    ("empty body", b"", "completions", 400, None),
    ("not an object", b"[1, 2]", "completions", 400, None),
    ("missing prompt", {"model": MODEL}, "completions", 400, "prompt"),
    ("missing model", {"prompt": "x"}, "completions", 400, "model"),
    ("wrong type max_tokens", {"model": MODEL, "prompt": "x", "max_tokens": "5"}, "completions", 400, "max_tokens"),
    ("bool max_tokens", {"model": MODEL, "prompt": "x", "max_tokens": True}, "completions", 400, "max_tokens"),
    ("negative max_tokens", {"model": MODEL, "prompt": "x", "max_tokens": -3}, "completions", 400, "max_tokens"),
    ("huge max_tokens", {"model": MODEL, "prompt": "x", "max_tokens": 10**20}, "completions", 400, "max_tokens"),
    ("prompt beyond window", {"model": MODEL, "prompt": "word " * 2000}, "completions", 400, "prompt"),
    ("token ids outside vocab", {"model": MODEL, "prompt": [1, 10**9]}, "completions", 400, "prompt"),
    ("two prompts", {"model": MODEL, "prompt": ["a", "b"]}, "completions", 400, "prompt"),
    ("unknown model", {"model": "gpt-9", "prompt": "x"}, "completions", 404, "model"),
    ("unknown field", {"model": MODEL, "prompt": "x", "frobnicate": 1}, "completions", 400, "frobnicate"),
    ("n=0", {"model": MODEL, "prompt": "x", "n": 0}, "completions", 400, "n"),
    ("n too large", {"model": MODEL, "prompt": "x", "n": 65}, "completions", 400, "n"),
    ("n not an int", {"model": MODEL, "prompt": "x", "n": "2"}, "completions", 400, "n"),
    ("n bool", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": True}, "chat/completions",
     400, "n"),
    ("n float", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 1.5}, "chat/completions",
     400, "n"),
    ("best_of", {"model": MODEL, "prompt": "x", "best_of": 3}, "completions", 400, "best_of"),
    ("echo", {"model": MODEL, "prompt": "x", "echo": True}, "completions", 400, "echo"),
    ("presence_penalty out of range", {"model": MODEL, "prompt": "x", "presence_penalty": 2.5}, "completions", 400,
     "presence_penalty"),
    ("repetition_penalty", {"model": MODEL, "prompt": "x", "repetition_penalty": 1.2}, "completions", 400,
     "repetition_penalty"),
    ("logit_bias not a token", {"model": MODEL, "prompt": "x", "logit_bias": {"abc": 1}}, "completions", 400,
     "logit_bias"),
    ("logit_bias outside vocab", {"model": MODEL, "prompt": "x", "logit_bias": {"99999999": 1}}, "completions",
     400, "logit_bias"),
    ("min_p out of range", {"model": MODEL, "prompt": "x", "min_p": 1.5}, "completions", 400, "min_p"),
    ("temperature nan-ish", b'{"model": "tiny-test", "prompt": "x", "temperature": NaN}', "completions", 400,
     "temperature"),
    ("temperature too high", {"model": MODEL, "prompt": "x", "temperature": 5}, "completions", 400, "temperature"),
    ("top_p zero", {"model": MODEL, "prompt": "x", "top_p": 0}, "completions", 400, "top_p"),
    ("empty stop string", {"model": MODEL, "prompt": "x", "stop": [""]}, "completions", 400, "stop"),
    ("logprobs too many", {"model": MODEL, "prompt": "x", "logprobs": 50}, "completions", 400, "logprobs"),
    ("lone surrogate", b'{"model": "tiny-test", "prompt": "\\ud800"}', "completions", 400, "prompt"),
    ("stream_options without stream", {"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}},
     "completions", 400, "stream_options"),
    ("empty messages", {"model": MODEL, "messages": []}, "chat/completions", 400, "messages"),
    ("message without role", {"model": MODEL, "messages": [{"content": "x"}]}, "chat/completions", 400,
     "messages[0].role"),
    ("tool message without id", {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]},
     "chat/completions", 400, "messages[0].tool_call_id"),
    ("image part", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, "chat/completions", 400, "messages[0].content"),
    ("tool without function", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                               "tools": [{"type": "function"}]}, "chat/completions", 400, "tools[0].function"),
    ("malformed tool schema", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "g", "parameters": {"type": "nonsense"}}}]},
     "chat/completions", 400, "tools[1].function.parameters"),
    ("unknown tool_choice name", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [
        {"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function",
                                                                        "function": {"name": "nope"}}},
     "chat/completions", 400, "tool_choice.function.name"),
    ("unknown tool_choice mode", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [
        {"type": "function", "function": {"name": "f"}}], "tool_choice": "sometimes"},
     "chat/completions", 400, "tool_choice"),
    ("tool_choice without tools", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                   "tool_choice": "required"}, "chat/completions", 400, "tool_choice"),
    ("duplicate tool names", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [
        {"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]},
     "chat/completions", 400, "tools[1].function.name"),
    ("malformed response schema", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                   "response_format": {"type": "json_schema", "json_schema": {
                                       "name": "r", "schema": {"type": "object", "properties": 7}}}},
     "chat/completions", 400, "response_format.json_schema.schema"),
    ("response_format unknown type", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                      "response_format": {"type": "yaml"}}, "chat/completions", 400,
     "response_format.type"),
    ("functions (deprecated)", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                "functions": [{"name": "f"}]}, "chat/completions", 400, "functions"),
    ("top_logprobs without logprobs", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                       "top_logprobs": 2}, "chat/completions", 400, "top_logprobs"),
    ("chat prompt beyond window", {"model": MODEL, "messages": [{"role": "user", "content": "word " * 2000}]},
     "chat/completions", 400, "messages"),
]


@pytest.mark.parametrize("name,body,path,status,param", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_a_4xx_with_an_error_object(served, name, body, path, status, param) -> None:
    url = f"{served.base_url}/v1/{path}"
    if isinstance(body, bytes):
        r = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=30)
    else:
        r = httpx.post(url, json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    if param is not None:
        assert err["param"] == param, err


def test_unknown_path_and_method_are_json_errors(served) -> None:
    r = httpx.get(served.base_url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(served.base_url + "/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_form_encoded_json_body_still_parses(served) -> None:
    """``curl -d '{...}'`` sends a form content type; the JSON body is still read."""
    payload = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 2})
    r = httpx.post(served.base_url + "/v1/completions", content=payload,
                   headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


# ------------------------------------------------------------------ F10: one request disturbs another
def test_f10_concurrent_requests_each_equal_their_solo_run(served, client, plain) -> None:
    """Half repetitive (oracle: long accepted drafts; n-gram: proposed and rejected), half novel; one max_tokens 2."""
    repetitive = ["the cat sat on the mat. " * 6, "1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3,", "abc abc abc abc abc abc"]
    novel = ["Quantum zebras negotiate", "Una frase completamente nueva:", "Ω≈ç√∫"]
    jobs = [  # (prompt, max_tokens, stream, chat, oracle)
        (repetitive[0], 64, False, False, True),
        (repetitive[1], 40, True, False, True),
        (repetitive[2], 48, False, False, False),
        (novel[0], 56, True, False, False),
        (novel[1], 2, False, False, False),
        (novel[2], 32, True, True, False),
    ]
    want = []
    for prompt, n, _, chat, use_oracle in jobs:
        ids = plain.apply_chat_template([{"role": "user", "content": prompt}]) if chat else plain.encode_prompt(prompt)
        ref = plain.generate(ids, SamplingParams(max_tokens=n))
        if use_oracle:
            served.oracle.table[tuple(ids)] = list(ref.token_ids)
        want.append(ref)

    finished_at: dict[int, float] = {}
    barrier = threading.Barrier(len(jobs))

    def run(i: int) -> tuple[str, dict[str, Any], str]:
        prompt, n, stream, chat, _ = jobs[i]
        barrier.wait()
        if chat:
            msgs = [{"role": "user", "content": prompt}]
            if stream:
                text, chunks = stream_chat(client, messages=msgs, max_tokens=n, temperature=0)
                out = text, chunks[-1].model_extra["adaspec"], chunks[-1].choices[0].finish_reason
            else:
                r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=n, temperature=0)
                out = r.choices[0].message.content, r.model_extra["adaspec"], r.choices[0].finish_reason
        elif stream:
            text, chunks = stream_completion(client, prompt=prompt, max_tokens=n, temperature=0)
            out = text, chunks[-1].model_extra["adaspec"], chunks[-1].choices[0].finish_reason
        else:
            r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0)
            out = r.choices[0].text, r.model_extra["adaspec"], r.choices[0].finish_reason
        finished_at[i] = time.perf_counter()
        return out

    before_peak = served.scheduler().peak_active
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(run, range(len(jobs))))
    for (text, ext, finish), ref, job in zip(results, want, jobs):
        assert text == ref.text, job[0]
        assert finish == ref.finish_reason
    oracle_stats = [results[i][1] for i, job in enumerate(jobs) if job[4]]
    for ext in oracle_stats:  # long drafts, all accepted
        assert ext["acceptance_rate"] == 1.0 and ext["mean_acceptance_length"] > 4, ext
    assert results[2][1]["proposed"] > 0  # n-gram drafted on the repetitive prompt
    assert served.scheduler().peak_active >= 3 or before_peak >= 3
    short = next(i for i, j in enumerate(jobs) if j[1] == 2)
    # The slowest request (most target forwards: long, and no oracle drafts) must not hold up the short one.
    longest = max((i for i in range(len(jobs)) if not jobs[i][4]), key=lambda i: jobs[i][1])
    assert finished_at[short] < finished_at[longest]


# ------------------------------------------------------------------ metrics
def test_metrics_after_traffic(served, client, plain) -> None:
    ids = plain.encode_prompt("metrics please")
    served.oracle.table[tuple(ids)] = list(plain.generate(ids, SamplingParams(max_tokens=12)).token_ids)
    client.completions.create(model=MODEL, prompt="metrics please", max_tokens=12, temperature=0)
    client.completions.create(model=MODEL, prompt="no oracle here", max_tokens=4, temperature=0)
    text = httpx.get(served.base_url + "/metrics").text
    for name in ("adaspec_requests_total", "adaspec_generation_tokens_total", "adaspec_tokens_per_second",
                 "adaspec_time_to_first_token_seconds_bucket", "adaspec_inter_token_latency_seconds_bucket",
                 "adaspec_draft_tokens_per_step_bucket", "adaspec_controller_steps_total", "adaspec_queue_depth",
                 "adaspec_intra_op_threads", "adaspec_active_requests", "adaspec_request_errors_total"):
        assert name in text, name
    assert 'adaspec_acceptance_rate{speculator="oracle"} 1.0' in text
    assert 'adaspec_mean_acceptance_length{speculator="oracle"}' in text
    assert 'adaspec_controller_steps_total{speculator="none"}' in text or "ngram" in text
    stats = httpx.get(served.base_url + "/dashboard/stats.json").json()
    assert stats["totals"]["requests"] > 0 and stats["recent_requests"]
    assert stats["series"]["tokens_per_s"][-30:] != [0] * 30


# ------------------------------------------------------------------ lifecycle
class _StatefulSpeculator(Speculator):
    name = "learner"

    def __init__(self) -> None:
        self.seen = 0
        self.loaded: Optional[dict[str, Any]] = None

    def propose(self, ctx: ProposeContext, max_draft_tokens: int) -> DraftProposal:
        return DraftProposal(speculator=self.name)

    def observe(self, request_id: str, token_ids: Sequence[int], num_accepted: int, num_draft_tokens: int) -> None:
        self.seen += len(token_ids)

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded = state
        self.seen = int(state.get("seen", 0))

    def memory_stats(self) -> dict[str, Any]:
        return {"tenants": {"default": {"tokens": self.seen, "nodes": 1}}}


class _MemoryStore:
    def __init__(self, initial: dict[str, dict[str, Any]]) -> None:
        self.data = dict(initial)
        self.saved: list[str] = []

    def load(self, name: str) -> Optional[dict[str, Any]]:
        return self.data.get(name)

    def save(self, name: str, state: dict[str, Any]) -> None:
        self.data[name] = state
        self.saved.append(name)


def test_learned_state_restored_at_start_and_saved_at_shutdown(tiny_target) -> None:
    spec = _StatefulSpeculator()
    store = _MemoryStore({"learner": {"seen": 100}})
    with BackgroundServer(create_app(Engine(tiny_target, [spec]), MODEL, state_store=store)) as server:
        assert spec.loaded == {"seen": 100}
        c = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
        c.completions.create(model=MODEL, prompt="learn this", max_tokens=5, temperature=0)
        assert 'adaspec_learned_state_tokens{speculator="learner",tenant="default"} 105.0' in httpx.get(
            server.base_url + "/metrics").text
    assert store.saved == ["learner"] and store.data["learner"] == {"seen": 105}
