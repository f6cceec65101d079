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
