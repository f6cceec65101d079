"""Bad input found by an adversarial pass over the API: each gets a 4xx naming the problem, never a 5xx.

Lone surrogates (JSON's ``\\ud800`` escapes) anywhere in a body, deeply nested admin bodies, schemas that
compile but cannot start, ``n`` past the server's capacity, the top of the seed range with ``n`` > 1,
stop token ids outside the vocabulary, and HEAD on ``/health``.
"""

from __future__ import annotations

import json

import httpx
import pytest

from adaspec.engine import Engine
from adaspec.server import create_app
from adaspec.server.testing import BackgroundServer
from adaspec.speculators import NgramSpeculator

MODEL = "tiny-inputs"
ADMIN = "adm1n"


@pytest.fixture(scope="module")
def server(tiny_target):
    app = create_app(Engine(tiny_target, [NgramSpeculator()], lookahead=4), MODEL, max_active=2, max_queue=3,
                     admin_key=ADMIN)
    with BackgroundServer(app) as s:
        yield s


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as c:  # one keep-alive connection
        yield c


def post(client, path, raw: str, **headers):
    return client.post(path, content=raw.encode(), headers={"content-type": "application/json", **headers})


def chat(**extra) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    body.update(extra)
    return body


def error(r, status: int, code: str, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


@pytest.mark.parametrize("path, raw, param", [
    ("/v1/completions", '{"model": "\\ud800", "prompt": "hi", "max_tokens": 2}', "model"),
    ("/v1/chat/completions", json.dumps(chat(tools=[{"type": "function", "function": {
        "name": "f", "description": "SURR"}}])), "tools[0].function.description"),
    ("/v1/chat/completions", json.dumps(chat(messages=[
        {"role": "user", "content": "hi"},
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                              "function": {"name": "f", "arguments": "SURR"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "1"}])), "messages[1].tool_calls[0].function.arguments"),
    ("/v1/chat/completions", json.dumps(chat(metadata={"SURR": 1})), "metadata.<key>"),
])
def test_lone_surrogates_anywhere_are_400_and_the_connection_still_serves(client, path, raw, param):
    raw = raw.replace("SURR", "\\ud800")
    error(post(client, path, raw), 400, "invalid_encoding", param)
    ok = post(client, "/v1/completions", json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2}))
    assert ok.status_code == 200, ok.text


def test_admin_body_errors_are_400(client):
    auth = {"authorization": f"Bearer {ADMIN}"}
    error(post(client, "/admin/weights", "[" * 100000 + "]" * 100000, **auth), 400, "invalid_json")
    error(post(client, "/admin/weights", '{"path": "/tmp/\\ud800"}', **auth), 400, "invalid_encoding", "path")
    r = client.post("/admin/weights", content=b'{"path": "\xff"}', headers={"content-type": "application/json", **auth})
    error(r, 400, "invalid_encoding")


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
    {"type": "array", "items": {"$ref": "#"}, "minItems": 1},
])
def test_schema_that_compiles_but_cannot_start_is_400(client, schema):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    error(post(client, "/v1/chat/completions", json.dumps(chat(response_format=fmt))), 400, "invalid_schema")
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    error(post(client, "/v1/chat/completions", json.dumps(chat(tools=tools, tool_choice="required"))), 400,
          "invalid_schema")


def test_n_past_the_servers_capacity_is_400_not_retry_later(client):
    err = error(post(client, "/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 1, "n": 6})),
                400, "invalid_value", "n")
    assert "capacity of 5" in err["message"]
    r = post(client, "/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 1, "n": 5}))
    assert r.status_code == 200 and len(r.json()["choices"]) == 5, r.text


def test_top_of_the_seed_range_with_n_wraps_modulo_2_64(client):
    """Choice i is seeded seed + i modulo 2**64: with seed 2**64 - 1, choice 1 is seed 0's draw."""
    def completion(seed, n):
        body = {"model": MODEL, "prompt": "Once upon", "max_tokens": 6, "temperature": 1.0, "seed": seed, "n": n}
        r = post(client, "/v1/completions", json.dumps(body))
        assert r.status_code == 200, r.text
        return [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]

    top, zero = completion(2**64 - 1, 2), completion(0, 1)
    assert top[0] == completion(2**64 - 1, 1)[0] and top[1] == zero[0]


def test_stop_token_ids_outside_the_vocabulary_are_400(client, tiny_target):
    for bad in (-1, tiny_target.vocab_size):
        error(post(client, "/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 1,
                                                          "stop_token_ids": [5, bad]})),
              400, "invalid_value", "stop_token_ids")


def test_head_health(client):
    r = client.head("/health")
    assert r.status_code == 200
