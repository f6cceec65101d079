"""Per-request logits constraints: a grammar, logit bias, penalties; and free drafts from the grammar.

Pure torch plus the grammar engine (llguidance, the Rust "Low-level Guidance"
library: https://github.com/guidance-ai/llguidance; why this engine:
BENCHMARKS.md, "Agent traffic"). No model imports: the engine hands in logits
and token ids.

Plain constrained decoding turns the target's raw logits ``z`` at each output
position into ``z' = mask_G(z + bias - presence * [c > 0] - frequency * c)``,
where ``c[v]`` counts token v among the output tokens generated before the
position (vLLM's and OpenAI's convention: prompt tokens are not counted), the
mask sets to ``-inf`` every token the grammar G forbids after those output
tokens, and then samples with temperature, ``min_p``, top-k, top-p
(:func:`adaspec.sampling.process_logits`) or takes the argmax. Speculation keeps
that exactly: :meth:`RequestConstraint.adjust_logits` builds ``z'`` for verified
row i from the committed output plus drafts ``0..i-1`` (the tokens that precede
row i if those drafts are accepted; a row after a rejection is never used).

The grammar also drafts (as vLLM masks each draft position, and as
"jump-forward" decoding in SGLang uses forced strings): drafts are cut at the
first token the grammar forbids before they are verified, and the tokens the
grammar forces (llguidance's fast-forward tokens: the canonical tokenization of
the only bytes the grammar allows next, e.g. a JSON key or closing braces) are
proposed without any drafting cost.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

# The JSON layout the grammar enforces (OpenAI's strict structured output uses
# the same compact separators). A fixed layout means whitespace is forced, so
# more tokens are free drafts.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ",
               "coerce_one_of": True}

_TOKENIZERS: dict[tuple[int, int], Any] = {}
_TOKENIZERS_LOCK = threading.Lock()


def _llg():
    import llguidance  # noqa: PLC0415 - imported on first use (load time of the runtime)

    return llguidance


def grammar_tokenizer(tokenizer: Any, vocab_size: int) -> Any:
    """The llguidance tokenizer for a Hugging Face tokenizer (built once, ~1 s, then cached).

    Args:
        tokenizer: a transformers (fast) tokenizer.
        vocab_size: the width of the model's logits (may exceed ``len(tokenizer)``).
    """
    key = (id(tokenizer), int(vocab_size))
    with _TOKENIZERS_LOCK:
        if key not in _TOKENIZERS:
            import llguidance.hf  # noqa: PLC0415

            from adaspec.model.tokenizer import hf_tokenizer

            _TOKENIZERS[key] = llguidance.hf.from_tokenizer(hf_tokenizer(tokenizer), n_vocab=int(vocab_size))
        return _TOKENIZERS[key]


def _with_layout(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "x-guidance": {**JSON_LAYOUT, **schema.get("x-guidance", {})}}


def json_schema_grammar(schema: Any) -> str:
    """An llguidance grammar for JSON that validates against ``schema`` (a dict).

    Raises:
        ValueError: ``schema`` is not a JSON object (dict) or is not JSON-serialisable.
    """
    if not isinstance(schema, dict):
        raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        text = json.dumps(_with_layout(schema))
    except (TypeError, ValueError) as e:
        raise ValueError(f"the JSON schema is not serialisable: {e}") from None
    return _llg().LLMatcher.grammar_from_json_schema(text)


def json_object_grammar() -> str:
    """Any JSON object (OpenAI's ``response_format: {"type": "json_object"}``)."""
    return json_schema_grammar({"type": "object"})


TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"


def tool_call_schema(name: str, parameters: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The JSON schema of one call: ``{"name": name, "arguments": <parameters>}``."""
    params = parameters if parameters else {"type": "object"}
    return {"type": "object", "properties": {"name": {"const": name}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}


def tool_tag_terminals(tokenizer: Any) -> tuple[Optional[str], Optional[str]]:
    """Lark terminals for the call tags where the tokenizer has one token for each (Qwen2.5: ``<[151657]>``).

    llguidance reads an added token as opaque, not as its text, so a tag that is
    one token must be written as that token in the grammar; ``(None, None)``
    (the tags as text) for tokenizers that spell them (SmolLM2).
    """
    out = []
    unk = getattr(tokenizer, "unk_token_id", None)
    added = {int(i) for i in (getattr(tokenizer, "added_tokens_decoder", {}) or {})}
    for tag in (TOOL_CALL_OPEN, TOOL_CALL_CLOSE):
        try:
            tid = tokenizer.convert_tokens_to_ids(tag)
        except Exception:  # a tokenizer without the lookup
            tid = None
        out.append(f"<[{int(tid)}]>" if isinstance(tid, int) and tid != unk and tid in added else None)
    return (out[0], out[1]) if all(out) else (None, None)


def tool_calls_grammar(functions: Sequence[tuple[str, Optional[dict[str, Any]]]], parallel: bool = True,
                       tags: tuple[Optional[str], Optional[str]] = (None, None)) -> str:
    """A Lark grammar (llguidance dialect) for one or more tool calls in the Hermes/Qwen form.

    Each call is ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``
    whose arguments follow that function's ``parameters`` schema; calls are
    separated by a newline; with ``parallel`` False exactly one call.

    Args:
        functions: ``(name, parameters schema or None)`` for every function
            the output may call (one for a named ``tool_choice``).
        tags: :func:`tool_tag_terminals` of the tokenizer (default: the tags as text).

    Raises:
        ValueError: no functions, or a schema that is not JSON-serialisable.
    """
    if not functions:
        raise ValueError("tool_calls_grammar needs at least one function")
    rules = []
    for i, (name, params) in enumerate(functions):
        try:
            schema = json.dumps(_with_layout(tool_call_schema(name, params)))
        except (TypeError, ValueError) as e:
            raise ValueError(f"the parameters of function {name!r} are not serialisable: {e}") from None
        rules.append(f"f{i}: %json {schema}")
    alts = " | ".join(f"f{i}" for i in range(len(functions)))
    open_, close = tags
    if open_ and close:  # the tags as single tokens (tool_tag_terminals)
        call = f'call: {open_} "\\n" ({alts}) "\\n" {close}'
    else:
        call = f'call: "{TOOL_CALL_OPEN}\\n" ({alts}) "\\n{TOOL_CALL_CLOSE}"'
    start = 'start: call ("\\n" call)*' if parallel else "start: call"
    return "\n".join([start, call, *rules])


def check_grammar(grammar: str, tokenizer: Any, vocab_size: int) -> None:
    """Compile ``grammar`` for this tokenizer.

    Raises:
        ValueError: the grammar (or the schema it came from) is invalid; the
            message is the grammar engine's.
    """
    m = _llg().LLMatcher(grammar_tokenizer(tokenizer, vocab_size), grammar)
    if m.is_error():
        raise ValueError(m.get_error())
    # The first mask and the tokens forced from the start: a grammar that compiles yet forces an
    # endless output (a schema that requires itself) fails here, not in the middle of a batched step.
    m.compute_logit_bias()
    forced = m.compute_ff_tokens()
    if forced and not m.is_error():
        m.consume_tokens(forced)
    if m.is_error():
        raise ValueError(f"the grammar cannot produce a complete output: {m.get_error()}")


_NEG_INF = torch.tensor(float("-inf"))


@dataclass
class _Split:
    """How the engine's last proposal was built (for the controller and exact sampling)."""

    num_forced_before: int = 0  # grammar-forced drafts before the speculator's
    num_speculated: int = 0  # the speculator's drafts kept (after the cut)
    cut_probs: Optional[torch.Tensor] = None  # [V]: draft distribution of a sampled draft cut by the grammar


class RequestConstraint:
    """One request's logits constraint: grammar mask, logit bias, presence and frequency penalties.

    Args:
        grammar: an llguidance grammar (:func:`json_schema_grammar`,
            :func:`tool_calls_grammar`, ...) or None.
        tokenizer / vocab_size: the target's tokenizer and logits width V.
        eos_token_ids: the tokens that end the request; each is allowed where
            the grammar allows its own end-of-sequence token.
        logit_bias: ``{token_id: bias}`` added to the raw logits.
        presence_penalty / frequency_penalty: OpenAI's penalties on output tokens.

    Raises:
        ValueError: an invalid grammar, or a logit_bias token outside 0..V-1.
    """

    def __init__(self, grammar: Optional[str], tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int],
                 logit_bias: Optional[dict[int, float]] = None, presence_penalty: float = 0.0,
                 frequency_penalty: float = 0.0) -> None:
        self.vocab_size = int(vocab_size)
        self.matcher = None
        if grammar is not None:
            self._llg = _llg()
            self.matcher = self._llg.LLMatcher(grammar_tokenizer(tokenizer, vocab_size), grammar)
            if self.matcher.is_error():
                raise ValueError(self.matcher.get_error())
            self.grammar_eos = int(grammar_tokenizer(tokenizer, vocab_size).eos_token)
            self.eos_token_ids = sorted({int(t) for t in eos_token_ids} - {self.grammar_eos})
            # Special and added tokens never spell grammar text: llguidance reads them as opaque
            # tokens, yet its byte mask can allow one whose text the grammar wants (Qwen2.5's added
            # "<tool_call>") while its matcher then refuses it.
            special = set(getattr(tokenizer, "all_special_ids", []) or [])
            special |= {int(i) for i in (getattr(tokenizer, "added_tokens_decoder", {}) or {})}
            special -= {self.grammar_eos, *self.eos_token_ids}
            special -= {int(i) for i in re.findall(r"<\[(\d+)\]>", grammar)}  # tokens the grammar names
            self.special_ids = torch.tensor(sorted(i for i in special if 0 <= i < self.vocab_size), dtype=torch.long)
        self.bias: Optional[torch.Tensor] = None
        if logit_bias:
            self.bias = torch.zeros(self.vocab_size)
            for tok, b in logit_bias.items():
                if not 0 <= int(tok) < self.vocab_size:
                    raise ValueError(f"logit_bias token {tok} is outside the vocabulary (0..{self.vocab_size - 1})")
                self.bias[int(tok)] = float(b)
        self.presence = float(presence_penalty)
        self.frequency = float(frequency_penalty)
        self.counts = torch.zeros(self.vocab_size) if (self.presence or self.frequency) else None
        self.split = _Split()
        self.mask_s = 0.0  # grammar time (masks, checks, forced tokens), seconds
        self.masks = 0  # masks computed
        self.engine_errors = 0  # rows where the grammar engine allowed no token (then only EOS is allowed)

    @property
    def has_grammar(self) -> bool:
        return self.matcher is not None

    # ------------------------------------------------------------ drafting
    def forced_tokens(self, max_tokens: int) -> list[int]:
        """Up to ``max_tokens`` tokens the grammar forces next (llguidance fast-forward tokens)."""
        if self.matcher is None or max_tokens <= 0 or self.matcher.is_stopped():
            return []
        t0 = time.perf_counter()
        out = list(self.matcher.compute_ff_tokens())[:max_tokens]
        # llguidance tokenizes the forced bytes with the model's tokenizer, which may map them
        # to a special token the grammar itself does not accept (Qwen2.5's "<tool_call>"):
        # keep only what the grammar validates, so a forced draft is always legal.
        if out:
            out = out[:int(self.matcher.validate_tokens(out))]
        self.mask_s += time.perf_counter() - t0
        return out

    def legal_prefix(self, token_ids: Sequence[int]) -> int:
        """How many leading ``token_ids`` the grammar allows after the committed output."""
        if self.matcher is None or not token_ids:
            return len(token_ids)
        t0 = time.perf_counter()
        n = int(self.matcher.validate_tokens(self._grammar_ids(token_ids)))
        self.mask_s += time.perf_counter() - t0
        return n

    def forced_after(self, token_ids: Sequence[int], max_tokens: int) -> list[int]:
        """Forced tokens after the committed output plus the (legal) ``token_ids``."""
        if self.matcher is None or max_tokens <= 0:
            return []
        if not token_ids:
            return self.forced_tokens(max_tokens)
        ids = self._grammar_ids(token_ids)
        if self.grammar_eos in ids:  # nothing follows the end of the grammar
            return []
        if int(self.matcher.validate_tokens(ids)) < len(ids):  # never consume what would break the matcher
            return []
        if not self.matcher.consume_tokens(ids):
            raise ValueError("forced_after: token_ids are not legal under the grammar")
        try:
            return self.forced_tokens(max_tokens)
        finally:
            self.matcher.rollback(len(token_ids))

    def _grammar_ids(self, token_ids: Sequence[int]) -> list[int]:
        """Token ids with every EOS the engine stops on mapped to the grammar's own EOS."""
        eos = set(self.eos_token_ids)
        return [self.grammar_eos if int(t) in eos else int(t) for t in token_ids]

    # ------------------------------------------------------------ verification
    def adjust_logits(self, logits: torch.Tensor, draft_token_ids: Sequence[int]) -> torch.Tensor:
        """The constrained logits of every verified row.

        Args:
            logits: ``[n + 1, V]`` raw target logits; row i follows drafts ``0..i-1``.
            draft_token_ids: the n drafts (each legal: :meth:`legal_prefix`).

        Returns:
            ``[n + 1, V]`` float32: bias, penalties (counts of the output so far
            plus drafts ``0..i-1``), and ``-inf`` where the grammar forbids.
        """
        n = len(draft_token_ids)
        if logits.shape[0] != n + 1:
            raise ValueError(f"logits has {logits.shape[0]} rows, expected {n + 1}")
        z = logits.float().clone()
        if self.bias is not None:
            z += self.bias
        if self.counts is not None:
            counts = self.counts.unsqueeze(0).repeat(n + 1, 1)  # [n+1, V]
            for i, t in enumerate(draft_token_ids):
                counts[i + 1 :, int(t)] += 1.0
            z -= self.frequency * counts + self.presence * (counts > 0).float()
        if self.matcher is not None:
            z = self._mask(z, draft_token_ids)
        return z

    def _mask(self, z: torch.Tensor, draft_token_ids: Sequence[int]) -> torch.Tensor:
        # llguidance's one-byte-per-token mask (0 or 200), not its bitmask: the torch kernel that
        # applies a bitmask is torch.compile'd, which recompiles for every new row count.
        t0 = time.perf_counter()
        n = len(draft_token_ids)
        ids = self._grammar_ids(draft_token_ids)
        rows: list[bytes] = []
        consumed = 0
        for i in range(n + 1):
            rows.append(self.matcher.compute_logit_bias())  # V bytes
            if i == n:
                break
            if ids[i] == self.grammar_eos:
                # The request ends at an accepted EOS, so later rows are never used;
                # an EOS is not consumed (llguidance's rollback does not count it).
                rows.extend([rows[-1]] * (n - i))
                break
            if not self.matcher.consume_token(ids[i]):
                raise ValueError(f"draft token {draft_token_ids[i]} at position {i} is not legal under the grammar")
            consumed += 1
        self.matcher.rollback(consumed)
        # (measured: uint8 -> bool and torch.where are several times faster here than == 0 and masked_fill_)
        allowed = torch.stack([torch.frombuffer(bytearray(r), dtype=torch.uint8) for r in rows]).bool()  # [n+1, V]
        if self.special_ids.numel():
            allowed[:, self.special_ids[self.special_ids < allowed.shape[1]]] = False
        dead = ~allowed.any(dim=1)  # [n+1]: the grammar engine allows nothing (it hit an internal limit)
        if bool(dead.any()):
            # End the request rather than sample from an all -inf row (NaN); the output is cut short.
            allowed[dead, self.grammar_eos] = True
            self.engine_errors += 1
        if self.eos_token_ids:  # every EOS the engine stops on is as legal as the grammar's own
            allowed[:, self.eos_token_ids] = allowed[:, self.grammar_eos : self.grammar_eos + 1].clone()
        out = torch.where(allowed[:, : z.shape[1]], z, _NEG_INF)
        self.mask_s += time.perf_counter() - t0
        self.masks += n + 1
        return out

    # ------------------------------------------------------------ commit
    def commit(self, token_ids: Sequence[int]) -> None:
        """Advance past committed output tokens (an end-of-sequence token ends the grammar).

        Raises:
            ValueError: a committed token the grammar forbids (cannot happen
                when every committed token came from :meth:`adjust_logits` rows).
        """
        for t in token_ids:
            t = int(t)
            if self.counts is not None:
                self.counts[t] += 1.0
            if self.matcher is not None and not self.matcher.is_stopped():
                if t in self.eos_token_ids or t == self.grammar_eos:
                    continue  # the request ends here (stop conditions): the grammar needs no EOS
                if not self.matcher.consume_token(t):
                    raise ValueError(f"committed token {t} is not legal under the grammar: "
                                     f"{self.matcher.get_error()}")
