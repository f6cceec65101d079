"""The benchmarks' prompt sets: the loaders live in :mod:`adaspec.prompts` (the runtime uses them too).

Re-exported here for the benchmark modules; see :func:`adaspec.prompts.prompts_root`
for where the sets are read from.
"""

from adaspec.prompts import (  # noqa: F401
    DOMAINS,
    LOADERS,
    SPEC_BENCH_OWN,
    BenchPrompt,
    load_chat,
    load_domain,
    load_jsonl_prompts,
    load_noise,
    load_python,
    load_rust,
    load_sql,
    load_tools,
    prompts_root,
)
