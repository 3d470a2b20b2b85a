"""OpenAI-compatible routes: chat completions, completions, models; vLLM's tokenize/detokenize."""
from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from common.errors import AlchemistError, InvalidRequestError, NotFoundError
from server import formatting as fmt
from server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
                             chat_messages)
from server.serving import Generation
from server.streaming import SSEResponse, run_until_disconnect, sse

log = logging.getLogger("alchemist.server")
router = APIRouter()


def _state(request: Request):
    return request.app.state.alchemist


def _key(request: Request) -> str | None:
    return getattr(request.state, "api_key_id", None)


async def _off_loop(request: Request, fn: Callable, *args):
    """Run CPU-heavy request work (templating, tokenizing, validating long prompts, rendering big
    answers) on the bounded worker pool, never on the event loop every other client shares."""
    return await request.app.state.workers.run(fn, *args)


def check_model(state, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise NotFoundError(f"The model '{model}' does not exist; this server serves "
                            f"'{state.model_name}'.", param="model", code="model_not_found")


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = _state(request)
    check_model(state, body.model)
    params = body.sampling_params()
    gen = await _off_loop(request, _chat_generation, state, body, params, _key(request))
    if body.stream:
        return await _stream(request, gen, fmt.chat_chunks, "chat.completion.chunk", body.include_usage)
    await run_until_disconnect(request, gen.run())
    return JSONResponse(fmt.chat_response(gen))


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    state = _state(request)
    check_model(state, body.model)
    params = body.sampling_params()
    gen = await _off_loop(request, _completion_generation, state, body, params, _key(request))
    if body.stream:
        return await _stream(request, gen, fmt.completion_chunks, "text_completion", body.include_usage)
    await run_until_disconnect(request, gen.run())
    return JSONResponse(fmt.completion_response(gen))


def _chat_generation(state, body: ChatCompletionRequest, params, key: str | None) -> Generation:
    prompt = state.tokens.chat_prompt(body.chat_messages())
    return Generation(state, "chatcmpl-" + uuid.uuid4().hex, [prompt], params, key)


def _completion_generation(state, body: CompletionRequest, params, key: str | None) -> Generation:
    prompts = [state.tokens.text_prompt(p) if isinstance(p, str) else p for p in body.prompt_list()]
    return Generation(state, "cmpl-" + uuid.uuid4().hex, prompts, params, key)


async def _stream(request: Request, gen: Generation, chunks_of: Callable, obj: str,
                  include_usage: bool) -> SSEResponse:
    """Wait for the first delta (so queue-full and engine errors still get their HTTP status),
    then stream; the response cancels the generator when the client leaves."""
    items = gen.stream()
    try:
        first = await run_until_disconnect(request, anext(items, None))
    except BaseException:
        await items.aclose()
        raise
    return SSEResponse(_events(gen, items, first, chunks_of, obj, include_usage))


async def _events(gen: Generation, items: AsyncIterator, first, chunks_of: Callable, obj: str,
                  include_usage: bool) -> AsyncIterator[str]:
    seen: set[int] = set()
    try:
        item = first
        while item is not None:
            choice, delta = item
            for chunk in chunks_of(gen, choice, delta.text, delta.logprobs, delta.finish_reason,
                                   choice.index not in seen):
                yield sse(chunk)
            seen.add(choice.index)
            item = await anext(items, None)
        if include_usage:
            yield sse(fmt.usage_chunk(gen, obj))
        yield sse("[DONE]")
    except AlchemistError as err:               # headers are out: report in the stream
        yield sse(err.to_dict())
    except Exception as exc:                    # noqa: BLE001 -- never kill the stream silently
        log.exception("stream %s failed", gen.response_id)
        yield sse({"error": {"message": f"internal error: {exc}", "type": "server_error",
                             "param": None, "code": None}})
    finally:
        await items.aclose()


@router.get("/v1/models")
async def list_models(request: Request):
    return {"object": "list", "data": [_model_card(_state(request))]}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request):
    state = _state(request)
    check_model(state, model)
    return _model_card(state)


def _model_card(state) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created,
            "owned_by": "alchemist", "root": state.config.engine.model,
            "max_model_len": state.llm.max_model_len}


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    state = _state(request)
    check_model(state, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequestError("Provide exactly one of 'prompt' or 'messages'.", param="prompt")
    return await _off_loop(request, _tokenize, state, body)


def _tokenize(state, body: TokenizeRequest) -> Response:
    if body.messages is not None:
        tokens = state.tokens.chat_prompt(chat_messages(body.messages), body.add_generation_prompt)
    else:
        add = True if body.add_special_tokens is None else body.add_special_tokens
        tokens = state.tokens.text_prompt(body.prompt, add)
    content = (f'{{"tokens":{_int_list_json(tokens)},"count":{len(tokens)},'
               f'"max_model_len":{state.llm.max_model_len}}}')
    return Response(content, media_type="application/json")


def _int_list_json(values: list[int], chunk: int = 65536) -> str:
    """json.dumps of a long int list in slices: one dumps call holds the GIL throughout (0.6 s for
    2.5 M ids), so the event loop thread would wait that long."""
    parts = (json.dumps(values[i:i + chunk], separators=(",", ":"))[1:-1] for i in range(0, len(values), chunk))
    return "[" + ",".join(parts) + "]"


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    state = _state(request)
    check_model(state, body.model)
    return await _off_loop(request, lambda: JSONResponse({"prompt": state.tokens.decode(body.tokens)}))
