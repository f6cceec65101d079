"""adaspec: adaptive speculative decoding that gets faster the longer it runs."""

__version__ = "0.1.0"
