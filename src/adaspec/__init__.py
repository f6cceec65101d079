"""adaspec: adaptive speculative decoding that gets faster the longer it runs."""

from adaspec.threads import passive_wait_policy as _passive_wait_policy

# Before torch is first imported: OpenMP threads that sleep when idle never fight
# another process for a core (see adaspec.threads).
_passive_wait_policy()

__version__ = "0.1.0"
