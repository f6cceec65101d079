"""``adaspec serve`` options and the real serving path: a subprocess, a chat, Ctrl-C, a snapshot."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from adaspec.engine import Engine
from adaspec.models import DEFAULT_MODEL
from adaspec.server import add_serve_arguments, create_app
from adaspec.config import DEFAULT_LOOKAHEAD, SPECULATORS, EngineConfig, build_engine, default_lookahead
from adaspec.server.main import (
    DEFAULT_MAX_ACTIVE,
    DEFAULT_MAX_QUEUE,
    DEFAULT_REQUEST_TIMEOUT_S,
    DEFAULT_SHUTDOWN_TIMEOUT_S,
)
from adaspec.server.testing import BackgroundServer


def test_serve_argument_defaults() -> None:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    a = parser.parse_args([])
    assert (a.model, a.dtype, a.speculator, a.lookahead) == (DEFAULT_MODEL, "int8", "atlas", None)
    assert (default_lookahead("ngram"), default_lookahead("atlas")) == (DEFAULT_LOOKAHEAD, 16)
    assert (a.host, a.port, a.served_model_name, a.max_model_len) == ("127.0.0.1", 8000, None, None)
    assert (a.max_queue, a.max_active, a.request_timeout) == (DEFAULT_MAX_QUEUE, DEFAULT_MAX_ACTIVE,
                                                             DEFAULT_REQUEST_TIMEOUT_S)
    assert (a.shutdown_timeout, a.api_keys, a.state_dir) == (DEFAULT_SHUTDOWN_TIMEOUT_S, None, None)
    assert (DEFAULT_LOOKAHEAD, DEFAULT_MAX_QUEUE, DEFAULT_MAX_ACTIVE) == (8, 32, 16)
    assert {"none", "ngram", "suffix"} <= set(SPECULATORS)


def test_create_app_defaults(tiny_target) -> None:
    target = dataclasses.replace(tiny_target, max_model_len=48)
    app = create_app(Engine(target, []))
    with BackgroundServer(app) as server:
        ctx = app.state.adaspec
        assert ctx.served_model_name == tiny_target.name  # default: the target's name
        assert (ctx.scheduler.max_queue, ctx.scheduler.max_active, ctx.request_timeout_s) == (32, 8, 600.0)
        assert ctx.drain_timeout_s == 30.0
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
        # Chat max_tokens defaults to the rest of the context window.
        r = client.chat.completions.create(model=target.name, messages=[{"role": "user", "content": "hi"}],
                                           temperature=0, extra_body={"ignore_eos": True})
        assert r.choices[0].finish_reason == "length" and r.usage.total_tokens == 48
        # temperature defaults to 1.0 (OpenAI's default), not greedy.
        kw = dict(model=target.name, prompt="Once upon a time", max_tokens=6, seed=7)
        default = client.completions.create(**kw).choices[0].text
        assert default == client.completions.create(temperature=1.0, **kw).choices[0].text
        assert default != client.completions.create(temperature=0, **kw).choices[0].text


def test_build_engine(tiny_model_dir) -> None:
    plain = build_engine(EngineConfig(str(tiny_model_dir), speculator="none", max_model_len=128))
    assert plain.speculators == {} and plain.target.max_model_len == 128
    ngram = build_engine(EngineConfig(str(tiny_model_dir), speculator="ngram", lookahead=3))
    assert list(ngram.speculators) == ["ngram"] and ngram.controller.lookahead == 3
    with pytest.raises(ValueError):
        build_engine(EngineConfig(str(tiny_model_dir), speculator="psychic"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_subprocess_chat_and_graceful_shutdown(tiny_model_dir, tmp_path: Path) -> None:
    """The process `adaspec serve` runs: stream a chat, then SIGINT saves learned state and exits 0."""
    port = _free_port()
    state_dir = tmp_path / "state"
    cmd = [sys.executable, "-m", "adaspec.server.main", "--model", str(tiny_model_dir), "--port", str(port),
           "--served-model-name", "tiny-cli", "--max-model-len", "256", "--log-level", "warning",
           "--speculator", "suffix", "--state-dir", str(state_dir),
           "--api-keys", "secret:team-a", "--shutdown-timeout", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=base + "/v1", api_key="secret", max_retries=0)
        chunks = list(client.chat.completions.create(
            model="tiny-cli", messages=[{"role": "user", "content": "hello hello hello"}], max_tokens=12,
            temperature=0, stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].usage.completion_tokens == 12
        assert chunks[-1].model_extra["adaspec"]["tenant"] == "team-a"
        assert "adaspec_requests_total" in httpx.get(base + "/metrics").text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out
    # The suffix speculator learned from the chat: shutdown wrote its snapshot.
    assert (state_dir / "suffix.snap").is_file(), (list(state_dir.glob("*")), out)
