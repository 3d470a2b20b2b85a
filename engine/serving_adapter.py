"""The engine's live adapter: its version, and the mailbox where a trainer offers the next one.

One owner for the version requests are served with (DESIGN §1): a trainer never writes the serving
tensors nor the version; it *offers* a staged version (`AdapterOffer`) from any thread, and the engine
applies the newest offer at a step boundary — one `_foreach_copy_` into the serving buffers, whose
pointers never change (CUDA graphs keep them) — so no batch sees a half-written adapter. A newer offer
replaces one not yet applied; rollback is an offer of a kept version.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class AdapterOffer:
    """A version ready to serve: `sources[i]` is the new content of serving buffer `targets[i]`, already
    in its dtype, device and layout."""
    version: int
    targets: list[torch.Tensor]             # the model's serving LoRA buffers (1-D views of storages)
    sources: list[torch.Tensor]             # same shapes: the staged contents


class ServingAdapter:
    def __init__(self):
        self._version = 0
        self._offer: AdapterOffer | None = None
        self._lock = threading.Lock()
        self.on_offer: Callable[[], None] = lambda: None   # wakes an idle engine loop (AsyncEngine sets it)

    @property
    def version(self) -> int:
        """The adapter version the serving weights hold now (0: the base model's zero adapter)."""
        return self._version

    def offer(self, offer: AdapterOffer) -> None:
        """Any thread: serve `offer` from the next step boundary on."""
        with self._lock:
            self._offer = offer
        self.on_offer()

    def take_offer(self) -> AdapterOffer | None:
        if self._offer is None:              # the common case: no lock, nothing to do
            return None
        with self._lock:
            offer, self._offer = self._offer, None
        return offer

    @torch.no_grad()
    def apply(self, offer: AdapterOffer) -> None:
        """At a step boundary, on the serving stream: copy the offer in place and make it live."""
        torch._foreach_copy_(offer.targets, offer.sources)
        if offer.sources and offer.sources[0].is_cuda:    # done before any stream reads them (between steps)
            torch.cuda.current_stream(offer.sources[0].device).synchronize()
        self._version = offer.version
