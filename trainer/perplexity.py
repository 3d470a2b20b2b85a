"""Perplexity of the served model (base + a published adapter version) on a fixed held-out text set,
through the same model code and TrainingContext as training (no grad). `alchemist perplexity`."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from engine.config import alchemist_home
from trainer.heldout import HELDOUT_TEXTS
from trainer.reuse import TrainingContext


@torch.no_grad()
def token_nll(model, tokenizer, text: str, adapters: dict | None = None) -> tuple[list[int], torch.Tensor]:
    """(token ids, NLL of each token after the first [n-1] fp32) of `text` under the model (+ adapters)."""
    device = next(model.parameters()).device
    ids = tokenizer(text, add_special_tokens=False).input_ids
    ctx = TrainingContext([0, len(ids)], adapters or {})
    hidden = model(torch.tensor(ids, device=device), torch.arange(len(ids), device=device), ctx)
    logp = model.compute_logits(hidden[:-1]).float().log_softmax(-1)                   # [n-1, V]
    return ids, -logp.gather(1, torch.tensor(ids[1:], device=device)[:, None]).squeeze(1)


def perplexity(model, tokenizer, texts: list[str] = HELDOUT_TEXTS, adapters: dict | None = None) -> float:
    """exp(mean token NLL) over `texts`; `adapters`: {module: (A, B, scaling)} or None (the model as is)."""
    nlls = [token_nll(model, tokenizer, text, adapters)[1] for text in texts]
    return math.exp(float(torch.cat(nlls).mean()))


def largest_increases(model, tokenizer, adapters: dict, top: int = 10, texts: list[str] = HELDOUT_TEXTS) -> dict:
    """Held-out perplexity without and with the adapters (as `perplexity` computes it), and where NLL
    rose most: the `top` tokens (with the text before them) and the share of the total increase they carry."""
    rows, base_all, adapted_all = [], [], []
    for text in texts:
        ids, base = token_nll(model, tokenizer, text)
        _, adapted = token_nll(model, tokenizer, text, adapters)
        base_all.append(base)
        adapted_all.append(adapted)
        for i, delta in enumerate((adapted - base).tolist()):
            rows.append((delta, tokenizer.decode(ids[max(0, i - 5):i + 1]), tokenizer.decode([ids[i + 1]])))
    rows.sort(key=lambda r: r[0], reverse=True)
    total = sum(r[0] for r in rows)
    return {"base_ppl": math.exp(float(torch.cat(base_all).mean())),
            "adapted_ppl": math.exp(float(torch.cat(adapted_all).mean())), "total_nll_increase": total,
            "top_share": sum(r[0] for r in rows[:top]) / total if total else 0.0,
            "top": [{"delta": round(d, 3), "context": c, "token": t} for d, c, t in rows[:top]]}


def checkpoint_folder(run_dir: Path, version: int) -> Path:
    folder = run_dir / f"ckpt-{version:06d}"
    if not folder.is_dir():
        kept = sorted(p.name for p in run_dir.glob("ckpt-*"))
        raise FileNotFoundError(f"no checkpoint of version {version} in {run_dir} (kept: {kept})")
    return folder


def compare(model_dir: str, run_dir: Path, version: int | None) -> dict:
    """Perplexity without any adapter and with the run's adapter `version` (default: latest)."""
    from engine.config import EngineConfig
    from engine.setup import build_engine_parts
    from trainer.adapters import load_peft
    from trainer.lora import apply_lora
    parts = build_engine_parts(EngineConfig(model=model_dir, capture="none", device="cpu"))
    model, tok = parts.model, parts.tokenizer
    base = perplexity(model, tok)
    if version is None:
        version = int((run_dir / "latest").read_text().strip().split("-")[1])
    state, lora = load_peft(checkpoint_folder(run_dir, version))
    modules = apply_lora(model, lora)
    adapters = {m: (state[name][0].to(m.lora_A.dtype), state[name][1].to(m.lora_B.dtype), m.scaling)
                for name, m in modules.items()}
    adapted = perplexity(model, tok, adapters=adapters)
    return {"version": version, "base_ppl": base, "adapted_ppl": adapted, "ratio": adapted / base}


def add_parser(sub) -> None:
    p = sub.add_parser("perplexity", help="held-out perplexity: base model vs a trained adapter version")
    p.add_argument("--run", default="default", help="run name under $ALCHEMIST_HOME/runs")
    p.add_argument("--version", type=int, default=None, help="adapter version (default: the latest checkpoint)")
    p.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--home", default=None, help="ALCHEMIST_HOME (default: $ALCHEMIST_HOME or ~/.cache/alchemist)")


def main(args) -> int:
    from engine.embedded_model import ensure_default_model
    home = Path(args.home) if args.home else alchemist_home()
    model_dir = args.model or str(ensure_default_model())
    print(json.dumps(compare(model_dir, home / "runs" / args.run, args.version)))
    return 0
