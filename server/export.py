"""`alchemist export-adapter --version N --out DIR [--run NAME] [--home DIR]`: write one adapter
version of a run as a PEFT folder (`adapter_config.json` + `adapter_model.safetensors`) that `peft`
and vLLM load. Versions come from the run's checkpoints ($ALCHEMIST_HOME/runs/<run>/ckpt-XXXXXX,
each a PEFT folder with a state.json); only checkpointed versions that were not pruned exist."""
from __future__ import annotations

import json
from pathlib import Path

from common.errors import NotFoundError


def add_parser(sub) -> None:
    e = sub.add_parser("export-adapter", help="write a checkpointed adapter version as a PEFT folder")
    e.add_argument("--version", type=int, required=True, help="adapter version (see GET /v1/adapters)")
    e.add_argument("--out", required=True, help="output folder (created; its two PEFT files are replaced)")
    e.add_argument("--run", default="default", help="run name, i.e. training.run_name (default: default)")
    e.add_argument("--home", help="ALCHEMIST_HOME (default: $ALCHEMIST_HOME or ~/.cache/alchemist)")


def checkpointed_versions(run_dir: Path) -> dict[int, Path]:
    """{version: checkpoint folder} of every complete checkpoint in the run."""
    found: dict[int, Path] = {}
    for folder in sorted(run_dir.glob("ckpt-*")):
        try:
            meta = json.loads((folder / "state.json").read_text())
        except (OSError, ValueError):
            continue                                      # not a complete checkpoint
        if isinstance(meta.get("version"), int):
            found[meta["version"]] = folder
    return found


def export_version(run_dir: Path, version: int, out: Path) -> Path:
    from trainer.adapters import CONFIG_FILE, export_peft, load_peft
    if not run_dir.is_dir():
        raise NotFoundError(f"no run at {run_dir}: check --run and --home (the server's ALCHEMIST_HOME)")
    found = checkpointed_versions(run_dir)
    if version not in found:
        raise NotFoundError(f"adapter version {version} has no checkpoint in {run_dir}; checkpointed versions: "
                            f"{sorted(found)} (the newest 3 are kept; versions between checkpoints "
                            "exist only in the serving process)")
    folder = found[version]
    state, lora = load_peft(folder)                       # validates names and shapes
    base = json.loads((folder / CONFIG_FILE).read_text()).get("base_model_name_or_path") or ""
    return export_peft(state, out, lora, base)


def main(args) -> int:
    from engine.config import alchemist_home
    home = Path(args.home) if args.home else alchemist_home()
    out = export_version(home / "runs" / args.run, args.version, Path(args.out))
    print(f"adapter version {args.version} of run {args.run!r} written to {out}")
    return 0
