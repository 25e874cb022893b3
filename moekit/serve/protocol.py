"""The OpenAI request bodies the server accepts, checked field by field: every field is honoured or refused with 400,
never silently ignored (MoE-Infinity's server drops max_tokens, stop, n, seed and stream without a word; vLLM accepts
unknown fields and only logs them). OpenAI fields moekit does not implement are accepted only at their neutral value
(presence_penalty 0, echo false, ...), so a client sending its defaults works and one relying on them is told.

Errors use OpenAI's body `{"error": {"message", "type", "param", "code"}}` with the status that says what went wrong.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moekit.runtime.sampling import MAX_TOP_LOGPROBS

MAX_N = 16  # choices per request (each is a sequence in the batch)
MAX_STOP = 16  # stop strings per request
MAX_STOP_CHARS = 256
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_ROUTING_CHARS = 4096  # a per-request routing spec


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code if self.code is not None else self.status}}


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class StreamOptions(_Body):
    include_usage: bool = False


def _neutral(name: str, value, neutral: tuple) -> None:
    if value not in neutral:
        raise ValueError(f"{name}={value!r} is not supported by moekit serve (only {' or '.join(map(repr, neutral))})")


class _Sampling(_Body):
    """Fields common to both routes."""

    model: str | None = None  # None: the served model
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**64)] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # an end-user id for the caller's own logs: no effect on generation, not stored
    # moekit's extension: this request's routing policy (docs/routing.md grammar; "stock": the model's own routing;
    # left out: the server's --routing). Policies that read files or calibrate are refused (routing.parse_request).
    routing: Annotated[str, Field(min_length=1, max_length=MAX_ROUTING_CHARS)] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop string is at most {MAX_STOP_CHARS} characters")
        return stops

    @model_validator(mode="after")
    def _common(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        for name in ("presence_penalty", "frequency_penalty"):
            _neutral(name, getattr(self, name), (None, 0, 0.0))
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by moekit serve (only {} or null)")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # OpenAI's default for completions
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _unsupported(self):
        _neutral("echo", self.echo, (False,))
        _neutral("suffix", self.suffix, (None,))
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported by moekit serve")
        prompts = self.prompts()
        if not prompts or len(prompts) > MAX_PROMPTS:
            raise ValueError(f"prompt must hold 1 to {MAX_PROMPTS} prompts")
        if any(isinstance(p, list) and not p for p in prompts):
            raise ValueError("a token-id prompt is empty")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [p]
        return list(p)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ResponseFormat(_Body):
    type: Literal["text"]


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None  # None: up to the context length
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _unsupported(self):
        if self.tools:
            raise ValueError("tools are not supported by moekit serve")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree")
        return self

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def top(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


def parse(cls: type[BaseModel], data) -> BaseModel:
    """Validate a decoded JSON body; the first problem becomes a 400 naming its field."""
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            msg = f"unknown field {loc!r}: moekit serve does not support it"
        elif first["type"] == "missing":
            msg = f"{loc} is required"
        elif loc:
            msg = f"{loc}: {msg}"
        raise bad_request(msg, param=str(first["loc"][0]) if first["loc"] else None) from None
