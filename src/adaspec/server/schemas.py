"""Request bodies of the OpenAI-compatible API, and OpenAI-style error objects.

Every request model forbids unknown fields. OpenAI parameters that adaspec
does not implement are declared (so they show in the OpenAPI schema and can be
named in the error) and accepted only at their no-op value; anything else is
a 400 that names them (:meth:`_RequestBase.unsupported`). Nothing is silently
ignored except ``user``, which is only an end-user id.

Error object (as OpenAI sends it)::

    {"error": {"message": str, "type": str, "param": str | None, "code": str | None}}
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# OpenAI caps; adaspec's engine allows up to 20 top logprobs.
MAX_TOP_LOGPROBS = 20
MAX_STOP_SEQUENCES = 16
SEED_MIN = -(2**63)  # torch.Generator.manual_seed accepts [-2**63, 2**64 - 1]
SEED_MAX = 2**64 - 1


class ApiError(Exception):
    """An error the API reports to the client as an OpenAI error object.

    Args:
        status: HTTP status (4xx for the client's mistakes).
        message: what was wrong, naming the parameter.
        type: OpenAI error type, e.g. "invalid_request_error".
        param: the offending parameter (dotted path), if any.
        code: a short machine-readable code, e.g. "model_not_found".
        headers: extra response headers (e.g. Retry-After).
    """

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON error object."""
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
    # strict: "5" is not an int and true is not a number, as in OpenAI's API.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    """``stream_options``: ``include_usage`` adds a final chunk with usage and no choices."""

    include_usage: bool = False


class ContentPart(_Strict):
    """One part of a message's content; only text parts are supported."""

    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    """The function of a tool call: its name and its arguments as a JSON string."""

    name: str
    arguments: str


class ToolCall(_Strict):
    """An assistant message's tool call (as the server returned it)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


FUNCTION_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"


class FunctionDefinition(_Strict):
    """A tool's function: ``parameters`` is a JSON schema (an object schema; none: no arguments)."""

    name: str = Field(..., pattern=FUNCTION_NAME_PATTERN)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(_Strict):
    """One entry of ``tools``."""

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    """``tool_choice`` naming one function: the output is a call of it."""

    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Strict):
    """``response_format.json_schema``: the output validates against ``schema`` (``strict`` always holds)."""

    name: str = Field(..., pattern=FUNCTION_NAME_PATTERN)
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, populate_by_name=True)


class ResponseFormat(_Strict):
    """``response_format``: ``text``, ``json_object`` (any JSON object) or ``json_schema``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class ChatMessage(_Strict):
    """One chat message. ``developer`` is treated as ``system``.

    ``assistant`` messages may carry ``tool_calls`` (content then optional);
    ``tool`` messages carry a tool's result and the ``tool_call_id`` it answers.
    """

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[ContentPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[str] = None

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


# name -> (the only accepted values, reason shown in the 400). Values compare with ==.
_Table = dict[str, tuple[tuple[Any, ...], str]]
_UNSUPPORTED_COMMON: _Table = {
    "repetition_penalty": ((None, 1, 1.0), "repetition_penalty is not supported (presence_penalty and "
                           "frequency_penalty are)"),
    "min_tokens": ((None, 0), "min_tokens is not supported"),
    "service_tier": ((None, "auto", "default"), "service tiers are not supported"),
    "metadata": ((None, {}), "metadata is not supported"),
    "store": ((None, False), "stored completions are not supported"),
}
_UNSUPPORTED_COMPLETION: _Table = {
    "best_of": ((None, 1), "only best_of=1 is supported"),
    "echo": ((None, False), "echo is not supported"),
    "suffix": ((None, ""), "suffix (insertion) is not supported"),
}
_UNSUPPORTED_CHAT: _Table = {
    "functions": ((None, []), "the deprecated functions parameter is not supported; send tools"),
    "function_call": ((None, "none"), "the deprecated function_call parameter is not supported; send tool_choice"),
    "modalities": ((None, ["text"]), "only text output is supported"),
    "audio": ((None,), "audio output is not supported"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "reasoning_effort": ((None,), "reasoning_effort is not supported"),
    "web_search_options": ((None,), "web search is not supported"),
}


class AdaspecOptions(_Strict):
    """The ``adaspec`` extension object of a request body.

    ``learn``: false keeps the request out of learned state (the speculators
    store none of its prompt or output; it still gets drafts). Default true.
    """

    learn: bool = True


class _RequestBase(_Strict):
    """Fields shared by both endpoints.

    ``top_k`` (-1 or 0: off), ``ignore_eos`` and ``stop_token_ids`` are the
    usual vLLM-style extensions; ``adaspec`` holds this server's own options
    (:class:`AdaspecOptions`). ``max_tokens`` at most the context window.
    ``temperature`` defaults to 1.0 as in OpenAI's API; below 1e-5 it decodes
    greedily. ``presence_penalty`` / ``frequency_penalty`` (OpenAI's, over the
    output tokens), ``logit_bias`` (token id strings to -100..100) and
    ``min_p`` (vLLM's) change the target's distribution exactly as plain
    decoding would, under speculation too.
    """

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    seed: Optional[int] = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: Optional[Union[str, list[str]]] = Field(None)
    stop_token_ids: Optional[list[int]] = Field(None, max_length=64)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    adaspec: Optional[AdaspecOptions] = None
    # Known OpenAI parameters accepted only at their no-op value (see unsupported()).
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]]] = None
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    # Choices per request, 1..MAX_N (checked by the server: see app._num_choices).
    n: Optional[Any] = None
    # Known OpenAI parameters accepted only at their no-op value (see unsupported()).
    repetition_penalty: Optional[Any] = None
    min_tokens: Optional[Any] = None
    service_tier: Optional[Any] = None
    metadata: Optional[Any] = None
    store: Optional[Any] = None

    unsupported_table: ClassVar[_Table] = _UNSUPPORTED_COMMON

    def unsupported(self) -> list[tuple[str, str]]:
        """``(param, reason)`` for every unsupported parameter set to a non-default value."""
        out = []
        for name, (allowed, reason) in self.unsupported_table.items():
            value = getattr(self, name)
            if not any(_same(value, a) for a in allowed):
                out.append((name, f"{name}={_short(value)}: {reason}"))
        return out

    def stop_list(self) -> list[str]:
        """``stop`` as a list (OpenAI accepts one string or a list)."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_RequestBase):
    """``POST /v1/completions``. ``max_tokens`` defaults to 16, as in OpenAI's API.

    ``prompt``: a string, a list of token ids, or a one-element list of either
    (batches of prompts are not supported: a longer list is a 400). ``logprobs``: 0..20 top
    alternatives per token.
    """

    prompt: Union[str, list[int], Annotated[list[str], Field(min_length=1, max_length=1)],
                  Annotated[list[list[int]], Field(min_length=1, max_length=1)]]
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: Optional[Any] = None
    echo: Optional[Any] = None
    suffix: Optional[Any] = None

    unsupported_table: ClassVar[_Table] = {**_UNSUPPORTED_COMMON, **_UNSUPPORTED_COMPLETION}


class ChatCompletionRequest(_RequestBase):
    """``POST /v1/chat/completions``; the messages go through the model's chat template.

    ``max_tokens`` (or its newer name ``max_completion_tokens``) defaults to
    the rest of the context window. ``logprobs: true`` returns each token's
    logprob with ``top_logprobs`` (0..20) alternatives.
    """

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Optional[list[Tool]] = Field(None, max_length=128)
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[ResponseFormat] = None
    functions: Optional[Any] = None
    function_call: Optional[Any] = None
    modalities: Optional[Any] = None
    audio: Optional[Any] = None
    prediction: Optional[Any] = None
    reasoning_effort: Optional[Any] = None
    web_search_options: Optional[Any] = None

    unsupported_table: ClassVar[_Table] = {**_UNSUPPORTED_COMMON, **_UNSUPPORTED_CHAT}


def _same(value: Any, allowed: Any) -> bool:
    # bool is an int in Python: keep `n: true` from passing as n=1.
    if isinstance(value, bool) != isinstance(allowed, bool):
        return False
    return value == allowed


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Union member names pydantic puts in error locations ("str", "list[int]", ...).
_TYPE_LOC_PARTS = {"str", "int", "float", "bool", "list", "dict", "none", "ContentPart", "StreamOptions",
                   "NamedToolChoice"}


def param_path(loc: tuple) -> Optional[str]:
    """OpenAI-style parameter path (``messages[0].content``) from a pydantic error location."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and ("[" in part or "-" in part or part in _TYPE_LOC_PARTS):
            break  # a union member or function-validator tag, not a field
        else:
            out += f".{part}" if out else str(part)
    return out or None


def validation_error_to_api(err: ValidationError) -> ApiError:
    """The first pydantic error as a 400 naming its parameter."""
    errors = err.errors(include_url=False)
    # In a union, "wrong type" errors from the members that do not apply hide the real
    # problem (e.g. a list that is too long): prefer any other kind.
    first = next((e for e in errors if not str(e.get("type", "")).endswith("_type")), errors[0])
    param = param_path(tuple(first.get("loc", ())))
    kind = first.get("type", "")
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
        code = "unknown_parameter"
    elif kind == "missing":
        message = f"Missing required parameter: '{param}'"
        code = "missing_required_parameter"
    else:
        message = f"Invalid value for '{param}': {msg}" if param else f"Invalid request body: {msg}"
        code = "invalid_value"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return ApiError(400, message, param=param, code=code)
