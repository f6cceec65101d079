"""A tokenizer read straight from ``tokenizer.json``, without importing transformers.

Importing transformers' tokenizer machinery and building an ``AutoTokenizer``
is most of what a start-up spends outside the forward. For a model folder whose
tokenizer is the generic one (``tokenizer_class`` ``TokenizersBackend`` or
``PreTrainedTokenizerFast``: transformers takes ``tokenizer.json`` as it is),
:class:`FastTokenizer` does what the engine needs itself, the same way
transformers 5 does it:

- ``encode`` / ``__call__``: the Rust ``tokenizers.Tokenizer`` with the same
  ``add_special_tokens``;
- ``decode``: the same Rust decode; ``clean_up_tokenization_spaces`` as
  transformers (which skips the clean-up for BPE models);
- ``apply_chat_template`` for a plain conversation (a list of message dicts;
  no tools, documents or other template options): the chat template rendered in
  the same sandboxed Jinja environment (``trim_blocks``, ``lstrip_blocks``, loop
  controls, ``tojson`` without HTML escaping, ``raise_exception``,
  ``strftime_now``) with the special tokens as variables, None-valued message
  keys dropped and reasoning fields aliased, as
  ``transformers.utils.chat_template_utils.render_jinja_template``.

Anything else (``get_vocab``, tools in a chat template, llguidance's tokenizer
wrapper ...) goes to the transformers tokenizer, loaded on first use
(:attr:`FastTokenizer.hf_tokenizer`). ``tests/test_fast_load.py`` checks every
method against ``AutoTokenizer`` on the default model.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Sequence

#: tokenizer classes whose transformers tokenizer is ``tokenizer.json`` as it is
GENERIC_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
#: tokenizer_config.json keys this class reads or that change nothing it does
_KNOWN_KEYS = {
    "backend", "bos_token", "eos_token", "pad_token", "unk_token", "is_local", "local_files_only",
    "model_max_length", "tokenizer_class", "clean_up_tokenization_spaces", "chat_template", "errors",
    "added_tokens_decoder", "extra_special_tokens", "padding_side", "truncation_side", "model_input_names",
    "split_special_tokens", "add_prefix_space",
}
_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def unsupported_reason(folder: str | Path) -> Optional[str]:
    """Why :class:`FastTokenizer` does not stand in for ``AutoTokenizer`` on ``folder`` (None if it does)."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        return "no tokenizer.json"
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"tokenizer_config.json unreadable ({type(exc).__name__})"
    cls = config.get("tokenizer_class")
    if cls not in GENERIC_CLASSES:
        return f"tokenizer_class {cls!r} is not one of {GENERIC_CLASSES}"
    unknown = sorted(set(config) - _KNOWN_KEYS)
    if unknown:
        return f"tokenizer_config.json sets {unknown}"
    if config.get("split_special_tokens") or config.get("add_prefix_space") is not None:
        return "split_special_tokens / add_prefix_space set"
    if (folder / "special_tokens_map.json").exists():
        return "special_tokens_map.json present"
    return None


def _token_text(value: Any) -> Optional[str]:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class FastTokenizer:
    """The subset of a transformers fast tokenizer the engine uses, from ``tokenizer.json``.

    Args:
        folder: a model folder with ``tokenizer.json`` and ``tokenizer_config.json``
            (and optionally ``chat_template.jinja``).

    Raises:
        ValueError: :func:`unsupported_reason` is not None for ``folder``.
    """

    def __init__(self, folder: str | Path) -> None:
        from tokenizers import Tokenizer

        folder = Path(folder)
        reason = unsupported_reason(folder)
        if reason:
            raise ValueError(f"fast tokenizer: {reason}")
        self.folder = folder
        self.name_or_path = str(folder)
        self._config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        self.backend_tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._hf: Any = None
        self._template = None
        template_file = folder / "chat_template.jinja"
        self.chat_template: Optional[str] = (template_file.read_text(encoding="utf-8") if template_file.is_file()
                                             else self._config.get("chat_template"))
        self.clean_up_tokenization_spaces = bool(self._config.get("clean_up_tokenization_spaces", False))
        self.special_tokens_map: dict[str, str] = {}
        for name in _SPECIAL:
            text = _token_text(self._config.get(name))
            if text is not None:
                self.special_tokens_map[name] = text

    # ------------------------------------------------------------------ special tokens
    def _special_id(self, name: str) -> Optional[int]:
        text = self.special_tokens_map.get(name)
        return None if text is None else self.backend_tokenizer.token_to_id(text)

    @property
    def bos_token_id(self) -> Optional[int]:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> Optional[int]:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> Optional[int]:
        return self._special_id("pad_token")

    @property
    def unk_token_id(self) -> Optional[int]:
        return self._special_id("unk_token")

    @property
    def bos_token(self) -> Optional[str]:
        return self.special_tokens_map.get("bos_token")

    @property
    def eos_token(self) -> Optional[str]:
        return self.special_tokens_map.get("eos_token")

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    # ------------------------------------------------------------------ text <-> ids
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (``list[int]``)."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return list(self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        """``{"input_ids": [...], "attention_mask": [...]}`` for one text."""
        ids = self.encode(text, add_special_tokens=add_special_tokens)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def decode(self, token_ids: Sequence[int] | int, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: Optional[bool] = None) -> str:
        """Text of ``token_ids``. ``clean_up_tokenization_spaces`` is, as in transformers,
        not applied to BPE models; for others it applies transformers' replacements."""
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        text = self.backend_tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        if clean and type(self.backend_tokenizer.model).__name__ != "BPE":
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> Any:
        """Vocabulary strings of ``ids`` (one string for an int)."""
        if isinstance(ids, int):
            return self.backend_tokenizer.id_to_token(ids)
        return [self.backend_tokenizer.id_to_token(int(i)) for i in ids]

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> Any:
        """Ids of vocabulary strings (the unknown token's id where one is missing)."""
        if isinstance(tokens, str):
            tid = self.backend_tokenizer.token_to_id(tokens)
            return self.unk_token_id if tid is None else tid
        return [self.convert_tokens_to_ids(t) for t in tokens]

    # ------------------------------------------------------------------ chat template
    def _compiled_template(self):
        if self._template is None:
            import jinja2
            import jinja2.ext
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise jinja2.exceptions.TemplateError(message)

            def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
                return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols])
            env.filters["tojson"] = tojson
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        return self._template

    def apply_chat_template(self, conversation: Any, tools: Any = None, add_generation_prompt: bool = False,
                            tokenize: bool = True, return_dict: bool = True, **kwargs: Any) -> Any:
        """As transformers' ``apply_chat_template`` for one plain conversation.

        Returns:
            the rendered text (``tokenize=False``), its token ids (``return_dict=False``)
            or ``{"input_ids", "attention_mask"}``.

        Raises:
            ValueError: no chat template, or an empty conversation.
        """
        plain = (tools is None and not kwargs and isinstance(conversation, (list, tuple)) and
                 all(type(m) is dict for m in conversation) and
                 all(type(v) in (str, int, float, bool, type(None)) for m in conversation for v in m.values()))
        if not plain:  # tools, documents, batches, content parts, template options: transformers' own
            return self.hf_tokenizer.apply_chat_template(conversation, tools=tools,
                                                         add_generation_prompt=add_generation_prompt,
                                                         tokenize=tokenize, return_dict=return_dict, **kwargs)
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        if len(conversation) == 0:
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        chat = []
        for m in conversation:
            m = {k: v for k, v in m.items() if v is not None}
            reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
            if reasoning is not None:
                m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
            chat.append(m)
        text = self._compiled_template().render(messages=chat, tools=None, documents=None,
                                                add_generation_prompt=add_generation_prompt,
                                                **self.special_tokens_map)
        if not tokenize:
            return text
        out = self(text, add_special_tokens=False)
        return out if return_dict else out["input_ids"]

    # ------------------------------------------------------------------ everything else
    @property
    def hf_tokenizer(self) -> Any:
        """The transformers tokenizer of the same folder (loaded on first use)."""
        if self._hf is None:
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(self.folder)
        return self._hf

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.hf_tokenizer, name)


def hf_tokenizer(tokenizer: Any) -> Any:
    """The transformers tokenizer behind ``tokenizer`` (itself unless it is a :class:`FastTokenizer`)."""
    return tokenizer.hf_tokenizer if isinstance(tokenizer, FastTokenizer) else tokenizer
