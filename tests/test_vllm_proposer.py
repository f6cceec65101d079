"""The vLLM custom_class adapter, driven with batches shaped like vLLM's (no vLLM here)."""

from types import SimpleNamespace

import numpy as np

from adaspec.integrations.vllm_proposer import AdaspecSuffixProposer


def batch(rows, width=64):
    arr = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        arr[i, : len(r)] = r
    return arr, np.array([len(r) for r in rows])


def test_adapter_learns_across_requests_and_rows():
    cfg = SimpleNamespace(speculative_config=SimpleNamespace(num_speculative_tokens=4))
    prop = AdaspecSuffixProposer(cfg)
    prop.load_model(None)
    pattern = [11, 12, 13, 14, 15, 16, 17, 18]
    # Request 1 in row 0 generates the pattern token by token.
    seq = [1, 2, 3]
    for t in pattern:
        seq = seq + [t]
        arr, n = batch([seq])
        drafts = prop.propose([[t]], n, arr)
        assert len(drafts) == 1 and len(drafts[0]) <= 4
    # Request 2 arrives in row 1 (row 0 is a prefill with no sampled token):
    # after the pattern's first token, the learned continuation is drafted.
    arr, n = batch([[9, 9, 9], [5, 6, 11]])
    drafts = prop.propose([[], [11]], n, arr)
    assert drafts[0] == []
    # (the suffix speculator drafts at most spec_factor x match length = 2 tokens here)
    assert drafts[1] == [12, 13]


def test_adapter_resets_a_reused_row():
    prop = AdaspecSuffixProposer(None)
    arr, n = batch([[1, 2, 3, 4]])
    prop.propose([[4]], n, arr)
    arr, n = batch([[7, 8, 9]])  # a different request now occupies row 0
    assert isinstance(prop.propose([[9]], n, arr)[0], list)
    assert len(prop._rows) == 1 and prop.lookahead == 8


def test_atlas_adapter_learns_and_judges_its_drafts():
    from adaspec.integrations.vllm_proposer import AdaspecAtlasProposer

    cfg = SimpleNamespace(speculative_config=SimpleNamespace(num_speculative_tokens=6))
    prop = AdaspecAtlasProposer(cfg)
    atlas = prop.controller
    pattern = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    drafted = []
    for r in range(4):  # the same output four times, in row r % 2, vLLM-style steps
        seq = [1, 2, 3 + r]
        pending = []
        i = 0
        while i < len(pattern):
            # vLLM accepts the longest right prefix of the draft, then samples one token.
            acc = 0
            while acc < len(pending) and i + acc < len(pattern) and pending[acc] == pattern[i + acc]:
                acc += 1
            step = pattern[i : i + acc + 1]
            i += len(step)
            seq = seq + step
            rows = [[9, 9]] * (r % 2) + [seq]
            arr, n = batch(rows)
            drafts = prop.propose([[]] * (r % 2) + [step], n, arr)
            pending = drafts[r % 2]
            assert len(pending) <= 6
            drafted.append(len(pending))
    est = atlas.estimator("suffix", "default")
    # Chosen drafts were judged with their real acceptance: the estimate rose above its prior.
    assert est.position_probs(1)[0] > 0.5
    assert max(drafted) >= 3 and atlas.choices.get("suffix", 0) > 0


def test_drafts_stop_at_the_context_window():
    from adaspec.integrations.vllm_proposer import AdaspecAtlasProposer

    cfg = SimpleNamespace(speculative_config=SimpleNamespace(num_speculative_tokens=4),
                          model_config=SimpleNamespace(max_model_len=20))
    for prop in (AdaspecSuffixProposer(cfg), AdaspecAtlasProposer(cfg)):
        pattern = list(range(30, 48))
        for r in range(2):  # learn the pattern, then replay it up to the window
            seq = [1]
            for t in pattern + ([48, 49] if r else []):
                seq = seq + [t]
                arr, n = batch([seq], width=24)
                (draft,) = prop.propose([[t]], n, arr)
                assert len(draft) <= max(0, 20 - len(seq)), (len(seq), draft)
        assert prop.max_model_len == 20


def test_adapter_follows_a_request_moved_to_another_row():
    """vLLM condenses its batch: when row 0 finishes, the request in row 1 moves to row 0."""
    prop = AdaspecSuffixProposer(None)
    a, b = [1, 2, 3, 4], [7, 8, 9]
    arr, n = batch([a, b])
    prop.propose([[4], [9]], n, arr)
    rid_b = prop._rows[1].request_id
    b = b + [10]
    arr, n = batch([b])  # request a finished; b now in row 0
    prop.propose([[10]], n, arr)
    assert prop._rows[0].request_id == rid_b and prop._rows[0].tokens == b


def test_adapter_snapshots_and_restores_learned_state(tmp_path):
    state = tmp_path / "state"
    prop = AdaspecSuffixProposer(None, state_dir=str(state), snapshot_interval_s=0)
    pattern = [1, 2, 3] + list(range(20, 32))
    for i in range(4, len(pattern) + 1):
        arr, n = batch([pattern[:i]])
        prop.propose([[pattern[i - 1]]], n, arr)
    prop.close()  # what an exit does: the live request is learned and saved
    assert prop.snapshots == 1 and (state / "suffix.snap").exists()
    again = AdaspecSuffixProposer(None, state_dir=str(state))
    assert again.restored
    arr, n = batch([[5, 20, 21, 22]])
    assert again.propose([[22]], n, arr)[0][:3] == [23, 24, 25]
    again.close()


def test_idle_requests_are_learned_before_a_snapshot(tmp_path, monkeypatch):
    from adaspec.integrations import vllm_proposer

    monkeypatch.setattr(vllm_proposer, "IDLE_STOP_S", 0.0)
    prop = AdaspecSuffixProposer(None, state_dir=str(tmp_path), snapshot_interval_s=0)
    arr, n = batch([[1, 2, 3, 4, 5]])
    prop.propose([[5]], n, arr)
    assert prop.stop_idle() == 1 and prop._rows == {}
    assert prop.save_state() and not prop.save_state()  # nothing new: no second write


def test_bad_snapshot_interval_is_refused(monkeypatch):
    import pytest

    monkeypatch.setenv("ADASPEC_SNAPSHOT_INTERVAL_S", "soon")
    with pytest.raises(ValueError, match="ADASPEC_SNAPSHOT_INTERVAL_S"):
        AdaspecSuffixProposer(None)
    with pytest.raises(ValueError, match=">= 0"):
        AdaspecSuffixProposer(None, snapshot_interval_s=-1)


def test_runner_speculative_configs_and_errors():
    import pytest

    from adaspec.integrations.vllm_runner import PROPOSERS, speculative_config

    assert speculative_config("plain", 8) is None
    assert speculative_config("adaspec-atlas", 6) == {"method": "custom_class", "model": PROPOSERS["adaspec-atlas"],
                                                        "num_speculative_tokens": 6}
    assert speculative_config("ngram", 4)["method"] == "ngram"
    with pytest.raises(ValueError, match="unknown vLLM method"):
        speculative_config("eagle", 4)
    with pytest.raises(ValueError, match="k >= 1"):
        speculative_config("suffix", 0)


def test_client_reports_a_missing_vllm_environment(tmp_path):
    import pytest

    from adaspec.integrations.vllm_client import VllmUnavailable, find_vllm_python

    with pytest.raises(VllmUnavailable, match="does not exist"):
        find_vllm_python(str(tmp_path / "nope"))


def test_only_rank_zero_writes_snapshots(tmp_path):
    cfg = SimpleNamespace(parallel_config=SimpleNamespace(rank=1))
    prop = AdaspecSuffixProposer(cfg, state_dir=str(tmp_path), snapshot_interval_s=0)
    arr, n = batch([[1, 2, 3, 4]])
    prop.propose([[4]], n, arr)
    prop.close()
    assert prop.snapshots == 0 and not (tmp_path / "suffix.snap").exists()
