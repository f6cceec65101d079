"""The int8 lean target built straight from the int8 model cache (adaspec.model.fast_load)
and the tokenizer read from tokenizer.json (adaspec.model.tokenizer): both must equal
what transformers builds, bitwise, and the start-up path must not import transformers."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REAL_MODEL

STRINGS = [
    "", "Hello", " Hello world!", "def f(x):\n    return x + 1\n", "fn main() { println!(\"hi\"); }",
    "SELECT * FROM t WHERE a = 'b';", "naïve café — 東京 🙂", "<|im_start|>user\nhi<|im_end|>", "  two  spaces ",
    "tabs\tand\r\nnewlines\n\n", "<tool_call>{\"name\": \"f\"}</tool_call>", "don't you're I'm", "x" * 300,
]
CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
    [{"role": "user", "content": "hi", "name": None}],
    [{"role": "user", "content": "<|im_end|> injected"}],
]


@pytest.fixture(scope="module")
def tokenizers_pair():
    from transformers import AutoTokenizer

    from adaspec.model.tokenizer import FastTokenizer
    from adaspec.models import resolve_model

    folder = resolve_model(REAL_MODEL, progress=False)
    return FastTokenizer(folder), AutoTokenizer.from_pretrained(folder)


@pytest.mark.real_model
def test_fast_tokenizer_matches_transformers(tokenizers_pair):
    fast, hf = tokenizers_pair
    for s in STRINGS:
        for special in (True, False):
            assert fast.encode(s, add_special_tokens=special) == hf.encode(s, add_special_tokens=special), s
        assert fast(s, add_special_tokens=False)["input_ids"] == hf(s, add_special_tokens=False)["input_ids"]
    rng = random.Random(0)
    seqs = [hf.encode(s) for s in STRINGS] + [[rng.randrange(len(hf)) for _ in range(40)] for _ in range(30)]
    seqs += [[0, 1, 2, 5, 1, 2]]
    for ids in seqs:
        for skip in (True, False):
            for clean in (None, True, False):
                assert fast.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=clean) == \
                    hf.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=clean), ids
    for tid in (0, 1, 2, 100, len(hf) - 1):
        assert fast.convert_ids_to_tokens(tid) == hf.convert_ids_to_tokens(tid)
        assert fast.decode([tid]) == hf.decode([tid])
    assert fast.convert_ids_to_tokens([5, 6]) == hf.convert_ids_to_tokens([5, 6])
    assert fast.convert_tokens_to_ids("<|im_end|>") == hf.convert_tokens_to_ids("<|im_end|>")
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "bos_token", "eos_token",
                 "chat_template"):
        assert getattr(fast, attr) == getattr(hf, attr), attr
    assert len(fast) == len(hf)
    for chat in CHATS:
        for gen in (True, False):
            assert fast.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen) == \
                hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert fast.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True, return_dict=False) == \
                list(hf.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True, return_dict=False))
    # what it does not do itself goes to transformers' tokenizer, loaded on first use
    assert fast.get_vocab() == hf.get_vocab()
    with pytest.raises(ValueError, match="empty conversation"):
        fast.apply_chat_template([], tokenize=False)


def test_fast_tokenizer_refuses_folders_it_cannot_stand_in_for(tmp_path):
    from adaspec.model.tokenizer import FastTokenizer, unsupported_reason

    assert "no tokenizer.json" in unsupported_reason(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "Qwen2Tokenizer"}))
    assert "Qwen2Tokenizer" in unsupported_reason(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend",
                                                                "add_bos_token": True}))
    assert "add_bos_token" in unsupported_reason(tmp_path)
    with pytest.raises(ValueError, match="fast tokenizer"):
        FastTokenizer(tmp_path)


def test_fast_load_refuses_other_rope_and_architectures():
    from adaspec.model.fast_load import unsupported_reason

    base = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rope_theta": 10000.0}
    assert unsupported_reason(base) is None
    assert "RoPE" in unsupported_reason({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    assert "RoPE" in unsupported_reason({**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}})
    assert "architectures" in unsupported_reason({**base, "architectures": ["GPT2LMHeadModel"]})
    assert "sliding" in unsupported_reason({**base, "use_sliding_window": True})


def _both(model: str, monkeypatch):
    """The same int8 target loaded through transformers (writing the cache) and straight from the cache."""
    from adaspec.model.fast_load import LazyModule
    from adaspec.target import load_target

    monkeypatch.setenv("ADASPEC_FAST_LOAD", "0")
    slow = load_target(model, dtype="int8", max_model_len=512, runtime="lean")
    monkeypatch.setenv("ADASPEC_FAST_LOAD", "1")
    fast = load_target(model, dtype="int8", max_model_len=512, runtime="lean")
    assert not isinstance(slow.model, LazyModule)
    assert isinstance(fast.model, LazyModule) and not fast.model.loaded
    return slow, fast


def _same_forwards(a, b, prompt):
    ka, kb = a.new_cache(), b.new_cache()
    for chunk in (prompt, prompt[:1], prompt[1:5], prompt[5:13]):
        oa, ob = a.forward(ka, chunk), b.forward(kb, chunk)
        assert torch.equal(oa.logits, ob.logits) and torch.equal(oa.hidden, ob.hidden)


def test_fast_load_equals_the_transformers_load_bitwise_tiny(tiny_model_dir, monkeypatch):
    from adaspec.speculators.draft_head import target_embedding_weight, target_final_norm_weight, target_lm_head_weight

    slow, fast = _both(str(tiny_model_dir), monkeypatch)
    assert fast.vocab_size == slow.vocab_size and fast.eos_token_ids == slow.eos_token_ids
    assert fast.bos_token_id == slow.bos_token_id and fast.max_model_len == slow.max_model_len
    assert Path(fast.quant_report["cache"]).is_file()
    prompt = slow.tokenizer.encode("def add(a, b):\n    return a + b\n# and more text to feed")
    _same_forwards(slow, fast, prompt)
    rows = torch.tensor([0, 3, 17, fast.vocab_size - 1])
    assert torch.equal(target_embedding_weight(fast), target_embedding_weight(slow))
    assert torch.equal(target_lm_head_weight(fast, rows), target_lm_head_weight(slow, rows))
    assert torch.equal(target_lm_head_weight(fast), target_lm_head_weight(slow))
    assert torch.equal(target_final_norm_weight(fast), target_final_norm_weight(slow))
    assert not fast.model.loaded  # none of that needed the transformers module
    # the module, loaded on first use, is the same int8 model
    assert fast.model.config.vocab_size == slow.vocab_size and fast.model.loaded
    assert torch.equal(fast.model.lm_head.dequantized_weight(rows), slow.model.lm_head.dequantized_weight(rows))


@pytest.mark.real_model
def test_fast_load_equals_the_transformers_load_bitwise_real_model(monkeypatch):
    from adaspec import cost_cache
    from adaspec.speculators.draft_head import target_embedding_weight, target_lm_head_weight

    slow, fast = _both(REAL_MODEL, monkeypatch)
    assert fast.vocab_size == slow.vocab_size and fast.eos_token_ids == slow.eos_token_ids
    prompt = slow.tokenizer.encode("Write a Python function that reverses a linked list, with tests.")
    _same_forwards(slow, fast, prompt)
    rows = torch.arange(0, fast.vocab_size, 997)
    assert torch.equal(target_lm_head_weight(fast, rows), target_lm_head_weight(slow, rows))
    assert torch.equal(target_embedding_weight(fast), target_embedding_weight(slow))
    what = {"probe": 1}
    assert cost_cache.cache_key(fast, what) == cost_cache.cache_key(slow, what)
    assert not fast.model.loaded


def test_fast_load_falls_back_without_a_cache_file(tiny_model_dir, tmp_path, monkeypatch):
    from adaspec.model.fast_load import load_fast

    monkeypatch.setenv("ADASPEC_CACHE", str(tmp_path / "empty-cache"))
    assert load_fast("tiny", Path(tiny_model_dir)) is None
    monkeypatch.setenv("ADASPEC_FAST_LOAD", "0")
    assert load_fast("tiny", Path(tiny_model_dir)) is None


def test_weight_update_on_a_fast_loaded_target_serves_the_new_weights(tiny_model_dir, monkeypatch):
    """After a weight update the new module answers (the cached tensors describe the old weights)."""
    from adaspec.speculators.draft_head import target_embedding_weight
    from adaspec.weights import apply_weights, prepare_weights

    _, fast = _both(str(tiny_model_dir), monkeypatch)
    from transformers import AutoModelForCausalLM

    fp32 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    state = {k: v.detach().clone() for k, v in fp32.state_dict().items()}
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"] * 1.5
    before = target_embedding_weight(fast).clone()
    apply_weights(fast, prepare_weights(fast, state))
    assert fast.current_fast_tensors() is None
    assert not torch.equal(target_embedding_weight(fast), before)


@pytest.mark.real_model
def test_generate_starts_without_importing_transformers(tmp_path):
    """`adaspec generate` on the default int8 model, second start: transformers is never imported."""
    env = dict(os.environ, ADASPEC_TEST_THREADS="1")
    code = ("import sys, runpy\n"
            "sys.argv = ['adaspec', 'generate', '--max-tokens', '2', '--threads', '1', '--prompt', 'Hi']\n"
            "from adaspec.cli import main\n"
            "rc = main()\n"
            "print('TRANSFORMERS_IMPORTED' if any(m == 'transformers' or m.startswith('transformers.') "
            "for m in sys.modules) else 'NO_TRANSFORMERS')\n"
            "sys.exit(rc)\n")
    for _ in range(2):  # the first start may write the int8 and cost caches
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
    assert "NO_TRANSFORMERS" in out.stdout, out.stdout[-500:] + out.stderr[-2000:]
