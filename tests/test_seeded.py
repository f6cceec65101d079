"""A seed means one output: under every speculator, every lookahead, beside other requests.

Seeded sampled requests are verified with coupled (drafter-invariant) sampling
(``adaspec.verify.verify_coupled``): the draw at each output position depends
on the seed, the position and the target's distribution only.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from adaspec.config import EngineConfig, build_controller
from adaspec.engine import Engine
from adaspec.server.app import create_app
from adaspec.server.testing import BackgroundServer
from adaspec.types import SamplingParams

CODE_PROMPT = ("def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n"
               "def mul(a, b):\n    return a * b\n\ndef div(a, b):\n")
SPECULATORS = ["none", "ngram", "suffix", "static", "atlas"]


def seeded_params(seed: int, max_tokens: int = 40) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.95, seed=seed, ignore_eos=True)


@pytest.mark.real_model
def test_seeded_request_identical_under_every_speculator_and_lookahead(real_target):
    """The issue's case: atlas (and each speculator alone) gives the plain seeded output, for any k."""
    t = real_target
    prompts = [t.tokenizer.encode(CODE_PROMPT), t.tokenizer.encode("The three primary colors are")]
    want = {(i, seed): Engine(t).generate(p, seeded_params(seed, 24)).token_ids
            for i, p, seed in [(0, prompts[0], 1), (1, prompts[1], 2)]}
    drafted = {}
    for name in SPECULATORS:
        for k in (2, 6):
            eng = Engine(t, controller=build_controller(EngineConfig(speculator=name, lookahead=k, calibrate=False), t))
            for (i, seed), ref in want.items():
                r = eng.generate(prompts[i], seeded_params(seed, 24))
                assert r.token_ids == ref, (name, k, i, seed)
                drafted[name] = drafted.get(name, 0) + r.speculation.proposed
            # Repeated on the same engine (the suffix speculator has now learned the outputs): same tokens.
            assert eng.generate(prompts[0], seeded_params(1, 24)).token_ids == want[(0, 1)], (name, k)
    assert all(drafted[n] > 0 for n in SPECULATORS if n != "none"), drafted


def test_seeded_request_identical_beside_unseeded_concurrent_requests(tiny_target):
    """Through the server's scheduler (interleaved steps) with unseeded sampled requests around it."""
    plain = Engine(tiny_target)
    prompt = "the cat sat on the mat. " * 4
    ref = plain.generate(plain.encode_prompt(prompt), seeded_params(7, 48))
    from adaspec.speculators import NgramSpeculator

    atlas = build_controller(EngineConfig(speculator="atlas", lookahead=5, calibrate=False), tiny_target)
    engine = Engine(tiny_target, [NgramSpeculator()], controller=atlas)
    app = create_app(engine, "m", max_active=8, max_queue=16, request_timeout_s=120)
    with BackgroundServer(app) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=120)

        def seeded():
            return client.completions.create(model="m", prompt=prompt, max_tokens=48, temperature=0.8, top_p=0.95,
                                             seed=7, extra_body={"ignore_eos": True}).choices[0].text

        def unseeded(i: int):
            r = client.completions.create(model="m", prompt=f"{i} " * (3 + i) + prompt, max_tokens=20 + 9 * i,
                                          temperature=1.0, stream=i % 2 == 0)
            return "".join(c.choices[0].text for c in r if c.choices) if i % 2 == 0 else r.choices[0].text

        alone = seeded()
        barrier = threading.Barrier(5)

        def run(i: int):
            barrier.wait()
            return seeded() if i == 0 else unseeded(i)

        with ThreadPoolExecutor(5) as pool:
            together = list(pool.map(run, range(5)))[0]
        assert app.state.adaspec.scheduler.peak_active >= 2
    assert alone == ref.text
    assert together == ref.text
