"""Draft-model speculator: tokenizer refusal, padded vocabularies, a shorter draft context, exactness.

Tiny random llamas with the real SmolLM2 tokenizer stand in for a target and
its draft model (no download).
"""

from types import SimpleNamespace

import pytest
import torch

from adaspec.engine import Engine
from adaspec.speculators.draft_model import DraftModelSpeculator, check_same_tokenizer
from adaspec.target import load_target
from adaspec.types import ProposeContext, SamplingParams
from conftest import build_tiny_model_dir

PROMPT = "def fibonacci(n):\n    # return the n-th Fibonacci number\n"


@pytest.fixture(scope="module")
def draft_dirs(tmp_path_factory, tiny_target):
    root = tmp_path_factory.mktemp("drafts")
    n_tok = len(tiny_target.tokenizer)
    return {
        "same": build_tiny_model_dir(root / "same", seed=0),  # the target's own weights
        "other": build_tiny_model_dir(root / "other", seed=3),
        "padded": build_tiny_model_dir(root / "padded", seed=3, vocab_size=n_tok + 64),
        "short": build_tiny_model_dir(root / "short", seed=0, max_position_embeddings=40),
    }


def plain_ids(target, prompt_ids, max_tokens, **kw):
    return Engine(target).generate(prompt_ids, SamplingParams(max_tokens=max_tokens, **kw)).token_ids


def test_refuses_a_different_tokenizer(tiny_target, tmp_path):
    tok_dir = build_tiny_model_dir(tmp_path / "extra", seed=1)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.add_tokens(["<only-in-the-draft>"])
    tok.save_pretrained(tok_dir)
    with pytest.raises(ValueError, match="different tokenizer"):
        DraftModelSpeculator.from_pretrained(str(tok_dir), tiny_target)


def test_refuses_moved_token_ids():
    a = SimpleNamespace(get_vocab=lambda: {"a": 0, "b": 1, "c": 2})
    b = SimpleNamespace(get_vocab=lambda: {"a": 0, "b": 2, "c": 1})
    check_same_tokenizer(a, a)
    with pytest.raises(ValueError, match="2 with other ids"):
        check_same_tokenizer(a, b)


def test_draft_equal_to_target_is_exact_and_accepted(tiny_target, draft_dirs):
    prompt = tiny_target.tokenizer.encode(PROMPT)
    plain = plain_ids(tiny_target, prompt, 40, ignore_eos=True)
    spec = DraftModelSpeculator.from_pretrained(str(draft_dirs["same"]), tiny_target)
    for k in (1, 4):
        r = Engine(tiny_target, [spec], lookahead=k).generate(prompt, SamplingParams(max_tokens=40, ignore_eos=True))
        assert r.token_ids == plain, f"k={k}"
        # Same weights: the draft chain is the target's greedy chain (barring fp32 near-ties).
        assert r.speculation.acceptance_rate > 0.9


def test_other_draft_model_greedy_exact(tiny_target, draft_dirs):
    prompt = tiny_target.tokenizer.encode(PROMPT)
    plain = plain_ids(tiny_target, prompt, 40, ignore_eos=True)
    spec = DraftModelSpeculator.from_pretrained(str(draft_dirs["other"]), tiny_target)
    r = Engine(tiny_target, [spec], lookahead=3).generate(prompt, SamplingParams(max_tokens=40, ignore_eos=True))
    assert r.token_ids == plain
    assert r.speculation.proposed > 0


class _PreferPadding(torch.nn.Module):
    """Wraps a padded-vocabulary draft model so its padding rows win every argmax."""

    def __init__(self, model, first_padded: int):
        super().__init__()
        self.model, self.first_padded = model, first_padded

    def forward(self, **kw):
        out = self.model(**kw)
        out.logits[..., self.first_padded :] += 1e4
        return out


def test_padded_draft_vocab_never_reaches_verification(tiny_target, draft_dirs):
    V = tiny_target.vocab_size
    spec = DraftModelSpeculator.from_pretrained(str(draft_dirs["padded"]), tiny_target)
    assert spec.num_valid_tokens == V
    assert spec.model.config.vocab_size == V + 64
    spec.model = _PreferPadding(spec.model, V)
    prompt = tiny_target.tokenizer.encode(PROMPT)
    spec.start_request("r", prompt)
    for temperature in (0.0, 0.8):
        ctx = ProposeContext("r", prompt, len(prompt), temperature=temperature)
        d = spec.propose(ctx, 4)
        assert d.num_draft_tokens == 4
        assert all(0 <= t < V for t in d.token_ids)
        if temperature > 0:
            assert d.draft_probs.shape == (4, V)
            assert torch.allclose(d.draft_probs.sum(-1), torch.ones(4))
    plain = plain_ids(tiny_target, prompt, 24, ignore_eos=True)
    r = Engine(tiny_target, [spec], lookahead=4).generate(prompt, SamplingParams(max_tokens=24, ignore_eos=True))
    assert r.token_ids == plain


def test_padded_target_vocab_gets_full_width_draft_probs(tmp_path, draft_dirs):
    n_tok = len(load_target(str(draft_dirs["same"])).tokenizer)
    target = load_target(str(build_tiny_model_dir(tmp_path / "t", seed=0, vocab_size=n_tok + 32)))
    spec = DraftModelSpeculator.from_pretrained(str(draft_dirs["same"]), target)
    assert spec.num_valid_tokens == n_tok
    prompt = target.tokenizer.encode(PROMPT)
    d = spec.propose(ProposeContext("r", prompt, len(prompt), temperature=1.0), 3)
    assert d.draft_probs.shape == (3, n_tok + 32)
    assert float(d.draft_probs[:, n_tok:].sum()) == 0.0


def test_shorter_draft_context_stops_drafting(tiny_target, draft_dirs):
    spec = DraftModelSpeculator.from_pretrained(str(draft_dirs["short"]), tiny_target)
    assert spec.max_model_len == 40
    prompt = tiny_target.tokenizer.encode(PROMPT)[:30]
    plain = plain_ids(tiny_target, prompt, 40, ignore_eos=True)
    eng = Engine(tiny_target, [spec], lookahead=4)
    state = eng.start(prompt, SamplingParams(max_tokens=40, ignore_eos=True))
    proposed_at = []
    while not state.finished:
        n = len(state.token_ids)
        before = state.stats.proposed
        eng.step(state)
        proposed_at.append((n, state.stats.proposed - before))
    assert eng.result(state).token_ids == plain
    assert any(p > 0 for _, p in proposed_at)
    for n, p in proposed_at:  # draft i reads position n + i - 2, which must stay inside the window
        assert p <= max(0, 40 - n + 1)
    assert all(p == 0 for n, p in proposed_at if n > 40)


def test_cache_resyncs_after_rejections(tiny_target, draft_dirs):
    spec = DraftModelSpeculator.from_pretrained(str(draft_dirs["other"]), tiny_target)
    prompt = tiny_target.tokenizer.encode(PROMPT)
    spec.start_request("r", prompt)
    d1 = spec.propose(ProposeContext("r", prompt, len(prompt)), 4)
    # The target rejected everything and emitted another token: the cache must drop the drafts.
    committed = prompt + [(d1.token_ids[0] + 1) % tiny_target.vocab_size]
    d2 = spec.propose(ProposeContext("r", committed, len(prompt)), 4)
    fresh = DraftModelSpeculator.from_pretrained(str(draft_dirs["other"]), tiny_target)
    fresh.start_request("r", prompt)
    assert d2.token_ids == fresh.propose(ProposeContext("r", committed, len(prompt)), 4).token_ids
    assert spec._requests["r"].fed == committed + d2.token_ids[:-1]
    assert spec._requests["r"].cache.get_seq_length() == len(spec._requests["r"].fed)
    spec.stop_request("r")
    assert "r" not in spec._requests


def test_cli_static_with_draft_model(tiny_model_dir):
    """`adaspec generate --speculator static --draft-model M` runs the model under the controller and stays exact.

    The controller drafts with it only where its measured cost pays; the target
    drafting for itself costs a target forward per draft token, so it may decode
    plainly here (F11's full acceptance at a fixed k: tests/test_exactness.py).
    """
    import json
    import subprocess
    import sys

    base = [sys.executable, "-m", "adaspec.cli", "generate", "--model", str(tiny_model_dir), "--prompt", "hello",
            "--max-tokens", "12", "--dtype", "float32", "--json"]
    plain = json.loads(subprocess.run(base + ["--speculator", "none"], capture_output=True, text=True,
                                      check=True).stdout)
    drafted = json.loads(subprocess.run(base + ["--speculator", "static", "--draft-model", str(tiny_model_dir)],
                                        capture_output=True, text=True, check=True).stdout)
    assert drafted["token_ids"] == plain["token_ids"]
    spec = drafted["speculation"]
    assert spec["accepted"] == spec["proposed"]  # every verified draft of the target drafting for itself (F11)
    assert set(spec["steps_by_speculator"]) <= {"draft_model", "none"}
