"""LoRA by module replacement: every target `nn.Linear` becomes a `LoRALinear` that keeps the base
layer (frozen, same HF name plus `.base`) and adds `scaling * (x @ A^T) @ B^T`.

Serving applies adapters unmerged, so publishing a new version is a `copy_` into `lora_A` / `lora_B`
(DESIGN §5). Over packed projections (engine/packing.py) the adapters of a group are packed too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from common.errors import ConfigError
from engine.packing import pack_model_lora

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 16
    alpha: float = 32
    targets: tuple[str, ...] = ALL_PROJECTIONS
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            raise ConfigError(f"lora targets={self.targets!r} is one string: give a list of module "
                              f"names such as {list(ALL_PROJECTIONS)}")
        object.__setattr__(self, "targets", tuple(self.targets))
        self.validate()

    def validate(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"lora rank={self.rank!r}: use a positive integer such as 16")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"lora alpha={self.alpha!r}: use a positive number (scaling = alpha / rank)")
        if not self.targets:
            raise ConfigError(f"lora targets is empty: name at least one projection, e.g. {list(ALL_PROJECTIONS)}")
        bad = [t for t in self.targets if not isinstance(t, str) or not t]
        if bad:
            raise ConfigError(f"lora targets {bad!r} are not module names: use names such as 'q_proj'")
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"lora targets {list(self.targets)} repeat a name: list each once")
        if self.dropout != 0:
            raise ConfigError(f"lora dropout={self.dropout!r} is not supported (training reuses serving "
                              "activations, which saw no dropout): set dropout to 0")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def matches(self, module_name: str) -> bool:
        """PEFT's rule for a list of target_modules: the full name or its last dotted part(s)."""
        return any(module_name == t or module_name.endswith("." + t) for t in self.targets)


class LoRALinear(nn.Module):
    """base(x) + scaling * (x @ A^T) @ B^T, with A: [r, in], B: [out, r] in the base weight's dtype.

    It holds the factors; it has no forward of its own: the model's forward context computes every
    projection (serving: engine.packing.add_lora / packed groups; training: trainer.reuse)."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        w = base.weight
        a = torch.empty(rank, base.in_features, dtype=torch.float32)          # A: [r, in]
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)     # as PEFT's init
        self.lora_A = nn.Parameter(a.to(device=w.device, dtype=w.dtype), requires_grad=False)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype),
                                   requires_grad=False)                       # B: [out, r]
        self.rank = rank
        self.scaling = scaling

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling}"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The LoRALinear modules already in `model`, by HF module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, config: LoRAConfig,
               generator: torch.Generator | None = None) -> dict[str, LoRALinear]:
    """Replace every target `nn.Linear` by a `LoRALinear` (B = 0: outputs unchanged).

    Returns {HF module name, e.g. 'model.layers.0.self_attn.q_proj': module}. `generator` (CPU)
    makes the A init reproducible; None uses torch's global RNG, like PEFT.
    """
    if lora_modules(model):
        raise ConfigError("LoRA is already applied to this model: apply it once and keep the returned "
                          "modules (or use one AdapterManager per model)")
    found = [(name, m) for name, m in model.named_modules()
             if type(m) is nn.Linear and config.matches(name)]
    for target in config.targets:
        if not any(name == target or name.endswith("." + target) for name, _ in found):
            raise ConfigError(f"lora target {target!r} matches no nn.Linear in the model: remove it or "
                              f"use projection names such as {list(ALL_PROJECTIONS)}")
    wrapped: dict[str, LoRALinear] = {}
    for name, base in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped[name] = LoRALinear(base, config.rank, config.scaling, generator)
        setattr(parent, child, wrapped[name])
    pack_model_lora(model)          # groups over packed bases (CUDA): one A, one block-diagonal B
    return wrapped
