"""Admin API: adapter versions, rollback, control of the online trainer, and its quarantine (ratings
the trainer could not train: list, retry, drop).

With API keys configured these need an admin key (403 `permission_error` for any other valid key);
with no keys configured at all they are open, like the rest of the API. With training off they
answer 409 `conflict_error` (code `training_disabled`), except the read-only listings and the
quarantine (rows of the feedback store, kept from a run with training on)."""
from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from common.errors import ConflictError

router = APIRouter()
ACTIVATE_WAIT_S = 5.0        # an activation applies at the next engine step boundary; wait this long for it


def _admin(request: Request):
    state = request.app.state.alchemist
    state.api_keys.require_admin(getattr(request.state, "api_key_id", None))
    return state


def _trainer(state):
    if state.trainer is None:
        raise ConflictError("Online training is off on this server (--no-training or training.enabled=false): "
                            "there are no adapter versions to activate and no trainer to control.",
                            code="training_disabled")
    return state.trainer


def _locked(trainer, fn):
    """Run `fn` between training steps (the trainer holds its lock for a whole step)."""
    with trainer.lock:
        return fn()


@router.get("/v1/adapters")
async def list_adapters(request: Request):
    state = _admin(request)
    trainer = state.trainer
    versions = [0] if trainer is None else await asyncio.to_thread(_locked, trainer, trainer.adapters.versions)
    active = state.adapter_version
    return {"object": "list", "active_version": active,
            "data": [{"object": "adapter", "version": v, "active": v == active} for v in versions]}


@router.post("/v1/adapters/{version}/activate")
async def activate_adapter(version: int, request: Request):
    """Roll back (or forward) to a kept version. 200 once new requests use it, 202 if still pending."""
    state = _admin(request)
    trainer = _trainer(state)
    await asyncio.to_thread(trainer.request_activate, version)     # NotFoundError (404) if not kept
    deadline = time.monotonic() + ACTIVATE_WAIT_S
    while (trainer.pending_activation is not None or state.adapter_version != version) \
            and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    applied = trainer.pending_activation is None and state.adapter_version == version
    body = {"object": "adapter", "version": version, "active": applied,
            "status": "active" if applied else "scheduled", "active_version": state.adapter_version}
    return JSONResponse(body, status_code=200 if applied else 202)


@router.post("/v1/training/pause")
async def pause_training(request: Request):
    """After the 200 no training step runs (a step in flight has finished) until /resume."""
    state = _admin(request)
    trainer = _trainer(state)
    trainer.pause()
    await asyncio.to_thread(_locked, trainer, lambda: None)
    return {"paused": True, "adapter_version": state.adapter_version}


@router.post("/v1/training/resume")
async def resume_training(request: Request):
    state = _admin(request)
    trainer = _trainer(state)
    trainer.resume()                             # also clears the last training error
    return {"paused": False, "adapter_version": state.adapter_version}


@router.get("/v1/training/status")
async def training_status(request: Request):
    state = _admin(request)
    trainer = state.trainer
    if trainer is None:
        pending = await asyncio.to_thread(state.store.count_feedback, "pending")
        quarantined = await asyncio.to_thread(state.store.count_feedback, "quarantined")
        return {"enabled": False, "adapter_version": state.adapter_version, "pending_feedback": pending,
                "quarantined_feedback": quarantined}
    body = await asyncio.to_thread(_locked, trainer, lambda: _status(state, trainer))
    return body


def _status(state, trainer) -> dict:
    body = trainer.status()
    body.update({"pending_activation": trainer.pending_activation, "next_version": trainer.next_version,
                 "trained_feedback": state.store.count_feedback("trained"),
                 "totals": dict(trainer.totals), "last_error": state.train_error,
                 "run_dir": str(state.run_dir)})
    return body


# -- the quarantine (store/feedback_quarantine.py) ----------------------------------------------
@router.get("/v1/training/quarantine")
async def list_quarantine(request: Request, limit: int = Query(100, ge=1, le=1000)):
    """Quarantined ratings, the most recently quarantined first, with why (reason, error) and when."""
    state = _admin(request)
    rows = await asyncio.to_thread(state.store.quarantined, limit)
    total = await asyncio.to_thread(state.store.count_feedback, "quarantined")
    return {"object": "list", "total": total, "data": [row.to_quarantine_dict() for row in rows]}


@router.post("/v1/training/quarantine/{feedback_id}/retry")
async def retry_quarantined(feedback_id: str, request: Request):
    """Back to pending with a new seq: the trainer reads it again (and quarantines it again if it fails)."""
    state = _admin(request)
    row = await asyncio.to_thread(state.store.retry_quarantined, feedback_id)     # 404 if not quarantined
    if state.trainer is not None:
        state.trainer.wake()
    return row.to_quarantine_dict()


@router.delete("/v1/training/quarantine/{feedback_id}")
async def drop_quarantined(feedback_id: str, request: Request):
    """Status 'dropped': never trained; the row stays (its rater still reads it; retention purges it)."""
    state = _admin(request)
    row = await asyncio.to_thread(state.store.drop_quarantined, feedback_id)      # 404 if not quarantined
    return row.to_quarantine_dict()
