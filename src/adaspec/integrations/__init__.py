"""Adapters that run adaspec's speculators inside other engines."""
