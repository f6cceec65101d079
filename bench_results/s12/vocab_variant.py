import sys, runpy, torch
from adaspec.online.trainer import OnlineTrainer, OnlineConfig
mode = sys.argv.pop(1)
if mode == "prompt":
    def counts(docs, V):
        c = torch.bincount(torch.cat([d.target_argmax.long() for d in docs]).clamp(0, V - 1), minlength=V)
        c += torch.bincount(torch.cat([d.token_ids[: d.num_prompt_tokens].long() for d in docs]).clamp(0, V - 1), minlength=V)
        return c
    OnlineTrainer.vocabulary_counts = staticmethod(counts)
if mode == "min1":
    orig = OnlineConfig.__init__
    import dataclasses
    OnlineConfig.vocab_min_count = 1
    f = [x for x in dataclasses.fields(OnlineConfig) if x.name == "vocab_min_count"][0]; f.default = 1
    def init(self, *a, **k):
        k.setdefault("vocab_min_count", 1); orig(self, *a, **k)
    OnlineConfig.__init__ = init
sys.argv[0] = "bench_results/s12/vocab_offline.py"
runpy.run_path("bench_results/s12/vocab_offline.py", run_name="__main__")
