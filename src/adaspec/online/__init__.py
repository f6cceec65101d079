"""Online learning: a draft head that keeps training on the traffic it serves.

The parts, in the order data flows through them:

- :mod:`adaspec.online.buffer`: **labels** captured from every verify forward
  (the target's feature at each committed position, the token, the target's
  greedy choice) gathered into per-tenant documents and kept in a bounded
  buffer (recent FIFO plus a reservoir of older traffic, and a held-out share).
- :mod:`adaspec.online.trainer`: the **background trainer**, a separate process
  (one thread, lowest priority) that fine-tunes each tenant's copy of the
  static draft head on its buffer mixed with replay of broad data, and
  evaluates every candidate on held-out recent traffic.
- :mod:`adaspec.online.versions`: **safe publication**: each accepted
  candidate becomes a numbered version file (write, fsync, rename), with an
  atomically replaced ``current.json`` per tenant; a crash at any point leaves
  the last good version.
- :mod:`adaspec.online.learned`: the **learned-head speculator** the
  controller drafts with: it captures labels, hot-swaps to a published version
  between steps (a request keeps the version it started with) and rolls back
  when live acceptance drops.
"""
