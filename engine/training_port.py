"""The narrow port a trainer gets from the serving engine (DESIGN §1): what training beside serving needs,
and nothing of the engine's scheduling, sequences or runner. The trainer never calls back into the engine
except through `offer` (a new adapter version, applied by the engine at its next step boundary)."""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from engine.serving_adapter import AdapterOffer
from engine.step_signal import StepSignal


@dataclass(frozen=True)
class TrainingPort:
    model: nn.Module                            # the served model (base weights shared with training)
    hf_config: object                           # its transformers config
    tokenizer: object                           # or None (tiny test models)
    device: torch.device
    max_model_len: int                          # positions the model serves (and trains) at most
    activation_pool: object                     # store.activation_pool.ActivationPool, or None
    serving_stream: torch.cuda.Stream | None    # serving's CUDA stream (None off CUDA)
    step_signal: StepSignal                     # prompt tokens of the serving step in flight
    graph_capture_lock: threading.Lock          # held while work on another thread issues CUDA calls
    invalidate_graphs: Callable[[], None]       # after LoRA modules replace the model's projections
    has_unfinished: Callable[[], bool]          # whether serving has requests in flight
    offer: Callable[[AdapterOffer], None]       # serve this version from the next step boundary on
    live_version: Callable[[], int]             # the adapter version serving uses now
