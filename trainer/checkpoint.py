"""Checkpoints under $ALCHEMIST_HOME/runs/<name>/ckpt-<version>/: the adapter in PEFT format, the
optimizer state, and state.json (version, step, trained-feedback watermark, pg baseline). Written
into a temporary folder and renamed, then `latest` is replaced atomically: a crash never leaves a
half-written checkpoint in use."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from trainer.adapters import AdapterState, export_peft, load_peft
from trainer.lora import LoRAConfig


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, state: AdapterState, lora: LoRAConfig, optimizer_state: dict,
                    meta: dict, base_model: str) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"ckpt-{meta['version']:06d}"
    tmp = run_dir / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    export_peft(state, tmp, lora, base_model)
    torch.save(optimizer_state, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(meta, indent=2))
    for f in tmp.iterdir():
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = run_dir / ".latest.tmp"
    latest_tmp.write_text(final.name + "\n")
    with open(latest_tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(latest_tmp, run_dir / "latest")
    _fsync_dir(run_dir)
    return final


def load_latest(run_dir: Path) -> tuple[AdapterState, LoRAConfig, dict, dict] | None:
    """(adapter state, lora config, optimizer state, meta) of the latest checkpoint, or None."""
    pointer = run_dir / "latest"
    if not pointer.exists():
        return None
    folder = run_dir / pointer.read_text().strip()
    state, lora = load_peft(folder)
    optimizer_state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False)
    meta = json.loads((folder / "state.json").read_text())
    return state, lora, optimizer_state, meta


def prune(run_dir: Path, keep: int = 3) -> None:
    """Keep the `keep` most recently written checkpoints, and always the one `latest` names (after a
    rollback it has a lower version than older-written ones)."""
    pointer = run_dir / "latest"
    latest = pointer.read_text().strip() if pointer.exists() else None
    folders = sorted((p for p in run_dir.glob("ckpt-*") if p.is_dir()),
                     key=lambda p: (p.stat().st_mtime_ns, p.name))
    for old in folders[:-keep]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)


def write_next_version(run_dir: Path, next_version: int) -> None:
    """The next version number to hand out; survives kill -9 (page cache), so a restart never reuses a
    number served before the crash."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / ".next_version.tmp"
    tmp.write_text(f"{next_version}\n")
    tmp.replace(run_dir / "next_version")


def read_next_version(run_dir: Path) -> int:
    try:
        return int((run_dir / "next_version").read_text())
    except (OSError, ValueError):
        return 0
