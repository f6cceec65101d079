"""Helpers shared by the benchmarks: transformers' ``generate()`` as a peer system, table output.

``bench generate`` and ``bench drift`` both run the peer a transformers user
has (``model.generate()``, plain and with prompt lookup) on the very weights
the engine uses, so the comparison is same model, same precision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from adaspec.target import TargetModel


def hf_generate(
    target: TargetModel,
    ids: list[int],
    max_tokens: int,
    lookup: int,
    temperature: float = 0.0,
    seed: Optional[int] = None,
) -> list[int]:
    """Generate with transformers' ``model.generate()`` on the target model's weights.

    Args:
        target: the loaded target model (its module and tokenizer are used as is).
        ids: prompt token ids, length T.
        max_tokens: most new tokens.
        lookup: ``prompt_lookup_num_tokens`` (prompt lookup decoding, Saxena
            2023); 0 for plain decoding.
        temperature: 0 for greedy; > 0 samples (``do_sample=True``).
        seed: seeds torch's global generator before sampling (ignored when greedy).

    Returns:
        The new token ids only (an EOS that ended generation is included, as in
        the engine's ``GenerationResult.token_ids``).
    """
    model = target.model
    inp = torch.tensor([ids])  # [1, T]
    eos = sorted(target.eos_token_ids)
    kw: dict = dict(max_new_tokens=max_tokens, eos_token_id=eos, pad_token_id=eos[0])
    if temperature > 0:
        if seed is not None:
            torch.manual_seed(seed)
        kw.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    else:
        kw.update(do_sample=False)
    if lookup:
        kw["prompt_lookup_num_tokens"] = lookup
    with torch.inference_mode():
        out = model.generate(inp, attention_mask=torch.ones_like(inp), **kw)  # [1, T + new]
    return out[0, len(ids):].tolist()


def print_table(table: str, out: Optional[str] = None) -> None:
    """Print a Markdown table and, with ``out``, write it there (parent folders created)."""
    print(table)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(table)
        print(f"wrote {out}")
