"""Speculators: engine-agnostic draft proposers (no transformers import)."""

from adaspec.speculators.base import Speculator
from adaspec.speculators.ngram import NgramSpeculator
from adaspec.speculators.suffix import SuffixSpeculator

__all__ = ["Speculator", "NgramSpeculator", "SuffixSpeculator"]
