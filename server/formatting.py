"""OpenAI response and stream-chunk bodies for chat completions and (legacy) completions."""
from __future__ import annotations

import math

from engine.sequence import TokenLogprob
from server.serving import Choice, Generation
from server.tokens import TokenTexts

MIN_LOGPROB = -9999.0                     # JSON has no -inf


def _lp(value: float) -> float:
    value = float(value)
    return MIN_LOGPROB if math.isnan(value) or value < MIN_LOGPROB else value


# -- logprobs ------------------------------------------------------------------------
def chat_logprobs(tokens: TokenTexts, lps: list[TokenLogprob]) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        text, raw = tokens.info(token_id)
        return {"token": text, "logprob": _lp(logprob), "bytes": raw}
    content = []
    for lp in lps:
        item = entry(lp.token_id, lp.logprob)
        item["top_logprobs"] = [entry(t, v) for t, v in lp.top]
        content.append(item)
    return {"content": content}


def completion_logprobs(tokens: TokenTexts, lps: list[TokenLogprob], offset: int) -> dict:
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for lp in lps:
        text = tokens.info(lp.token_id)[0]
        out["tokens"].append(text)
        out["token_logprobs"].append(_lp(lp.logprob))
        out["top_logprobs"].append({tokens.info(t)[0]: _lp(v) for t, v in lp.top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


# -- chat ----------------------------------------------------------------------------
def _head(gen: Generation, obj: str) -> dict:
    return {"id": gen.response_id, "object": obj, "created": gen.created, "model": gen.state.model_name}


def chat_response(gen: Generation) -> dict:
    want = gen.params.logprobs is not None
    choices = [{"index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": chat_logprobs(gen.state.tokens, c.logprobs) if want else None,
                "finish_reason": c.finish_reason} for c in gen.choices]
    return {**_head(gen, "chat.completion"), "choices": choices, "usage": gen.usage()}


def chat_chunks(gen: Generation, choice: Choice, text: str, lps: list[TokenLogprob],
                finish_reason: str | None, first: bool) -> list[dict]:
    """Chunks for one delta: a role chunk first for each choice, then content and/or the finish."""
    chunks = []
    if first:
        chunks.append(_chat_chunk(gen, choice.index, {"role": "assistant", "content": ""}, None, None))
    if text or lps or finish_reason:
        delta = {"content": text} if text or lps else {}
        logprobs = chat_logprobs(gen.state.tokens, lps) if gen.params.logprobs is not None and lps else None
        chunks.append(_chat_chunk(gen, choice.index, delta, logprobs, finish_reason))
    return chunks


def _chat_chunk(gen: Generation, index: int, delta: dict, logprobs, finish_reason) -> dict:
    return {**_head(gen, "chat.completion.chunk"),
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                         "finish_reason": finish_reason}]}


# -- completions ---------------------------------------------------------------------
def completion_response(gen: Generation) -> dict:
    want = gen.params.logprobs is not None
    choices = [{"index": c.index, "text": c.text,
                "logprobs": completion_logprobs(gen.state.tokens, c.logprobs, 0) if want else None,
                "finish_reason": c.finish_reason} for c in gen.choices]
    return {**_head(gen, "text_completion"), "choices": choices, "usage": gen.usage()}


def completion_chunks(gen: Generation, choice: Choice, text: str, lps: list[TokenLogprob],
                      finish_reason: str | None, first: bool) -> list[dict]:
    del first
    if not (text or lps or finish_reason):
        return []
    logprobs = None
    if gen.params.logprobs is not None and lps:
        logprobs = completion_logprobs(gen.state.tokens, lps, len(choice.text) - len(text))
    return [{**_head(gen, "text_completion"),
             "choices": [{"index": choice.index, "text": text, "logprobs": logprobs,
                          "finish_reason": finish_reason}]}]


def usage_chunk(gen: Generation, obj: str) -> dict:
    return {**_head(gen, obj), "choices": [], "usage": gen.usage()}
