"""Draft head: exactness, the sampling distribution, checkpoints, and training that really learns.

Tiny random llamas stand in for the target; tests marked ``real_model`` use
the shipped checkpoint with the real default model.
"""

import json
from collections import Counter
from contextlib import contextmanager

import pytest
import torch

from adaspec.engine import Engine
from adaspec.sampling import process_logits
from adaspec.speculators.draft_head import (
    DraftHeadConfig,
    DraftHeadSpeculator,
    check_matches_target,
    load_draft_head,
    load_static_speculator,
    new_draft_head,
    save_draft_head,
    shipped_checkpoint_path,
    target_embedding_weight,
)
from adaspec.target import load_target
from adaspec.train.data import DataPlan, WorkItem, teacher_force
from adaspec.train.draft_head import (
    TrainConfig,
    chain_loss,
    choose_draft_vocab,
    evaluate_head,
    pack,
    train_draft_head,
)
from adaspec.types import ProposeContext, SamplingParams
from conftest import REAL_MODEL, SMALL_VOCAB, build_tiny_model_dir, tv

PROMPT = "def fibonacci(n):\n    # return the n-th Fibonacci number\n"


def plain_ids(target, prompt_ids, max_tokens, **kw):
    return Engine(target).generate(prompt_ids, SamplingParams(max_tokens=max_tokens, **kw)).token_ids


@contextmanager
def torch_threads(n: int):
    """Many tiny ops run faster on one thread (and far faster on a busy shared machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def train_steps(net, embed, packed, steps, lr=3e-3, batch=64, unroll=3, seed=0):
    """Plain training loop (the pipeline's inner step); returns the loss after each step."""
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, packed.starts.numel(), (batch,), generator=gen)
        loss, _ = chain_loss(net, embed, packed, packed.starts[idx], unroll, 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    net.eval()
    return losses


@pytest.fixture(scope="module")
def trained(tiny_target):
    """A tiny head fitted to the tiny target's own greedy continuation of PROMPT."""
    prompt = tiny_target.tokenizer.encode(PROMPT)
    plain = plain_ids(tiny_target, prompt, 64, ignore_eos=True)
    docs = teacher_force(tiny_target, [WorkItem("t", "0", "train", prompt + plain, False)])
    vocab = choose_draft_vocab(docs, 256, tiny_target.vocab_size, always=sorted(tiny_target.eos_token_ids))
    net = new_draft_head(tiny_target, vocab, intermediate_size=256, seed=0)
    embed = target_embedding_weight(tiny_target)
    packed = pack(docs)
    with torch_threads(1):
        losses = train_steps(net, embed, packed, 120)
    return {"net": net, "losses": losses, "prompt": prompt, "plain": plain, "packed": packed, "embed": embed}


# ---------------------------------------------------------------- defaults and pieces
def test_documented_defaults():
    c = DraftHeadConfig(hidden_size=8, draft_vocab_size=4, target_vocab_size=16)
    assert (c.intermediate_size, c.num_blocks, c.context_ngram, c.rms_norm_eps) == (1536, 1, 3, 1e-5)
    t = TrainConfig()
    assert (t.model, t.draft_vocab_size, t.intermediate_size, t.num_blocks) == (REAL_MODEL, 8192, 1536, 1)
    assert (t.steps, t.time_budget_s, t.batch_size, t.unroll, t.lr) == (3000, None, 128, 4, 1e-3)
    assert t.context_ngram == 3
    assert (t.warmup_steps, t.weight_decay, t.feature_loss_weight, t.eval_every) == (50, 0.0, 0.1, 500)
    assert (t.checkpoint_every_s, t.eval_max_positions, t.seed, t.label_top_k) == (60.0, 4096, 0, 32)
    p = DataPlan()
    assert p.sources == ["chat", "humaneval", "stdlib"]
    assert (p.num_chat, p.num_humaneval, p.humaneval_samples, p.stdlib_tokens) == (48, 60, 0, 40_000)
    assert (p.heldout_chat, p.heldout_humaneval, p.heldout_stdlib_tokens) == (6, 6, 2_048)
    assert (p.max_new_tokens, p.chunk_len, p.gen_batch_size, p.tf_batch_size) == (160, 256, 16, 8)


def test_humaneval_split_keeps_tasks_out():
    from adaspec.train.data import humaneval_split

    train = [i for i in range(164) if humaneval_split(i) == "train"]
    assert train == list(range(0, 120, 2))


def test_choose_draft_vocab_orders_by_frequency_and_fills():
    from adaspec.train.data import FeatureDoc

    ids = torch.tensor([5, 5, 5, 3, 3, 9])
    doc = FeatureDoc("s", "0", "train", ids, torch.zeros(6, 2).half(), torch.zeros(6), ids.clone())
    assert choose_draft_vocab([doc], 3, 16, always=[0]) == [0, 5, 3]
    assert choose_draft_vocab([doc], 6, 16) == [5, 3, 9, 0, 1, 2]
    assert len(choose_draft_vocab([doc], 100, 16)) == 16


def test_context_successors_follow_prompt_lookup():
    from adaspec.speculators.draft_head import NO_SUCCESSOR, context_successors

    #        0  1  2  3  4  5  6  7
    toks = [5, 6, 7, 5, 6, 8, 5, 6]
    succ, n = context_successors(toks, 3)
    assert (succ[0], n[0]) == (NO_SUCCESSOR, 0)
    assert (succ[3], n[3]) == (6, 1)  # "5" seen at 0, followed by 6
    assert (succ[4], n[4]) == (7, 2)  # "5 6" seen at 0..1, followed by 7
    assert (succ[7], n[7]) == (8, 2)  # most recent "5 6" (3..4) wins, followed by 8


def test_incremental_index_with_chain_overlay_matches_batch():
    from adaspec.speculators.draft_head import ContextIndex, context_successors

    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        seq = torch.randint(0, 5, (40,), generator=gen).tolist()
        expected = context_successors(seq, 3)
        committed = int(torch.randint(1, 35, (1,), generator=gen))
        base = ContextIndex(3)
        for p in range(committed - 1):  # the speculator's invariant: all but the newest committed token
            base.add(seq, p)
        overlay = ContextIndex(3)
        for t in range(committed - 1, len(seq)):  # the draft chain
            assert base.successor(seq, t, overlay) == (expected[0][t], expected[1][t])
            overlay.add(seq, t)


def test_speculator_index_tracks_growing_context(tiny_target, trained):
    from adaspec.speculators.draft_head import context_successors

    spec = DraftHeadSpeculator(trained["net"], target_embedding_weight(tiny_target))
    seq = trained["prompt"] + trained["plain"]
    hidden = torch.zeros(trained["net"].config.hidden_size)
    for end in (len(trained["prompt"]), len(trained["prompt"]) + 3, len(seq)):
        st = spec._sync(ProposeContext("r", seq[:end], len(trained["prompt"]), hidden_state=hidden))
        assert st.tokens == seq[:end]
        succ, n = context_successors(seq[:end], 3)
        assert st.index.successor(st.tokens, end - 1) == (succ[end - 1], n[end - 1])
    spec.stop_request("r")
    assert "r" not in spec._requests


def test_new_head_refuses_bad_vocab(tiny_target):
    with pytest.raises(ValueError):
        new_draft_head(tiny_target, [1, 1, 2])
    with pytest.raises(ValueError):
        new_draft_head(tiny_target, [tiny_target.vocab_size])


# ---------------------------------------------------------------- training really learns
def test_training_lowers_loss(trained):
    losses = trained["losses"]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)


def test_int8_copy_drafts_like_the_float_head(trained):
    from adaspec.speculators.draft_head import quantize_head

    net = trained["net"]
    q = quantize_head(net)
    p = trained["packed"]
    f, tok = p.hidden[:32].float(), p.token_ids[1:33]
    from adaspec.speculators.draft_head import successor_inputs

    args = (f, trained["embed"][tok], successor_inputs(trained["embed"], p.successor[1:33], p.match_length[1:33]),
            p.match_length[1:33])
    with torch.no_grad():
        a, b = net.logits(net(*args)), q.logits(q(*args))
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    assert float((a - b).abs().max()) < 0.1 * float(a.abs().max())
    assert net.fc_in.weight.dtype == torch.float32  # the original is untouched


def test_evaluation_of_a_fitted_head(trained):
    ev = evaluate_head(trained["net"], trained["embed"], trained["packed"], max_k=4)["overall"]
    lengths = [ev["acceptance_length"][str(k)] for k in range(1, 5)]
    assert all(1.0 <= a <= k + 1 for k, a in zip(range(1, 5), lengths))
    assert lengths == sorted(lengths)
    assert ev["top1"] > 0.5  # fitted to this very document
    assert ev["in_draft_vocab"] == 1.0


# ---------------------------------------------------------------- exactness
def test_greedy_exactness_with_head(tiny_target, trained):
    spec = DraftHeadSpeculator(trained["net"], target_embedding_weight(tiny_target))
    prompt, plain = trained["prompt"], trained["plain"]
    for k in (1, 4, 8):
        eng = Engine(tiny_target, [spec], lookahead=k)
        state = eng.start(prompt, SamplingParams(max_tokens=64, ignore_eos=True))
        while not state.finished:
            eng.step(state)
            if not state.finished:
                assert state.kv.length == len(state.prompt_ids) + len(state.output_ids) - 1
        r = eng.result(state)
        assert r.token_ids == plain, f"k={k}"
        assert r.speculation.acceptance_rate > 0.5, "the fitted head should get drafts accepted"


@pytest.mark.parametrize("int8", [True, False], ids=["int8", "fp32"])
def test_untrained_head_greedy_exact_other_prompt(tiny_target, int8):
    net = new_draft_head(tiny_target, list(range(300)), intermediate_size=64, seed=1)
    spec = DraftHeadSpeculator(net, target_embedding_weight(tiny_target), int8=int8)
    assert spec.int8 == int8
    prompt = tiny_target.tokenizer.encode("The three primary colors are")
    plain = plain_ids(tiny_target, prompt, 40, ignore_eos=True)
    r = Engine(tiny_target, [spec], lookahead=4).generate(prompt, SamplingParams(max_tokens=40, ignore_eos=True))
    assert r.token_ids == plain
    assert r.speculation.proposed > 0


def test_propose_contract(tiny_target, trained):
    spec = DraftHeadSpeculator(trained["net"], target_embedding_weight(tiny_target))
    prompt = trained["prompt"]
    assert spec.propose(ProposeContext("r", prompt, len(prompt), hidden_state=None), 4).num_draft_tokens == 0
    hidden = tiny_target.forward(tiny_target.new_cache(), prompt[:-1]).hidden[-1]
    greedy = spec.propose(ProposeContext("r", prompt, len(prompt), hidden_state=hidden), 5)
    assert greedy.num_draft_tokens == 5 and greedy.draft_probs is None
    assert len(greedy.confidence) == 5 and all(0 < c <= 1 for c in greedy.confidence)
    vocab = set(trained["net"].draft_to_target.tolist())
    assert set(greedy.token_ids) <= vocab

    def sampled(s):
        s.start_request("s", prompt)
        d = s.propose(ProposeContext("s", prompt, len(prompt), hidden_state=hidden, temperature=0.9, top_p=0.9), 5)
        s.stop_request("s")
        return d

    d = sampled(spec)
    assert d.draft_probs.shape == (5, tiny_target.vocab_size)
    assert torch.allclose(d.draft_probs.sum(-1), torch.ones(5))
    outside = torch.ones(tiny_target.vocab_size, dtype=torch.bool)
    outside[trained["net"].draft_to_target] = False
    assert float(d.draft_probs[:, outside].sum()) == 0.0
    for i, t in enumerate(d.token_ids):  # a sampled draft always has draft_probs > 0
        assert d.draft_probs[i, t] > 0
    # One sampler per speculator: fresh speculators with the same seed reproduce.
    fresh = [DraftHeadSpeculator(trained["net"], target_embedding_weight(tiny_target), seed=5) for _ in range(2)]
    assert sampled(fresh[0]).token_ids == sampled(fresh[1]).token_ids


# ---------------------------------------------------------------- sampling distribution
V = SMALL_VOCAB
RUNS = 2000


@pytest.mark.parametrize("params_kw", [dict(temperature=0.8, top_p=0.7), dict(temperature=1.0, top_k=4)],
                         ids=["top_p", "top_k"])
def test_sampling_distribution_preserved_with_head(small_vocab_target, params_kw):
    t = small_vocab_target
    # A draft vocabulary of 12 of the 16 tokens: draft_probs are zero on the other 4.
    net = new_draft_head(t, [0, 2, 3, 4, 5, 7, 8, 9, 10, 11, 13, 15], intermediate_size=32, seed=2)
    spec = DraftHeadSpeculator(net, target_embedding_weight(t))
    prompt = [3, 7, 1, 9]
    logits = t.forward(t.new_cache(), prompt).logits[-1:]
    exact = process_logits(logits, params_kw["temperature"], params_kw.get("top_k", 0), params_kw.get("top_p", 1.0))[0]
    support = set(torch.nonzero(exact).flatten().tolist())
    assert len(support) >= 2

    def histograms(engine):
        first, second = Counter(), Counter()
        for seed in range(RUNS):
            r = engine.generate(prompt, SamplingParams(max_tokens=2, seed=seed, ignore_eos=True, **params_kw))
            first[r.token_ids[0]] += 1
            second[tuple(r.token_ids)] += 1
        return first, second

    plain_first, plain_second = histograms(Engine(t))
    eng = Engine(t, [spec], lookahead=3)
    first, second = histograms(eng)
    assert set(first) <= support
    assert tv(first, Counter({i: float(exact[i]) * RUNS for i in range(V)})) < 0.05
    assert tv(first, plain_first) < 0.06
    # Two tokens: against the exact joint distribution p(t1) p(t2 | t1).
    joint = Counter()
    for t1 in support:
        row = t.forward(t.new_cache(), prompt + [t1]).logits[-1:]
        p2 = process_logits(row, params_kw["temperature"], params_kw.get("top_k", 0), params_kw.get("top_p", 1.0))[0]
        for t2 in range(V):
            joint[(t1, t2)] = float(exact[t1] * p2[t2]) * RUNS
    assert tv(plain_second, joint) < 0.1  # the test's own noise level
    assert tv(second, joint) < 0.1


# ---------------------------------------------------------------- checkpoints
def test_checkpoint_roundtrip_and_target_check(tiny_target, trained, tmp_path):
    path = save_draft_head(trained["net"], tmp_path / "h.safetensors", training={"steps": 150})
    net, notes = load_draft_head(path)
    assert notes == {"steps": 150}
    assert net.config == trained["net"].config
    assert torch.equal(net.draft_to_target, trained["net"].draft_to_target)
    for (k, a), b in zip(trained["net"].state_dict().items(), net.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=2e-3, rtol=2e-3), k  # fp16 storage
    spec = load_static_speculator(tiny_target, path)
    assert spec.name == "draft_head" and spec.needs_hidden_states
    assert spec.int8  # the documented default: draft in int8

    other = load_target(str(build_tiny_model_dir(tmp_path / "other", seed=7)))
    with pytest.raises(ValueError, match="LM-head rows differ"):
        load_static_speculator(other, path)
    small = load_target(str(build_tiny_model_dir(tmp_path / "small", seed=0, vocab_size=V)))
    with pytest.raises(ValueError, match="vocabulary"):
        check_matches_target(net, small)
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception):
        load_draft_head(tmp_path / "bad.safetensors")


def test_no_shipped_checkpoint_for_unknown_target(tiny_target):
    with pytest.raises(FileNotFoundError):
        load_static_speculator(tiny_target)


# ---------------------------------------------------------------- the pipeline
def test_pipeline_end_to_end_and_resume(tiny_target, tmp_path):
    data = tmp_path / "corpus.jsonl"
    rows = [{"text": "def add(a, b):\n    return a + b\n" * 6}, {"prompt": "Write a haiku about the sea."},
            {"text": "import os\nprint(os.getcwd())\n" * 8}] * 7
    data.write_text("\n".join(json.dumps(r) for r in rows))
    plan = DataPlan(sources=[str(data)], max_new_tokens=12, gen_batch_size=4, chunk_len=64)
    cfg = TrainConfig(model="tiny", out_dir=str(tmp_path / "run"), data=plan, draft_vocab_size=128,
                      intermediate_size=64, steps=6, batch_size=32, eval_every=3, progress=False)
    r = train_draft_head(cfg, target=tiny_target, log=lambda *_: None)
    assert r.report["steps"] == 6
    assert set(r.report["data"]["tokens"]) >= {f"{data}/train", f"{data}/heldout"}
    assert "acceptance_length" in r.report["heldout"]["overall"]
    net, notes = load_draft_head(r.checkpoint)
    assert notes["steps"] == 6 and net.config.draft_vocab_size == 128
    with pytest.raises(FileExistsError):
        train_draft_head(cfg, target=tiny_target, log=lambda *_: None)
    cfg.resume, cfg.steps = True, 9
    r2 = train_draft_head(cfg, target=tiny_target, log=lambda *_: None)
    assert r2.report["steps"] == 9
    assert r2.report["data"]["generate_s"] == 0.0  # shards reused


def test_cli_arguments_build_the_config():
    import argparse

    from adaspec.train.cli import add_train_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_train_arguments(p)
    cfg = config_from_args(p.parse_args(["--out", "x", "--data", "chat,stdlib", "--time-budget-s", "5", "--resume"]))
    assert cfg.out_dir == "x" and cfg.data.sources == ["chat", "stdlib"]
    assert cfg.time_budget_s == 5 and cfg.resume
    assert cfg.data.num_chat == DataPlan().num_chat


# ---------------------------------------------------------------- the shipped head
def test_shipped_checkpoint_is_small_and_for_the_default_model():
    path = shipped_checkpoint_path(REAL_MODEL)
    assert path.is_file()
    assert path.stat().st_size < 40e6
    net, notes = load_draft_head(path)
    assert net.config.target_vocab_size == 49152 and net.config.hidden_size == 576
    assert notes["heldout"]["acceptance_length"]


@pytest.mark.real_model
def test_real_model_shipped_head_exact_and_useful(real_target):
    spec = load_static_speculator(real_target)
    eng = Engine(real_target, [spec], lookahead=4)
    prompt = eng.encode_prompt("Write a Python function that reverses a string.", chat=True)
    plain = plain_ids(real_target, prompt, 48)
    r = eng.generate(prompt, SamplingParams(max_tokens=48))
    assert r.token_ids == plain
    assert r.speculation.mean_acceptance_length > 1.5


def test_seeded_sampled_request_reproduces_after_other_traffic(small_vocab_target):
    # A seeded request draws its drafts from its own generator: what the speculator
    # served before (unseeded or other seeds) must not change its output.
    t = small_vocab_target
    net = new_draft_head(t, [0, 2, 3, 4, 5, 7, 8, 9, 10, 11, 13, 15], intermediate_size=32, seed=2)
    eng = Engine(t, [DraftHeadSpeculator(net, target_embedding_weight(t))], lookahead=4)
    prompt = [3, 7, 1, 9]
    params = SamplingParams(max_tokens=32, temperature=1.0, seed=123, ignore_eos=True)
    first = eng.generate(prompt, params)
    eng.generate(prompt, SamplingParams(max_tokens=24, temperature=1.0, ignore_eos=True))
    eng.generate(prompt[:2], SamplingParams(max_tokens=24, temperature=1.0, seed=7, ignore_eos=True))
    again = eng.generate(prompt, params)
    assert first.speculation.proposed > 0 and first.speculation.accepted > 0
    assert again.token_ids == first.token_ids
    other = eng.generate(prompt, SamplingParams(max_tokens=32, temperature=1.0, seed=124, ignore_eos=True))
    assert other.token_ids != first.token_ids
