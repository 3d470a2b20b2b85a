"""Adapter version numbers on the trainer's side (DESIGN §5).

The trainer's fp32 masters hold version `current` (the trainer's own fact: which version a step's
gradients are taken against). `publish` keeps a new version at once (history, for checkpoints, export
and rollback) and offers it to the engine through the port; the engine makes the newest offer live at a
step boundary and owns the live version (`port.live_version()`). Numbers only increase, also across a
rollback and a crash (a hint file in the run folder).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from engine.serving_adapter import AdapterOffer
from trainer import checkpoint as ckpt
from trainer.adapters import AdapterManager, AdapterState


class Versions:
    def __init__(self, adapters: AdapterManager, offer: Callable[[AdapterOffer], None], run_dir: Path):
        self.adapters, self.offer, self.run_dir = adapters, offer, run_dir
        self.current = 0                              # the version the trainer's masters hold
        self.next = max(1, ckpt.read_next_version(run_dir))   # never one served before a crash
        self.pending_activation: int | None = None    # a rollback asked for, not yet taken by the trainer

    def publish(self, masters: AdapterState, version: int | None = None) -> int:
        """The masters become `version` (default: the next number): kept now, live at the engine's next
        step boundary."""
        version = self.next if version is None else version
        offer = self.adapters.stage(masters, version)
        self.next = max(self.next, version + 1)
        ckpt.write_next_version(self.run_dir, self.next)
        self.offer(offer)
        self.current = version            # last: a reader that sees it finds the version offered
        return version

    def request_activate(self, version: int) -> None:
        """Roll back (or forward) to a kept version; the trainer takes it before its next step."""
        self.adapters.kept(version)                   # NotFoundError now if the version is not kept
        self.pending_activation = version

    def take_activation(self) -> int | None:
        version, self.pending_activation = self.pending_activation, None
        return version

    def activate(self, version: int) -> None:
        """The masters were reset to kept `version`: offer it to be served again."""
        self.offer(self.adapters.stage_kept(version))
        self.current = version
