"""Offline training of static speculators (the draft head).

``python -m adaspec.train.draft_head --model M --out DIR`` or
:func:`adaspec.train.draft_head.train_draft_head`; the CLI wiring lives in
:mod:`adaspec.train.cli`.
"""
