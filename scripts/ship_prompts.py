"""Rebuild the prompt subset that ships inside the package (``src/adaspec/data/prompts``).

``python scripts/ship_prompts.py [SHARED_PROMPTS_DIR]`` (default
``../shared/data/prompts`` beside the repository). Rows are copied verbatim
(the JSON-lines files line by line), except Spider, whose rows keep only the
fields the loader reads. What is picked, and why, is in the shipped SOURCES.md;
run this again only when a pick changes, and keep SOURCES.md in step.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "src" / "adaspec" / "data" / "prompts"
sys.path.insert(0, str(REPO / "src"))

from adaspec.prompts import SPEC_BENCH_OWN  # noqa: E402
from adaspec.quant.calibration import STDLIB_CALIBRATION_MODULES  # noqa: E402

TASK_STRIDE = 5  # HumanEval / HumanEval-X: every 5th task (held_out_texts() takes every 10th)
SPIDER_STRIDE = 25
BFCL_STRIDE = 25
CALIBRATION_CHAT = 16  # calibration_texts()'s n_chat: Spec-Bench's own rows [::400 // 16]


def lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True) if line.strip()]


def write(rel: str, text: str) -> None:
    path = OUT / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def main(src: Path) -> None:
    for folder in ("humaneval", "humaneval_x_rust", "mt_bench", "spec_bench", "spider", "bfcl"):
        (OUT / folder).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / folder / "LICENSE", OUT / folder / "LICENSE")
    write("humaneval/HumanEval.jsonl", "".join(lines(src / "humaneval" / "HumanEval.jsonl")[::TASK_STRIDE]))
    write("humaneval_x_rust/humaneval_rust.jsonl",
          "".join(lines(src / "humaneval_x_rust" / "humaneval_rust.jsonl")[::TASK_STRIDE]))
    write("mt_bench/question.jsonl", "".join(lines(src / "mt_bench" / "question.jsonl")))
    own = [line for line in lines(src / "spec_bench" / "question.jsonl")
           if json.loads(line).get("category") in SPEC_BENCH_OWN]
    write("spec_bench/question.jsonl", "".join(own[:: len(own) // CALIBRATION_CHAT][:CALIBRATION_CHAT]))
    dev = json.loads((src / "spider" / "dev.json").read_text(encoding="utf-8"))[::SPIDER_STRIDE]
    dbs = {r["db_id"] for r in dev}
    tables = [t for t in json.loads((src / "spider" / "tables.json").read_text(encoding="utf-8")) if t["db_id"] in dbs]
    write("spider/dev.json", json.dumps([{k: r[k] for k in ("db_id", "question", "query")} for r in dev],
                                        indent=1, ensure_ascii=False) + "\n")
    write("spider/tables.json", json.dumps(tables, ensure_ascii=False) + "\n")
    for path in sorted((src / "bfcl").glob("BFCL_v4_*.json")):
        write(f"bfcl/{path.name}", "".join(lines(path)[::BFCL_STRIDE]))
    # The calibration code: this interpreter's standard-library sources, shipped so
    # that the int8 model does not depend on the Python version it runs under.
    stdlib = OUT / "python_stdlib"
    stdlib.mkdir(parents=True, exist_ok=True)
    for name in STDLIB_CALIBRATION_MODULES:
        shutil.copyfile(importlib.import_module(name).__file__, stdlib / f"{name}.py.txt")
    shutil.copyfile(Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt", stdlib / "LICENSE")
    write("python_stdlib/VERSION", f"{sys.version.split()[0]}\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO.parent / "shared" / "data" / "prompts")
