"""The suffix speculator inside the engine: exactness, learning across requests, CLI state."""

import json
import subprocess
import sys

import pytest

from adaspec.engine import Engine
from adaspec.speculators import SuffixSpeculator
from adaspec.types import SamplingParams

PROMPTS = ["SELECT name FROM singer WHERE age > 30", "SELECT count(*) FROM singer", "def add(a, b):\n    return"]


@pytest.mark.parametrize("k", [1, 2, 4, 8, 16])
def test_suffix_greedy_exact_every_lookahead(tiny_target, k):
    spec = SuffixSpeculator()
    eng, plain = Engine(tiny_target, [spec], lookahead=k), Engine(tiny_target)
    for rep in range(2):  # the second pass drafts from what the first taught
        for p in PROMPTS:
            params = SamplingParams(max_tokens=24, ignore_eos=True)
            assert eng.generate(p, params).token_ids == plain.generate(p, params).token_ids


def test_suffix_learns_from_previous_request(tiny_target):
    spec = SuffixSpeculator()
    eng = Engine(tiny_target, [spec], lookahead=8)
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    first = eng.generate(PROMPTS[0], params)
    second = eng.generate(PROMPTS[0], params)
    assert second.token_ids == first.token_ids
    assert second.speculation.accepted > first.speculation.accepted
    assert second.speculation.mean_acceptance_length > 3.0


def test_suffix_tenants_isolated_in_engine(tiny_target):
    spec = SuffixSpeculator()
    eng = Engine(tiny_target, [spec], lookahead=8)
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    eng.generate(PROMPTS[2], params, tenant="a")
    other = eng.generate(PROMPTS[2], params, tenant="b")
    again = eng.generate(PROMPTS[2], params, tenant="a")
    assert again.speculation.accepted > other.speculation.accepted


def test_cli_state_dir_round_trip(tiny_model_dir, tmp_path):
    """`adaspec generate --speculator suffix --state-dir` persists what it learned."""
    state = tmp_path / "state"
    cmd = [sys.executable, "-m", "adaspec.cli", "generate", "--model", str(tiny_model_dir), "--prompt", "hello there",
           "--max-tokens", "16", "--speculator", "suffix", "--state-dir", str(state), "--json",
           "--dtype", "float32"]
    first = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    second = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    assert first["token_ids"] == second["token_ids"]
    assert second["speculation"]["accepted"] > first["speculation"]["accepted"]
    out = subprocess.run([sys.executable, "-m", "adaspec.cli", "state", "inspect", str(state)],
                         capture_output=True, text=True, check=True).stdout
    assert "suffix" in out and "default" in out


def test_restart_bench_replays_as_well_after_a_restart(tiny_model_dir, tmp_path):
    # Three real servers in turn; learned state passes only through the snapshot files.
    from adaspec.bench.restart import format_restart, run_restart_bench

    before, after, cold = run_restart_bench(str(tiny_model_dir), "float32", "suffix", ["sql"], learn=3, replay=2,
                                            max_tokens=12, state_dir=str(tmp_path / "state"), progress=False)
    assert (tmp_path / "state").glob("*")
    assert after.outputs == before.outputs == cold.outputs  # greedy: same text whoever drafts
    # Restored state drafts the repeated traffic exactly as before the restart; a cold server cannot.
    assert after.mean_acceptance_length == before.mean_acceptance_length
    assert before.mean_acceptance_length > (cold.mean_acceptance_length or 1.0)
    table = format_restart([before, after, cold])
    assert "after restart" in table and "2/2" in table


def test_state_inspect_of_a_missing_directory_is_an_error(tmp_path, capsys):
    from adaspec import cli

    assert cli.main(["state", "inspect", str(tmp_path / "nope")]) == 2
    assert "no such state directory" in capsys.readouterr().err
