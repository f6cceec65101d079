"""Shared fixtures: a tiny random llama with the real SmolLM2 tokenizer, and the real model.

The tiny model (2 layers, hidden 64, the real 49152-token vocabulary) runs in
milliseconds, so logic tests use it; tests marked ``real_model`` load the real
default model from its converted safetensors cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# One intra-op thread by default: on a shared machine OpenMP spin-waits fight other
# processes (measured: the suite took >20 min at 2 threads under load, 104 s at 1).
torch.set_num_threads(int(os.environ.get("ADASPEC_TEST_THREADS", "1")))

REAL_MODEL = "smollm2-135m-instruct"


def build_tiny_model_dir(path: Path, seed: int = 0, vocab_size: int | None = None,
                         max_position_embeddings: int = 512) -> Path:
    """Save a tiny random llama (fp32) with the SmolLM2 tokenizer to ``path``."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from adaspec.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(REAL_MODEL, progress=False))
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size or len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        # A wide init spreads the logits, so argmax near-ties (which batched and
        # unbatched fp32 kernels may break differently) are rare.
        initializer_range=0.3,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_target(tiny_model_dir):
    from adaspec.target import load_target

    return load_target(str(tiny_model_dir), max_model_len=512)


SMALL_VOCAB = 16


@pytest.fixture(scope="module")
def small_vocab_target(tmp_path_factory):
    """A tiny random model with a 16-token vocabulary and softened logits, for sampling tests.

    Module scope: each test module gets its own instance.
    """
    from adaspec.target import load_target

    d = build_tiny_model_dir(tmp_path_factory.mktemp("v16") / "m", seed=5, vocab_size=SMALL_VOCAB)
    t = load_target(str(d), max_model_len=64)
    # Soften the logits so several tokens have real mass (a wide init makes them peaky).
    with torch.no_grad():
        t.model.lm_head.weight.mul_(0.15)
    return t


def tv(a, b) -> float:
    """Total variation distance between two histograms (Counters)."""
    keys = set(a) | set(b)
    na, nb = sum(a.values()), sum(b.values())
    return 0.5 * sum(abs(a[k] / na - b[k] / nb) for k in keys)


@pytest.fixture(scope="session")
def real_target():
    from adaspec.target import load_target

    return load_target(REAL_MODEL, dtype="float32")
