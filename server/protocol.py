"""Request bodies (OpenAI / vLLM shapes). Unknown fields are ignored, like OpenAI-compatible servers do;
every validation failure becomes a 400 with `param` (see app.py)."""
from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

from common.errors import InvalidRequestError
from engine.sampling_params import SamplingParams

Int64 = Annotated[StrictInt, Field(ge=-(2 ** 63), le=2 ** 63 - 1)]
Int32 = Annotated[StrictInt, Field(ge=-(2 ** 31), le=2 ** 31 - 1)]    # fits the engine's tensors
TokenId = Annotated[StrictInt, Field(ge=0, le=2 ** 31 - 1)]


_SURROGATE = re.compile("[\ud800-\udfff]")
_PLAIN = frozenset((int, float, bool, type(None)))


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data):
        reject_lone_surrogates(data)
        return data


def reject_lone_surrogates(data) -> None:
    """400 naming the field for any string of a request body that holds a lone UTF-16 surrogate
    (JSON "\\ud800"): Python parses it, but it is no Unicode text, and the tokenizer, the database and
    the JSON answer would all fail on it later. Runs before the fields are validated, on every body."""
    stack = [(data, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if not value.isascii() and _SURROGATE.search(value):
                param = ".".join(map(str, path)).encode("utf-8", "backslashreplace").decode() or None
                raise InvalidRequestError(
                    f"{param or 'the body'}: the string holds a lone UTF-16 surrogate (such as \\ud800), "
                    "which is not valid Unicode", param=param, code="invalid_unicode")
        elif isinstance(value, dict):
            stack.extend((v, (*path, k)) for k, v in value.items() if type(v) not in _PLAIN)
        elif isinstance(value, list) and not _PLAIN.issuperset(map(type, value)):   # not a token list
            stack.extend((v, (*path, i)) for i, v in enumerate(value) if type(v) not in _PLAIN)


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


def chat_messages(messages: list[ChatMessage]) -> list[dict]:
    """Template input: plain-string contents; 'developer' is OpenAI's new name for 'system'."""
    role = {"developer": "system"}
    return [{"role": role.get(m.role, m.role), "content": m.text()} for m in messages]


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _SamplingBody(_Body):
    """Fields shared by chat and completions (OpenAI names plus vLLM extras)."""
    model: StrictStr | None = None
    n: Int32 = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    max_tokens: Int32 | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: Int64 | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: StrictStr | None = None
    top_k: Int32 | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: StrictBool = False
    stop_token_ids: list[TokenId] | None = None
    capture: StrictBool | None = None      # Alchemist: record activations for training (None: server policy)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        if isinstance(self.stop, str):
            stop = [self.stop]
        else:
            stop = list(self.stop or [])
        def pick(value, default):
            return default if value is None else value
        return SamplingParams(
            n=self.n, max_tokens=max_tokens, temperature=pick(self.temperature, 1.0),
            top_p=pick(self.top_p, 1.0), top_k=pick(self.top_k, 0), min_p=pick(self.min_p, 0.0),
            seed=self.seed, presence_penalty=pick(self.presence_penalty, 0.0),
            frequency_penalty=pick(self.frequency_penalty, 0.0),
            repetition_penalty=pick(self.repetition_penalty, 1.0), stop=stop,
            stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
            logprobs=logprobs, capture=self.capture)


class ChatCompletionRequest(_SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int32 | None = None
    logprobs: StrictBool = False
    top_logprobs: Int32 | None = None

    def sampling_params(self) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None)

    def chat_messages(self) -> list[dict]:
        return chat_messages(self.messages)


class CompletionRequest(_SamplingBody):
    prompt: StrictStr | list[StrictStr] | list[TokenId] | list[list[TokenId]]
    max_tokens: Int32 | None = 16                 # OpenAI's default for completions
    logprobs: Int32 | None = None                 # number of top logprobs per token
    echo: StrictBool = False

    def sampling_params(self) -> SamplingParams:
        if self.echo:
            raise InvalidRequestError("echo is not supported", param="echo")
        return self._params(self.max_tokens, self.logprobs)

    def prompt_list(self) -> list[str | list[int]]:
        """One entry per prompt: a string or a token id list."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        if isinstance(p[0], int):
            return [list(p)]
        if len(p) > 64:
            raise InvalidRequestError("at most 64 prompts per request", param="prompt")
        return list(p)


class TokenizeRequest(_Body):
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: StrictBool | None = None          # prompts only (default true)
    add_generation_prompt: StrictBool = True


class DetokenizeRequest(_Body):
    model: StrictStr | None = None
    tokens: list[TokenId]


class FeedbackRequest(_Body):
    id: StrictStr
    choice_index: StrictInt = 0
    rating: StrictInt | None = None
    stars: StrictInt | None = None
    # a programmatic grader's score: exactly one of rating, stars, reward (strict: no booleans, no strings)
    reward: Annotated[float, Field(ge=-1, le=1, allow_inf_nan=False, strict=True)] | None = None
    comment: StrictStr | None = None
    better_response: StrictStr | None = None
    replace: StrictBool = False
