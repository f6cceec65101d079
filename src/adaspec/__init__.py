"""adaspec: adaptive speculative decoding that gets faster the longer it runs."""

from adaspec.threads import bounded_wait_policy as _bounded_wait_policy

# Before torch is first imported: OpenMP threads spin briefly, then sleep, so a team
# stays awake within a forward and never spins long against another process (see adaspec.threads).
_bounded_wait_policy()

__version__ = "0.1.0"
