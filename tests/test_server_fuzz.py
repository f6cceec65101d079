"""Fuzz the API from its own OpenAPI schema (schemathesis): no input may get a 5xx.

Positive cases (bodies that fit the schema) reach the engine; negative cases
(bodies that violate it) must be rejected with a 4xx. The run is bounded: a
small context window and request timeout keep each generation short, and
``max_examples`` keeps the whole test near a minute on two cores.
"""

from __future__ import annotations

import dataclasses

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (see requirements.lock)")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from adaspec.engine import Engine  # noqa: E402
from adaspec.server import create_app  # noqa: E402
from adaspec.server.testing import BackgroundServer  # noqa: E402
from adaspec.speculators import NgramSpeculator  # noqa: E402

MODEL = "tiny-fuzz"
MAX_EXAMPLES = {GenerationMode.POSITIVE: 60, GenerationMode.NEGATIVE: 100}


@pytest.fixture(scope="module")
def fuzz_server(tiny_target):
    target = dataclasses.replace(tiny_target, max_model_len=32)  # same weights, short generations
    app = create_app(Engine(target, [NgramSpeculator()], lookahead=4), MODEL, request_timeout_s=1.0,
                     max_queue=64)
    with BackgroundServer(app) as server:
        yield server


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_fuzzing_finds_no_server_error(fuzz_server, mode) -> None:
    schema = schemathesis.openapi.from_url(fuzz_server.base_url + "/openapi.json")
    seen: dict[int, int] = {}

    @given(case=schema.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES[mode], deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def run(case) -> None:
        response = case.call(base_url=fuzz_server.base_url, timeout=30)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
        if response.status_code >= 400 and case.path.startswith("/v1/"):
            err = response.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}, err

    run()
    if mode == GenerationMode.POSITIVE:  # valid bodies did reach the engine
        assert seen.get(200, 0) > 0, seen
    else:
        assert any(400 <= s < 500 for s in seen), seen
