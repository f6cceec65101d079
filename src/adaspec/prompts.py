"""Prompt sets: the benchmarks' workloads, the int8 calibration texts' source, the trainer's data.

Each loader returns a list of :class:`BenchPrompt`; chat prompts are rendered
through the model's chat template by the caller. Where the sets are read from
(:func:`prompts_root`), first found wins:

1. ``$ADASPEC_PROMPTS``;
2. ``../shared/data/prompts`` beside the repository (the full sets);
3. the subset shipped inside the package, ``adaspec/data/prompts`` (a few
   dozen prompts per domain, see its SOURCES.md), so a copy of the project with
   nothing beside it still runs ``adaspec demo``.

The int8 calibration and held-out texts (:mod:`adaspec.quant.calibration`)
always read the shipped subset, so the int8 model is the same on every machine.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

DOMAINS = ("python", "rust", "chat", "sql", "tools", "noise")

# Spec-Bench's own categories; its other 80 rows (writing, roleplay, ...) are
# the MT-bench questions again, which load_chat already takes from mt_bench/.
SPEC_BENCH_OWN = ("translation", "summarization", "qa", "math_reasoning", "rag")


@dataclass
class BenchPrompt:
    """One prompt of a prompt set: chat ``messages`` (rendered with the chat template)."""

    domain: str
    prompt_id: str
    messages: list[dict]


def shipped_prompts_root() -> Path:
    """The subset shipped inside the package (always present)."""
    return Path(__file__).resolve().parent / "data" / "prompts"


def shared_prompts_root() -> Optional[Path]:
    """``shared/data/prompts`` beside the repository (or any folder above this file), if there."""
    for parent in Path(__file__).resolve().parents:
        cand = parent.parent / "shared" / "data" / "prompts"
        if cand.is_dir():
            return cand
    return None


def prompts_root(shipped: bool = True) -> Path:
    """The prompt data folder: ``$ADASPEC_PROMPTS``, the shared folder, or the shipped subset.

    Args:
        shipped: fall back to the shipped subset; False where the full sets are
            needed (the draft-head trainer's splits).

    Raises:
        FileNotFoundError: ``shipped=False`` and neither of the others is there.
    """
    env = os.environ.get("ADASPEC_PROMPTS")
    if env:
        return Path(env)
    shared = shared_prompts_root()
    if shared is not None:
        return shared
    if shipped:
        return shipped_prompts_root()
    raise FileNotFoundError("full prompt sets not found: set ADASPEC_PROMPTS to the shared/data/prompts folder")


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def task_number(row: dict) -> int:
    """The N of a HumanEval / HumanEval-X ``task_id`` (``"HumanEval/N"``, ``"Rust/N"``)."""
    match = re.search(r"(\d+)$", str(row.get("task_id", "")))
    if match is None:
        raise ValueError(f"task_id {row.get('task_id')!r} does not end in a number")
    return int(match.group(1))


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def load_python(root: Path) -> list[BenchPrompt]:
    rows = read_jsonl(root / "humaneval" / "HumanEval.jsonl")
    return [BenchPrompt("python", r["task_id"], _user("Complete this Python function.\n\n```python\n" + r["prompt"] + "```"))
            for r in rows]


def load_rust(root: Path) -> list[BenchPrompt]:
    rows = read_jsonl(root / "humaneval_x_rust" / "humaneval_rust.jsonl")
    return [BenchPrompt("rust", r.get("task_id", str(i)), _user("Complete this Rust function.\n\n```rust\n" + r["prompt"] + "```"))
            for i, r in enumerate(rows)]


def spec_bench_own(root: Path) -> list[dict]:
    """Spec-Bench rows of its own categories (:data:`SPEC_BENCH_OWN`), in file order."""
    return [r for r in read_jsonl(root / "spec_bench" / "question.jsonl") if r.get("category") in SPEC_BENCH_OWN]


def load_chat(root: Path) -> list[BenchPrompt]:
    out = [BenchPrompt("chat", f"mt_bench/{r['question_id']}", _user(r["turns"][0]))
           for r in read_jsonl(root / "mt_bench" / "question.jsonl")]
    out += [BenchPrompt("chat", f"spec_bench/{r['question_id']}", _user(r["turns"][0])) for r in spec_bench_own(root)]
    return out


def load_sql(root: Path) -> list[BenchPrompt]:
    with open(root / "spider" / "tables.json", encoding="utf-8") as f:
        tables = {t["db_id"]: t for t in json.load(f)}
    with open(root / "spider" / "dev.json", encoding="utf-8") as f:
        rows = json.load(f)
    out = []
    for i, r in enumerate(rows):
        t = tables[r["db_id"]]
        cols: dict[int, list[str]] = {}
        for ti, cname in t["column_names_original"]:
            if ti >= 0:
                cols.setdefault(ti, []).append(cname)
        schema = "\n".join(f"CREATE TABLE {name} ({', '.join(cols.get(ti, []))});"
                           for ti, name in enumerate(t["table_names_original"]))
        text = f"Given this SQLite schema:\n{schema}\n\nWrite one SQL query that answers: {r['question']}"
        out.append(BenchPrompt("sql", f"spider/{i}", _user(text)))
    return out


def load_tools(root: Path) -> list[BenchPrompt]:
    out = []
    for path in sorted((root / "bfcl").glob("BFCL_v4_*.json")):
        for r in read_jsonl(path):
            turns = r["question"][0] if r["question"] and isinstance(r["question"][0], list) else r["question"]
            user = " ".join(m["content"] for m in turns if m.get("role") == "user")
            funcs = json.dumps(r["function"], ensure_ascii=False)
            text = (f"You can call these functions (JSON schemas):\n{funcs}\n\n"
                    f"Answer with the function call(s) as JSON only.\nRequest: {user}")
            out.append(BenchPrompt("tools", r["id"], _user(text)))
    return out


def load_noise(root: Path, count: int = 500, length: int = 80, seed: int = 0) -> list[BenchPrompt]:
    """Prompts nothing can predict: continue a seeded random string of characters.

    Not read from ``root``: generated, so every machine gets the same ones. Run
    with sampling (temperature 1) for a stream on which no speculator should
    pay, to measure the speed floor (plain decoding's speed).
    """
    import random
    import string

    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + string.punctuation + " "
    return [BenchPrompt("noise", f"noise/{i}", _user(
        "Continue this string of random characters:\n" + "".join(rng.choice(alphabet) for _ in range(length))))
        for i in range(count)]


LOADERS: dict[str, Callable[[Path], list[BenchPrompt]]] = {
    "python": load_python,
    "rust": load_rust,
    "chat": load_chat,
    "sql": load_sql,
    "tools": load_tools,
    "noise": load_noise,
}


def load_domain(domain: str, root: Path | None = None) -> list[BenchPrompt]:
    """Prompts of one domain (see DOMAINS), from ``root`` (default :func:`prompts_root`).

    Raises:
        ValueError: unknown domain. FileNotFoundError: a file missing under ``root``.
    """
    if domain not in LOADERS:
        raise ValueError(f"unknown domain {domain!r}; choose from {', '.join(DOMAINS)}")
    return LOADERS[domain](root or prompts_root())


def load_jsonl_prompts(path: str | Path, domain: str) -> list[BenchPrompt]:
    """Any JSONL of prompts: each line has ``messages`` (chat list) or ``prompt`` (text).

    Raises:
        ValueError: a line with neither field.
    """
    out = []
    for i, r in enumerate(read_jsonl(Path(path))):
        if "messages" in r:
            msgs = r["messages"]
        elif "prompt" in r:
            msgs = _user(r["prompt"])
        else:
            raise ValueError(f"{path}:{i + 1}: each line needs 'messages' or 'prompt'")
        out.append(BenchPrompt(domain, str(r.get("id", i)), msgs))
    return out
