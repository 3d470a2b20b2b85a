"""Build a model from a folder (config.json + *.safetensors) with HF parameter names, or random-init."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from common.errors import ConfigError
from common.model_shape import head_dim
from engine.models.llama import LlamaForCausalLM, RotaryEmbedding

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def build_empty(hf_config, max_positions: int, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    """Allocate the model on `device` in `dtype` without initialising weights."""
    with torch.device("meta"):
        model = LlamaForCausalLM(hf_config, max_positions)
    model.to_empty(device=device)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    with torch.device(device):
        model.model.rotary_emb = RotaryEmbedding(hf_config, head_dim(hf_config), max_positions)
    if getattr(hf_config, "tie_word_embeddings", False):
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def init_random(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Random weights (benchmarks and tests: speed does not depend on values)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        else:
            p.data.normal_(0.0, std, generator=gen)


def load_safetensors(model: torch.nn.Module, model_dir: str | Path) -> None:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ConfigError(f"no *.safetensors in {model_dir}: convert or download the model first")
    params = dict(model.named_parameters())
    tied = getattr(model.config, "tie_word_embeddings", False)
    loaded: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.endswith(IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
                    continue
                if name not in params:
                    raise ConfigError(f"{file.name}: unexpected tensor {name!r} for this architecture")
                tensor = f.get_tensor(name)
                if tensor.shape != params[name].shape:
                    raise ConfigError(f"{name}: shape {tuple(tensor.shape)} != {tuple(params[name].shape)}")
                params[name].data.copy_(tensor)
                loaded.add(name)
    missing = [n for n in params if n not in loaded and not (tied and n == "lm_head.weight")]
    if missing:
        raise ConfigError(f"weights missing from {model_dir}: {missing[:5]}{'...' if len(missing) > 5 else ''}")
