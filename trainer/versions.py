"""Adapter version numbers between the trainer and the engine (DESIGN §5).

The trainer's fp32 masters hold version `current`. `publish` keeps a new version at once (history, for
checkpoints, export and rollback) and stages its serving-dtype tensors; `commit`, on the engine thread
between engine steps, makes the newest staged version live with one in-place copy — serving never sees
a half-written adapter, and a trainer on another thread never writes what the engine reads. Numbers only
increase, also across a rollback and a crash (a hint file in the run folder).
"""
from __future__ import annotations

import threading
from pathlib import Path

from trainer import checkpoint as ckpt
from trainer.adapters import AdapterManager, AdapterState, StagedAdapter


class Versions:
    def __init__(self, adapters: AdapterManager, engine, run_dir: Path, on_publish):
        self.adapters, self.engine, self.run_dir = adapters, engine, run_dir
        self.on_publish = on_publish                  # (version) on the engine thread: it went live
        self.current = 0                              # the version the trainer's masters hold
        self.next = max(1, ckpt.read_next_version(run_dir))   # never one served before a crash
        self.pending_activation: int | None = None    # a rollback asked for, not yet taken by the trainer
        self._staged: StagedAdapter | None = None     # the newest version not yet live
        self._lock = threading.Lock()

    def publish(self, masters: AdapterState, version: int | None = None) -> int:
        """The masters become `version` (default: the next number): kept now, live at the next commit."""
        version = self.next if version is None else version
        staged = self.adapters.stage(masters, version)
        self.next = max(self.next, version + 1)
        ckpt.write_next_version(self.run_dir, self.next)
        self._offer(staged)
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
        """The masters were reset to kept `version`: serve it again from the next commit."""
        self._offer(self.adapters.stage_kept(version))
        self.current = version

    def _offer(self, staged: StagedAdapter) -> None:
        with self._lock:                              # a newer version replaces one not yet taken
            self._staged = staged

    def commit(self) -> None:
        """On the engine thread between steps: make the newest staged version live."""
        with self._lock:
            staged, self._staged = self._staged, None
        if staged is None:
            return
        with self.engine.runner.stream_context():    # ordered with the serving kernels, whoever calls
            self.adapters.commit(staged)
        self.engine.adapter_version = staged.version
        self.on_publish(staged.version)
