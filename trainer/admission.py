"""What the trainer can train, checked where it is knowable: at POST /feedback, before the rating is
stored (a 400 with `param`), and again by the trainer before a step (a rating stored before this check
existed is quarantined as 'too_long' instead of failing the step).

A training record is a prompt and an answer; the forward gives each token a position, and the model has
rotary embeddings for `max_model_len` positions only (past that: IndexError, issue 15). A user-written
better answer (tokens + EOS, after the completion's prompt) must also fit one training step's token
budget (`training.step_tokens`)."""
from __future__ import annotations

from common.errors import InvalidRequestError
from store.feedback_records import MAX_TEXT_BYTES
from trainer.reuse import better_response_ids


def check_trainable(prompt_tokens: int, response_tokens: int, better_tokens: int | None,
                    max_model_len: int, step_tokens: int | None) -> None:
    """InvalidRequestError unless prompt + response fits the context and prompt + better answer (if
    any, `better_tokens` with its EOS) fits both the context and the step budget (None: the context
    only; the trainer's own check, so that a lower step_tokens later does not reject stored ratings)."""
    served = prompt_tokens + response_tokens
    if served > max_model_len:
        raise InvalidRequestError(f"This completion has {served} tokens, more than the model's context of "
                                  f"{max_model_len} tokens (max_model_len): it cannot be trained.", param="id")
    if better_tokens is None:
        return
    limit, what = max_model_len, "the model's context (max_model_len)"
    if step_tokens is not None and step_tokens < max_model_len:
        limit, what = step_tokens, "the training step budget (training.step_tokens)"
    if prompt_tokens + better_tokens > limit:
        room = max(limit - prompt_tokens, 0)
        raise InvalidRequestError(
            f"'better_response' is {better_tokens} tokens (with EOS); after the completion's {prompt_tokens}-token "
            f"prompt that is {prompt_tokens + better_tokens} tokens, more than {what} of {limit} tokens: "
            f"shorten it to at most {room} tokens.", param="better_response")


def check_feedback_trainable(store, tokenizer, *, response_id: str, choice_index: object,
                             better_response: object, api_key_id: str | None, max_model_len: int,
                             step_tokens: int) -> None:
    """The POST /feedback check (blocking: tokenizes; run it off the event loop). Does nothing where
    the store's own validation answers (unknown or foreign completion, a bad choice index, text that is
    not a string or over the byte limit), so those errors stay the store's."""
    if not isinstance(choice_index, int) or isinstance(choice_index, bool):
        return
    completion = store.get_completion(response_id, choice_index)
    if completion is None or completion.api_key_id != api_key_id:
        return
    better_tokens = None
    if isinstance(better_response, str) and tokenizer is not None \
            and len(better_response.encode("utf-8", "surrogatepass")) <= MAX_TEXT_BYTES:
        try:
            better_tokens = len(better_response_ids(tokenizer, better_response))
        except (TypeError, ValueError) as err:       # e.g. a lone UTF-16 surrogate: the trainer could not either
            raise InvalidRequestError(f"'better_response' cannot be tokenized: {err}",
                                      param="better_response") from err
    check_trainable(len(completion.prompt_token_ids), len(completion.response_token_ids), better_tokens,
                    max_model_len, step_tokens)
