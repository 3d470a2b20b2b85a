"""POST /feedback and GET /feedback/{id} (also under /v1). A 2xx means the row is committed; a rating
the trainer could never train (a better_response over the context or the step budget) is a 400."""
from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.protocol import FeedbackRequest
from trainer.admission import check_feedback_trainable

router = APIRouter()
log = logging.getLogger("alchemist.server")


@router.post("/feedback")
@router.post("/v1/feedback")
async def post_feedback(body: FeedbackRequest, request: Request):
    state = request.app.state.alchemist
    feedback, created = await asyncio.to_thread(_record, state, body, getattr(request.state, "api_key_id", None))
    state.metrics.rated(feedback.rating, feedback.stars, feedback.reward_value)
    if state.trainer is not None:            # keep the choice's activations until it is trained
        try:
            state.trainer.pin_for_feedback(feedback.response_id, feedback.choice_index)
        except Exception:                    # the rating is committed either way; training recomputes
            log.exception("pinning activations of %s[%d] failed", feedback.response_id, feedback.choice_index)
    content = {"feedback_id": feedback.feedback_id, "id": feedback.response_id,
               "choice_index": feedback.choice_index, "status": feedback.status,
               "replaced": not created}
    return JSONResponse(content, status_code=201 if created else 200)


def _record(state, body: FeedbackRequest, api_key_id: str | None):
    """Blocking (tokenizes, commits): a rating the trainer could never train is a 400 and is not stored
    (trainer/admission.py), else it is committed."""
    check_feedback_trainable(state.store, state.tokenizer, response_id=body.id, choice_index=body.choice_index,
                             better_response=body.better_response, api_key_id=api_key_id,
                             max_model_len=state.llm.max_model_len, step_tokens=state.config.training.step_tokens)
    return state.store.add_feedback(
        response_id=body.id, choice_index=body.choice_index, rating=body.rating, stars=body.stars,
        reward=body.reward, comment=body.comment, better_response=body.better_response, replace=body.replace,
        api_key_id=api_key_id)


@router.get("/feedback/{feedback_id}")
@router.get("/v1/feedback/{feedback_id}")
async def get_feedback(feedback_id: str, request: Request):
    state = request.app.state.alchemist
    feedback = await asyncio.to_thread(state.store.get_feedback, feedback_id,
                                       getattr(request.state, "api_key_id", None))
    return feedback.to_public_dict()
