"""Prompt sets (adaspec.prompts): where they are read from, the shipped subset, and small helpers."""

from __future__ import annotations

import pytest

from adaspec import prompts
from adaspec.types import common_prefix_len

# The shipped subset must carry the default drift stream at this many requests per phase.
SHIPPED_PHASE_LENGTH = 30


def test_prompts_root_order(tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    shared = prompts.shared_prompts_root()
    monkeypatch.setenv("ADASPEC_PROMPTS", str(mine))
    assert prompts.prompts_root() == mine
    monkeypatch.delenv("ADASPEC_PROMPTS")
    if shared is not None:
        assert prompts.prompts_root() == prompts.prompts_root(shipped=False) == shared
    monkeypatch.setattr(prompts, "shared_prompts_root", lambda: None)
    assert prompts.prompts_root() == prompts.shipped_prompts_root()
    with pytest.raises(FileNotFoundError):
        prompts.prompts_root(shipped=False)  # the trainer's splits need the full sets


def test_shipped_subset_carries_the_default_stream(monkeypatch):
    from adaspec.bench.drift import DEFAULT_PHASES, build_phases

    root = prompts.shipped_prompts_root()
    assert (root / "SOURCES.md").is_file()
    for domain in prompts.DOMAINS:
        rows = prompts.load_domain(domain, root)
        assert len(rows) >= SHIPPED_PHASE_LENGTH, domain
        assert len({p.prompt_id for p in rows}) == len(rows), domain
    for folder in ("humaneval", "humaneval_x_rust", "mt_bench", "spec_bench", "spider", "bfcl", "python_stdlib"):
        assert (root / folder / "LICENSE").is_file(), folder
    monkeypatch.delenv("ADASPEC_PROMPTS", raising=False)
    monkeypatch.setattr(prompts, "shared_prompts_root", lambda: None)
    phases = build_phases(list(DEFAULT_PHASES), SHIPPED_PHASE_LENGTH)  # what a copy with nothing beside it runs
    assert [len(p.prompts) for p in phases] == [SHIPPED_PHASE_LENGTH] * len(DEFAULT_PHASES)


def test_shipped_rows_are_rows_of_the_full_sets():
    shared = prompts.shared_prompts_root()
    if shared is None:
        pytest.skip("full prompt sets not present")
    shipped = prompts.shipped_prompts_root()
    for domain in ("python", "rust", "chat", "tools"):
        full = {p.prompt_id: p.messages for p in prompts.load_domain(domain, shared)}
        for p in prompts.load_domain(domain, shipped):
            assert full[p.prompt_id] == p.messages, (domain, p.prompt_id)
    full_sql = {p.messages[0]["content"] for p in prompts.load_domain("sql", shared)}
    assert all(p.messages[0]["content"] in full_sql for p in prompts.load_domain("sql", shipped))


def test_task_number():
    assert prompts.task_number({"task_id": "HumanEval/17"}) == 17
    assert prompts.task_number({"task_id": "Rust/0"}) == 0
    with pytest.raises(ValueError):
        prompts.task_number({"task_id": "x"})


@pytest.mark.parametrize("a, b, n", [
    ([], [], 0), ([1, 2], [], 0), ([1, 2, 3], [1, 2, 3], 3), ([1, 2, 3], [1, 2], 2),
    ([1, 2, 3], [1, 5, 3], 1), ([4], [5], 0), ((1, 2, 9), [1, 2, 3, 4], 2),
])
def test_common_prefix_len(a, b, n):
    assert common_prefix_len(a, b) == n == common_prefix_len(b, a)


def test_runtime_never_imports_bench():
    """Only the benchmarks (and the command line that runs them) may import adaspec.bench."""
    import re
    from pathlib import Path

    import adaspec

    src = Path(adaspec.__file__).parent
    offenders = [str(p.relative_to(src)) for p in src.rglob("*.py")
                 if p.parts[len(src.parts)] not in ("bench", "cli.py")
                 and re.search(r"\bfrom adaspec\.bench\b|\bimport adaspec\.bench\b|from adaspec import bench\b",
                               p.read_text(encoding="utf-8"))]
    assert offenders == []
