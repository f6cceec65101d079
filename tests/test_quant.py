"""The batch-invariant int8 path (adaspec.quant).

Invariance is checked bitwise (torch.equal), position by position: logits of a
position computed in a forward of 1 token vs in a forward of k tokens over the
same KV cache. The tiny random llama keeps these tests fast; the real-model
test is marked ``real_model``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adaspec import quant

# Relative Frobenius error of one Int8Linear against fp32 on Gaussian data:
# per-token 8-bit activations x per-channel 8-bit weights give ~1%; 7-bit
# activations (CPUs without VNNI) ~2%.
REL_ERR_8BIT = 0.03
REL_ERR_7BIT = 0.06


def tiny_llama(seed: int = 0, tie: bool = True) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                         max_position_embeddings=1024, tie_word_embeddings=tie)
    model = LlamaForCausalLM(config).eval()
    # Random init gives tiny logits; widen them so argmax ties cannot hide differences.
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20.0)
    return model


@pytest.fixture(autouse=True)
def one_thread():
    # The tests compare bits, not speed; one thread keeps them fast on a busy
    # 2-core machine (OpenMP barriers stall when the other core is taken).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ids(n: int, seed: int, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- Int8Linear


@pytest.mark.parametrize("bits, tol", [(8, REL_ERR_8BIT), (7, REL_ERR_7BIT)])
def test_int8_linear_close_to_fp32(bits, tol):
    torch.manual_seed(0)
    lin = nn.Linear(128, 96, bias=True)
    q = quant.Int8Linear.from_linear(lin, activation_bits=bits)
    x = torch.randn(7, 128)
    with torch.no_grad():
        ref, got = lin(x), q(x)
    assert got.shape == ref.shape and got.dtype == torch.float32
    rel = float((got - ref).norm() / ref.norm())
    assert rel < tol, rel
    # the dequantized weight is the per-channel symmetric int8 grid
    w = q.dequantized_weight()
    assert float((w - lin.weight.detach()).abs().max()) <= float(q.w_scale.max()) / 2 + 1e-7


@pytest.mark.parametrize("bits", [7, 8])
def test_int8_linear_rows_are_batch_invariant(bits):
    torch.manual_seed(1)
    lin = nn.Linear(64, 80, bias=False)
    q = quant.Int8Linear.from_linear(lin, activation_bits=bits)
    for m in range(1, 18):
        x = torch.randn(m, 64) * torch.rand(m, 1) * 5
        x[0, :3] *= 50  # an outlier row must not affect the others
        batched = q(x)
        for i in range(m):
            assert torch.equal(q(x[i:i + 1]), batched[i:i + 1]), (m, i)


def test_int8_linear_zero_row_is_zero():
    q = quant.Int8Linear.from_linear(nn.Linear(32, 16, bias=False))
    assert torch.equal(q(torch.zeros(2, 32)), torch.zeros(2, 16))


def test_default_bits_follow_saturation_probe():
    q = quant.Int8Linear.from_linear(nn.Linear(32, 16))
    assert (q.activation_bits, q.weight_bits) == quant.default_bits()
    assert quant.default_bits() == ((8, 7) if quant.fbgemm_saturates() else (8, 8))


def test_bits_validated():
    with pytest.raises(ValueError):
        quant.Int8Linear(torch.randn(4, 16), activation_bits=6)
    with pytest.raises(ValueError):
        quant.Int8Linear(torch.randn(4, 16), weight_bits=9)


def test_input_smooth_is_exact_in_real_arithmetic():
    torch.manual_seed(5)
    lin = nn.Linear(64, 32, bias=False)
    s = torch.rand(64) * 4 + 0.25
    q = quant.Int8Linear(lin.weight, None, input_smooth=s)
    torch.testing.assert_close(q.dequantized_weight(), lin.weight.detach(), atol=float(q.w_scale.max()) * s.max(), rtol=0)
    x = torch.randn(6, 64)
    with torch.no_grad():  # arbitrary factors widen the weight grid: looser than REL_ERR_8BIT
        assert float((q(x) - lin(x)).norm() / lin(x).norm()) < 2 * REL_ERR_8BIT
    for m in range(1, 10):  # still row-invariant
        xb = torch.randn(m, 64)
        yb = q(xb)
        assert all(torch.equal(q(xb[i:i + 1]), yb[i:i + 1]) for i in range(m))


def test_fused_group_bitwise_equals_separate_layers():
    torch.manual_seed(2)
    lins = [nn.Linear(64, n, bias=True) for n in (64, 32, 32)]
    group = quant.FusedInt8Group(lins)
    members = [quant.FusedInt8Member(group, i, owner=i == 0) for i in range(3)]
    x = torch.randn(5, 64)
    for lin, member in zip(lins, members):
        assert torch.equal(member(x), quant.Int8Linear.from_linear(lin)(x))
    # once every member has been served the stash is dropped (no activations kept)
    assert group._stash.input is None and group._stash.output is None
    # a different input object is recomputed, not served from the previous call
    y = x.clone() * 2
    assert torch.equal(members[1](y), quant.Int8Linear.from_linear(lins[1])(y))
    assert torch.equal(members[1](x), quant.Int8Linear.from_linear(lins[1])(x))


# --------------------------------------------------------------------------- attention


@pytest.fixture(params=["auto", "loop"])
def attention_mode(request, monkeypatch):
    """Run a test with the compiled kernel (when it builds) and with the SDPA-per-query loop."""
    monkeypatch.setenv("ADASPEC_ATTENTION_KERNEL", request.param)
    return request.param


def test_attention_kernel_builds_where_a_toolchain_exists():
    import shutil

    if not (shutil.which("g++") or shutil.which("c++")) or not shutil.which("ninja"):
        pytest.skip("no C++ toolchain: the SDPA-per-query fallback is used (invariant, slower)")
    op = quant.attention_kernel()
    assert op is not None, quant._KERNEL_STATE.get("error")


def test_invariant_attention_matches_causal_sdpa(attention_mode):
    torch.manual_seed(3)
    module = nn.Module()
    module.num_key_value_groups = 2
    for T, S in [(1, 9), (5, 12), (6, 6), (quant.MAX_INVARIANT_TOKENS + 3, quant.MAX_INVARIANT_TOKENS + 3),
                 (quant.MAX_INVARIANT_TOKENS + 3, quant.MAX_INVARIANT_TOKENS + 10)]:
        q = torch.randn(1, 4, T, 16)
        k, v = torch.randn(1, 2, S, 16), torch.randn(1, 2, S, 16)
        out, _ = quant.invariant_attention_forward(module, q, k, v, None, scaling=0.25)
        mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)
        ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                             attn_mask=mask, scale=0.25).transpose(1, 2)
        assert out.shape == (1, T, 4, 16)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- whole model


def test_tiny_model_int8_is_batch_invariant_position_by_position(attention_mode):
    model = tiny_llama()
    report = quant.quantize_model_int8(model)
    assert report["attention"] == quant.INVARIANT_ATTENTION
    assert report["attention_kernel"] == ("sdpa per query" if attention_mode == "loop" else "cpp")
    results = quant.check_batch_invariance(model, _ids(10, 1), _ids(17, 2), chunks=range(2, 10))
    for r in results:
        assert r.invariant, r
        assert r.max_abs_diff == 0.0 and r.argmax_mismatches == 0


def test_tiny_model_invariant_after_batched_prefill_and_up_to_max_tokens():
    # a prompt longer than MAX_INVARIANT_TOKENS takes the batched prefill path;
    # forwards of up to MAX_INVARIANT_TOKENS tokens after it stay invariant
    model = tiny_llama(seed=4)
    quant.quantize_model_int8(model, fuse=False)
    n = quant.MAX_INVARIANT_TOKENS
    results = quant.check_batch_invariance(model, _ids(n + 6, 3), _ids(n, 4), chunks=[3, n])
    assert all(r.invariant for r in results), results


def test_quantize_report_and_untied_lm_head():
    model = tiny_llama(tie=True)
    embed_before = model.model.embed_tokens.weight.detach().clone()
    calib = [_ids(20, 5), _ids(12, 6)]
    report = quant.quantize_model_int8(model, calib)
    n_layers = model.config.num_hidden_layers
    assert len(report["quantized"]) == 7 * n_layers + 1
    assert len(report["fused"]) == 2 * n_layers
    assert report["lm_head"] == "int8, untied from the embedding"
    assert isinstance(model.lm_head, quant.Int8Linear)
    assert isinstance(model.model.embed_tokens, nn.Embedding)
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(model.model.embed_tokens.weight, embed_before)
    assert report["calibration"]["sequences"] == 2 and report["calibration"]["tokens"] == 32
    assert report["calibration"]["by_kind"]["down_proj"]["layers"] == n_layers
    # default smooth_alpha: every projection but o_proj is smoothed, the LM head inside its layer
    assert report["smooth_alpha"] == 0.5
    assert len(report["smoothed"]) == 6 * n_layers + 1 and "lm_head" in report["smoothed"]
    assert model.lm_head.inv_smooth is not None
    assert report["weight_bytes_int8"] < report["weight_bytes_fp32"] / 3
    assert not any(isinstance(m, nn.Linear) for m in model.model.layers.modules())


def test_attention_choice_is_pinned_per_model(monkeypatch):
    monkeypatch.setenv("ADASPEC_ATTENTION_KERNEL", "loop")
    model = tiny_llama(seed=15)
    assert quant.quantize_model_int8(model)["attention_kernel"] == "sdpa per query"
    attn = [m for m in model.modules() if hasattr(m, "num_key_value_groups")]
    assert attn and all(m._adaspec_attention_kernel == (None,) for m in attn)
    monkeypatch.setenv("ADASPEC_ATTENTION_KERNEL", "auto")  # a later change does not mix paths
    results = quant.check_batch_invariance(model, _ids(8, 16), _ids(9, 17), chunks=[4, 9])
    assert all(r.invariant for r in results)


def test_deepcopy_of_quantized_model_computes_the_same():
    model = tiny_llama(seed=16)
    quant.quantize_model_int8(model)
    clone = copy.deepcopy(model)
    ids = _ids(12, 18)[None]
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, clone(input_ids=ids).logits)


def test_quantize_without_lm_head_keeps_it_fp32():
    model = tiny_llama()
    report = quant.quantize_model_int8(model, lm_head=False)
    assert report["lm_head"] == "fp32" and isinstance(model.lm_head, nn.Linear)


def test_smoothing_preserves_the_fp32_function():
    model = tiny_llama(seed=10)
    ref_model = copy.deepcopy(model)
    calib = [_ids(32, 11), _ids(16, 12)]
    stats = quant.collect_activation_stats(model, calib)
    smoothed = quant.smooth_model(model, stats, alpha=0.5)
    assert len(smoothed) == 6 * model.config.num_hidden_layers
    ids = _ids(20, 13)[None]
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=ids).logits, ref_model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-3)


def test_cached_activation_stats_roundtrip(tmp_path):
    model = tiny_llama(seed=14)
    calib = [_ids(16, 15)]
    first = quant.cached_activation_stats(model, calib, cache_dir=tmp_path)
    files = list(tmp_path.glob("activation-stats-*.pt"))
    assert len(files) == 1
    again = quant.cached_activation_stats(model, calib, cache_dir=tmp_path)
    assert set(first) == set(again)
    for name in first:
        assert torch.equal(first[name].channel_absmax, again[name].channel_absmax)
        assert first[name].absmax == again[name].absmax
    quant.cached_activation_stats(model, [_ids(16, 16)], cache_dir=tmp_path)  # other calibration, other file
    assert len(list(tmp_path.glob("activation-stats-*.pt"))) == 2


def test_calibration_and_held_out_texts_are_disjoint():
    calib = quant.calibration_texts()
    held = quant.held_out_texts()
    assert sum(k == "chat" for k, _ in calib) == 16 and sum(k == "code" for k, _ in calib) == 8
    calib_texts = {t for _, t in calib}
    for domain, texts in held.items():
        assert texts and not calib_texts.intersection(texts), domain


def test_int8_model_close_to_fp32_logits():
    model = tiny_llama(seed=6)
    ref_model = copy.deepcopy(model)
    quant.quantize_model_int8(model)
    ids = _ids(24, 7)[None]
    with torch.inference_mode():
        ref = ref_model(input_ids=ids).logits
        got = model(input_ids=ids).logits
    assert float((got - ref).norm() / ref.norm()) < 0.05
    assert float((got.argmax(-1) == ref.argmax(-1)).float().mean()) > 0.9


def test_perplexity_helper():
    model = tiny_llama(seed=8)
    seqs = [_ids(30, 9), _ids(1, 10), _ids(12, 11)]  # the 1-token sequence is skipped
    out = quant.perplexity(model, seqs)
    assert out["tokens"] == 29 + 11
    assert math.isclose(out["ppl"], math.exp(out["nll"]))
    assert 1.0 < out["ppl"] < math.inf
    with pytest.raises(ValueError):
        quant.perplexity(model, [_ids(1, 12)])


def test_perplexity_default_cut_is_512_tokens():
    model = tiny_llama(seed=8)
    assert quant.perplexity(model, [_ids(600, 19)])["tokens"] == 511


def test_measure_step_cost_shape():
    from adaspec.step_cost import measure_step_cost
    from adaspec.target import TargetModel

    model = tiny_llama(seed=9)
    quant.quantize_model_int8(model)
    target = TargetModel(model=model, tokenizer=None, name="tiny", dtype="int8")
    cost = measure_step_cost(target, ks=[1, 3], repeats=2, prompt_len=8, warmup=1)
    assert set(cost) == {1, 3} and all(v > 0 for v in cost.values())
    cost = measure_step_cost(target, ks=[2])  # defaults: 7 repeats on a 64-token prefix
    assert set(cost) == {2} and cost[2] > 0


class _CharTokenizer:
    """Byte-level stand-in: ids are UTF-8 bytes; no chat template."""

    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": list(text.encode("utf-8"))}


def test_default_calibration_ids_cut_to_128_tokens():
    ids = quant.default_calibration_ids(_CharTokenizer())
    assert len(ids) == 24 and all(2 <= len(t) <= 128 and t.dtype == torch.long for t in ids)


# --------------------------------------------------------------------------- stand-alone calibration

# sha256 of the calibration texts / the real tokenizer's calibration ids, as the
# development machine (full prompt sets in ../shared) computed them before the
# subset shipped in the package: every machine must keep getting these.
CALIBRATION_TEXTS_SHA256 = "c98840aac0f143fae48fd4cb55484e7b5c3c5d37fd16635ec70148ba1db84919"
REAL_CALIBRATION_IDS_SHA256 = "5075c873c002a25939df097d57d92d4ff3f33f2a23cdb5fb88b895dc99c15829"


@pytest.fixture
def nothing_beside(tmp_path, monkeypatch):
    """No prompt data outside the package: ``$ADASPEC_PROMPTS`` an empty folder, no ``../shared``."""
    from adaspec import prompts

    shared = prompts.shared_prompts_root()
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("ADASPEC_PROMPTS", str(empty))
    monkeypatch.setattr(prompts, "shared_prompts_root", lambda: None)
    return shared  # the full sets, where this machine has them (else None)


def _ids_sha256(ids) -> str:
    import hashlib

    h = hashlib.sha256()
    for t in ids:
        h.update(t.numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()


def _int8_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every int8 weight, weight scale, smoothing factor and bias, plus the (smoothed) fp32 norms."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, quant.Int8Linear):
            out[name + ".w_int8"] = mod._w_int8
            out[name + ".w_scale"] = mod.w_scale
            for attr in ("inv_smooth", "bias"):
                if getattr(mod, attr) is not None:
                    out[f"{name}.{attr}"] = getattr(mod, attr).detach()
    out.update({k: v for k, v in model.state_dict().items() if "norm" in k})
    return out


def test_int8_calibration_needs_nothing_beside_the_package(nothing_beside):
    import hashlib
    import json

    from adaspec import prompts

    with pytest.raises(FileNotFoundError):
        prompts.load_domain("python")  # the benchmarks do read $ADASPEC_PROMPTS ...
    texts = quant.calibration_texts()  # ... the calibration never does
    assert hashlib.sha256(json.dumps(texts).encode()).hexdigest() == CALIBRATION_TEXTS_SHA256
    ids = quant.default_calibration_ids(_CharTokenizer())
    alone = tiny_llama(seed=20)
    report = quant.quantize_model_int8(alone, ids)
    assert report["smoothed"]  # calibrated, not quietly unsmoothed
    if nothing_beside is None:
        return  # a fresh clone: the pinned digest above is the comparison
    assert quant.calibration_texts(nothing_beside) == texts
    assert quant.held_out_texts(nothing_beside) == quant.held_out_texts()
    shared_ids = quant.default_calibration_ids(_CharTokenizer(), root=nothing_beside)
    assert len(shared_ids) == len(ids) and all(torch.equal(a, b) for a, b in zip(shared_ids, ids))
    with_shared = tiny_llama(seed=20)
    quant.quantize_model_int8(with_shared, shared_ids)
    got, want = _int8_state(alone), _int8_state(with_shared)
    assert got.keys() == want.keys() and len(got) > 20
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.real_model
def test_real_calibration_ids_need_nothing_beside_the_package(nothing_beside):
    from transformers import AutoTokenizer

    from adaspec.models import DEFAULT_MODEL, resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL, progress=False))
    ids = quant.default_calibration_ids(tokenizer)
    assert _ids_sha256(ids) == REAL_CALIBRATION_IDS_SHA256
    if nothing_beside is not None:
        assert _ids_sha256(quant.default_calibration_ids(tokenizer, root=nothing_beside)) == REAL_CALIBRATION_IDS_SHA256


# --------------------------------------------------------------------------- real model

# int8 perplexity on held-out text may exceed fp32's by at most this factor (measured:
# +1-2% on this subset, 8-bit and 7-bit weights alike).
REAL_PPL_RATIO_MAX = 1.05


@pytest.mark.real_model
def test_real_model_int8_invariant_and_close_in_perplexity():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adaspec.models import DEFAULT_MODEL, resolve_model

    path = resolve_model(DEFAULT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    held = quant.held_out_texts(n_per_domain=4)
    texts = held["python"] + held["chat"]
    ppl_fp32 = quant.perplexity(model, tokenizer, texts, max_tokens=160)["ppl"]

    calib = quant.default_calibration_ids(tokenizer)
    report = quant.quantize_model_int8(model, calib, stats=quant.cached_activation_stats(model, calib))
    assert report["lm_head"].startswith("int8") and report["smoothed"]
    ppl_int8 = quant.perplexity(model, tokenizer, texts, max_tokens=160)["ppl"]
    assert ppl_int8 <= ppl_fp32 * REAL_PPL_RATIO_MAX, (ppl_fp32, ppl_int8)

    vocab = model.config.vocab_size
    results = quant.check_batch_invariance(model, _ids(24, 13, vocab), _ids(9, 14, vocab), chunks=[2, 9])
    assert all(r.invariant for r in results), results


def test_bench_quality_table(tiny_model_dir, monkeypatch):
    from adaspec.bench.quality import DEFAULT_SYSTEMS, format_quality, measure_quality

    # float16 K/V (the int8 default) moves this random model's near-uniform perplexity by ~2%
    # (the real model's: 6.096 -> 6.095, BENCHMARKS.md); the kernels are compared at float32 K/V
    monkeypatch.setenv("ADASPEC_KV_DTYPE", "float32")
    res = measure_quality(str(tiny_model_dir), DEFAULT_SYSTEMS.split(","), n_per_domain=2, max_tokens=24, chunk=5)
    assert list(res) == ["float32:transformers", "int8:transformers", "int8:lean"]
    assert set(res["int8:lean"]) == {"python", "rust", "chat", "all"}
    assert all(r["ppl"] > 1 and r["tokens"] > 0 for row in res.values() for r in row.values())
    # the pooled row is the token-weighted union of the domains
    assert res["int8:lean"]["all"]["tokens"] == sum(res["int8:lean"][d]["tokens"] for d in ("python", "rust", "chat"))
    # same int8 weights on both runtimes: the lean kernels cost (almost) nothing in quality
    for d in res["int8:lean"]:
        assert math.isclose(res["int8:lean"][d]["ppl"], res["int8:transformers"][d]["ppl"], rel_tol=0.01)
    monkeypatch.setenv("ADASPEC_KV_DTYPE", "float16")
    res16 = measure_quality(str(tiny_model_dir), ["int8:lean"], n_per_domain=2, max_tokens=24, chunk=5)
    for d in res16["int8:lean"]:
        assert math.isclose(res16["int8:lean"][d]["ppl"], res["int8:lean"][d]["ppl"], rel_tol=0.05)
    table = format_quality(res)
    assert table.splitlines()[0] == "| dtype:runtime | python | rust | chat | all |" and "x) |" in table
    assert "int8 lean / transformers: python " in table


def test_runtime_perplexity_matches_module_perplexity_and_is_chunk_invariant(tiny_model_dir):
    from adaspec.model.target import lean_target
    from adaspec.target import load_target

    target = load_target(str(tiny_model_dir), dtype="float32", runtime="transformers")
    seqs = [_ids(30, 9), _ids(1, 10), _ids(12, 11)]
    ref = quant.perplexity(target.model, seqs)
    hf = quant.runtime_perplexity(target, seqs, chunk=7)
    assert hf["tokens"] == ref["tokens"] == 29 + 11
    assert math.isclose(hf["ppl"], ref["ppl"], rel_tol=1e-4)
    lean = lean_target(target)
    by_chunk = [quant.runtime_perplexity(lean, seqs, chunk=c)["nll"] for c in (1, 4, 64)]
    assert by_chunk[0] == by_chunk[1] == by_chunk[2]  # bitwise: the lean core is chunk invariant
    assert math.isclose(by_chunk[0], ref["nll"], rel_tol=1e-4)
    with pytest.raises(ValueError):
        quant.runtime_perplexity(lean, seqs, chunk=0)


def test_bench_quality_refuses_unknown_runtime():
    from adaspec.bench.quality import QualitySystem, parse_systems

    assert parse_systems(["float32", "int8:lean"]) == [QualitySystem("float32", "auto"), QualitySystem("int8", "lean")]
    with pytest.raises(ValueError, match="runtime"):
        parse_systems(["int8:gpu"])


# --------------------------------------------------------------------------- int8 model cache


@pytest.fixture
def quant_cache(tmp_path, monkeypatch):
    from adaspec.quant import cache

    folder = tmp_path / "quant-cache"
    monkeypatch.setattr(cache, "cache_path", lambda key, cache_dir=None: folder / f"int8-model-{key}.safetensors")
    return folder


def _fresh_and_cached(model_dir, runtime):
    from adaspec.target import load_target

    fresh = load_target(str(model_dir), dtype="int8", max_model_len=256, runtime=runtime)
    cached = load_target(str(model_dir), dtype="int8", max_model_len=256, runtime=runtime)
    return fresh, cached


@pytest.mark.parametrize("runtime", ["transformers", "lean"])
def test_int8_model_cache_gives_bitwise_the_quantized_model(tiny_model_dir, quant_cache, runtime):
    """Quantize once, load from the cache after: same int8 state, same logits bit for bit."""
    fresh, cached = _fresh_and_cached(tiny_model_dir, runtime)
    assert "cache" not in fresh.quant_report and cached.quant_report["cache"].startswith(str(quant_cache))
    assert len(list(quant_cache.glob("int8-model-*.safetensors"))) == 1
    got, want = _int8_state(cached.model), _int8_state(fresh.model)
    assert got.keys() == want.keys() and len(got) > 10
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert torch.equal(cached.model.model.embed_tokens.weight, fresh.model.model.embed_tokens.weight)
    ids = _ids(40, seed=3, vocab=fresh.vocab_size).tolist()
    a, b = fresh.forward(fresh.new_cache(), ids), cached.forward(cached.new_cache(), ids)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.hidden, b.hidden)
    for k in ("quantized", "fused", "smoothed", "lm_head", "activation_bits", "weight_bits"):
        assert cached.quant_report[k] == fresh.quant_report[k], k


def test_damaged_int8_cache_is_quantized_again(tiny_model_dir, quant_cache, capsys):
    from adaspec.target import load_target

    fresh = load_target(str(tiny_model_dir), dtype="int8", max_model_len=256, runtime="transformers")
    (path,) = quant_cache.glob("int8-model-*.safetensors")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a crash mid-copy, a full disk
    again = load_target(str(tiny_model_dir), dtype="int8", max_model_len=256, runtime="transformers")
    assert "unusable" in capsys.readouterr().err and "cache" not in again.quant_report
    ids = _ids(30, seed=4, vocab=fresh.vocab_size).tolist()
    assert torch.equal(fresh.forward(fresh.new_cache(), ids).logits, again.forward(again.new_cache(), ids).logits)
    assert path.exists() and path.stat().st_size > 0  # rewritten whole


def test_int8_cache_key_follows_weights_and_calibration(tiny_model_dir, tmp_path):
    import shutil

    from adaspec.quant import cache

    ids = [torch.arange(10)]
    key = cache.int8_cache_key(tiny_model_dir, ids, 8, 7, 0.5)
    assert key == cache.int8_cache_key(tiny_model_dir, ids, 8, 7, 0.5)
    assert key != cache.int8_cache_key(tiny_model_dir, [torch.arange(11)], 8, 7, 0.5)
    assert key != cache.int8_cache_key(tiny_model_dir, ids, 8, 8, 0.5)
    other = shutil.copytree(tiny_model_dir, tmp_path / "other")
    assert cache.int8_cache_key(other, ids, 8, 7, 0.5) == key  # content, not path
    from conftest import build_tiny_model_dir

    changed = build_tiny_model_dir(tmp_path / "seed9", seed=9)
    assert cache.int8_cache_key(changed, ids, 8, 7, 0.5) != key
    assert cache.int8_cache_key(tmp_path, ids, 8, 7, 0.5) is None  # not a model folder
