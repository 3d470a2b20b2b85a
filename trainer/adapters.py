"""Versioned adapters: fp32 masters for the trainer, serving copies in the model's dtype, publish by
`copy_` (pointers never change, so CUDA graphs stay valid), rollback, and the PEFT file format.

An `AdapterState` maps an HF module name ('model.layers.0.self_attn.q_proj') to (A: [r, in],
B: [out, r]). Masters, history entries and files hold fp32; the serving tensors are the model's
`lora_A` / `lora_B` parameters.
"""
from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from common.errors import ConfigError, ConflictError, NotFoundError
from engine.serving_adapter import AdapterOffer
from trainer.lora import LoRAConfig, apply_lora

AdapterState = dict[str, tuple[torch.Tensor, torch.Tensor]]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def cpu_fp32(state: AdapterState) -> AdapterState:
    """Detached CPU fp32 copies (never aliasing the input)."""
    def copy(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", torch.float32, copy=True)
    return {name: (copy(a), copy(b)) for name, (a, b) in state.items()}


@torch.no_grad()
def cap_update(params: list[torch.Tensor], before: list[torch.Tensor], max_norm: float) -> bool:
    """Scale the update params - before down to norm `max_norm` if it is larger; True if it was."""
    deltas = [p - b for p, b in zip(params, before)]
    norm = math.sqrt(sum(float(d.pow(2).sum()) for d in deltas))
    if norm <= max_norm:
        return False
    for p, b, d in zip(params, before, deltas):
        p.copy_(b + d * (max_norm / norm))
    return True


def check_state(state: AdapterState, shapes: dict[str, tuple[torch.Size, torch.Size]]) -> None:
    """Raise ConfigError unless `state` has exactly the modules and shapes of `shapes`."""
    missing, extra = sorted(set(shapes) - set(state)), sorted(set(state) - set(shapes))
    if missing or extra:
        raise ConfigError(f"adapter modules do not match the model: missing {missing[:4]}, unexpected "
                          f"{extra[:4]}; use an adapter made for these targets")
    for name, (a, b) in state.items():
        want_a, want_b = shapes[name]
        if a.shape != want_a or b.shape != want_b:
            raise ConfigError(f"adapter {name}: A {tuple(a.shape)} / B {tuple(b.shape)}, the model needs "
                              f"A {tuple(want_a)} / B {tuple(want_b)}: use an adapter of the same rank and base")


def whole_storage(t: torch.Tensor) -> torch.Tensor:
    """The 1-D tensor over all of t's storage (t's packed buffer when t is one block of it)."""
    return t.new_empty(0).set_(t.untyped_storage())


def serving_buffers(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The distinct storages under the serving LoRA tensors, each as one 1-D tensor, in first-use order:
    a packed group's A and block-diagonal B (engine.packing.pack_lora) are one buffer each."""
    seen: dict[int, torch.Tensor] = {}
    for t in tensors:
        seen.setdefault(t.untyped_storage().data_ptr(), whole_storage(t))
    return list(seen.values())


class AdapterManager:
    """The trainer's side of the serving adapter: LoRA applied to the model, versions staged as engine
    offers, and the history kept for checkpoints, export and rollback.

    Keeps the `max_history` most recently staged or re-staged versions (CPU fp32). Which version serves is
    the engine's fact (`LLMEngine.adapter_version`): the manager never writes the serving tensors, it
    builds `AdapterOffer`s (on any thread) that the engine applies at a step boundary. On CUDA, apply
    LoRA to the model before decode CUDA graphs are captured (or invalidate them after).
    """

    def __init__(self, model: nn.Module, config: LoRAConfig, max_history: int = 8,
                 generator: torch.Generator | None = None):
        if max_history < 1:
            raise ConfigError(f"max_history={max_history}: keep at least 1 version for rollback")
        self.config = config
        self.max_history = max_history
        self.modules = apply_lora(model, config, generator)
        self._lock = threading.Lock()          # history: staged on the trainer's thread, read by the server's
        self._history: OrderedDict[int, AdapterState] = OrderedDict()
        self._history[0] = cpu_fp32(self.serving_state())

    def serving_state(self) -> AdapterState:
        """The live serving tensors (model dtype, frozen); only the engine writes them (offers)."""
        return {name: (m.lora_A, m.lora_B) for name, m in self.modules.items()}

    def shapes(self) -> dict[str, tuple[torch.Size, torch.Size]]:
        return {name: (m.lora_A.shape, m.lora_B.shape) for name, m in self.modules.items()}

    def masters(self, version: int = 0) -> AdapterState:
        """fp32 copies of kept `version` on the serving device: leaf tensors that require grad."""
        device = next(iter(self.modules.values())).lora_A.device
        def leaf(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, copy=True).requires_grad_(True)
        return {name: (leaf(a), leaf(b)) for name, (a, b) in self.kept(version).items()}

    def training_adapters(self, masters: AdapterState) -> dict[nn.Module, tuple[torch.Tensor, torch.Tensor, float]]:
        """{LoRALinear module: (A, B, scaling)}: the form trainer.reuse.TrainingContext takes."""
        check_state(masters, self.shapes())
        return {m: (*masters[name], self.config.scaling) for name, m in self.modules.items()}

    def state(self, version: int) -> AdapterState:
        """CPU fp32 copy of kept `version`, e.g. for a checkpoint or export_peft."""
        return cpu_fp32(self.kept(version))

    def kept(self, version: int) -> AdapterState:
        """The kept CPU fp32 tensors of `version` themselves (read them, never write; `state` copies)."""
        with self._lock:
            if version not in self._history:
                raise NotFoundError(f"adapter version {version} is not kept; kept versions: {sorted(self._history)}")
            return self._history[version]

    def versions(self) -> list[int]:
        with self._lock:
            return sorted(self._history)

    def stage(self, masters: AdapterState, version: int) -> AdapterOffer:
        """New `version` from `masters` as an engine offer (any thread; nothing served changes until the
        engine applies it). The version is kept (for checkpoints, export and rollback) from now on."""
        newest = max(self.versions())
        if isinstance(version, bool) or not isinstance(version, int) or version <= newest:
            raise ConflictError(f"adapter version {version!r} is not newer than {newest}: "
                                "stage increasing integer versions (stage_kept serves an older one again)")
        check_state(masters, self.shapes())
        offer = self._offer(masters, version)
        with self._lock:
            self._history[version] = cpu_fp32(masters)
            self._trim_history(keep=version)
        return offer

    def stage_kept(self, version: int) -> AdapterOffer:
        """A kept version as an engine offer (rollback or forward); it counts as recently used."""
        offer = self._offer(self.kept(version), version)
        with self._lock:
            self._history.move_to_end(version)
        return offer

    @torch.no_grad()
    def _offer(self, state: AdapterState, version: int) -> AdapterOffer:
        serving = [(t, src) for name, m in self.modules.items() for t, src in zip((m.lora_A, m.lora_B), state[name])]
        targets = serving_buffers([t for t, _ in serving])
        staged = {target.untyped_storage().data_ptr(): torch.zeros_like(target) for target in targets}
        for t, src in serving:        # into t's place in its buffer (a packed B's off-diagonal stays 0)
            buffer = staged[t.untyped_storage().data_ptr()]
            buffer.as_strided(t.shape, t.stride(), t.storage_offset()).copy_(src.detach())   # casts
        sources = list(staged.values())
        if sources[0].is_cuda:   # copies done before another thread's stream (or SM partition) reads them
            torch.cuda.current_stream(sources[0].device).synchronize()
        return AdapterOffer(version, targets, sources)

    def _trim_history(self, keep: int) -> None:
        """Drop the least recently staged versions beyond `max_history`, never `keep`."""
        while len(self._history) > self.max_history:
            oldest = next(v for v in self._history if v != keep)
            del self._history[oldest]


# -- PEFT format ------------------------------------------------------------------------------------

def peft_config_dict(config: LoRAConfig, base_model_name_or_path: str) -> dict:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.rank, "lora_alpha": config.alpha,
            "target_modules": list(config.targets), "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": True,
            "init_lora_weights": True, "modules_to_save": None,
            "base_model_name_or_path": base_model_name_or_path}


def export_peft(state: AdapterState, out_dir: str | Path, config: LoRAConfig,
                base_model_name_or_path: str) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` (fp32) that `peft` and vLLM load."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (a, b) in cpu_fp32(state).items():
        if not config.matches(name):
            raise ConfigError(f"adapter module {name!r} is not among targets {list(config.targets)}: "
                              "export with the config the adapter was trained with")
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(peft_config_dict(config, base_model_name_or_path), indent=2))
    return out


def config_from_peft(raw: dict) -> LoRAConfig:
    """LoRAConfig from an adapter_config.json dict; ConfigError for what our serving cannot apply."""
    if raw.get("peft_type") != "LORA":
        raise ConfigError(f"peft_type {raw.get('peft_type')!r}: only LORA adapters can be loaded")
    for key in ("use_rslora", "use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern",
                "modules_to_save", "layers_to_transform"):
        if raw.get(key):
            raise ConfigError(f"adapter_config {key}={raw[key]!r} is not supported: export without it")
    if raw.get("bias", "none") != "none":
        raise ConfigError(f"adapter_config bias={raw['bias']!r} is not supported: export with bias='none'")
    targets = raw.get("target_modules")
    if not isinstance(targets, list):
        raise ConfigError(f"adapter_config target_modules={targets!r}: need a list of module names "
                          "(regex strings are not supported)")
    # lora_dropout is a training setting (no effect on outputs); training here runs without it
    return LoRAConfig(rank=raw.get("r"), alpha=raw.get("lora_alpha"), targets=tuple(targets))


def load_peft(path: str | Path) -> tuple[AdapterState, LoRAConfig]:
    """Read a PEFT LoRA folder back into (CPU fp32 state, config), validating names and shapes."""
    from safetensors.torch import load_file
    folder = Path(path)
    for f in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / f).is_file():
            raise NotFoundError(f"{folder / f} does not exist: point at a folder written by export_peft or peft")
    try:
        raw = json.loads((folder / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{folder / CONFIG_FILE} is not valid JSON ({e}): re-export the adapter") from e
    config = config_from_peft(raw)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(folder / WEIGHTS_FILE)).items():
        if not key.startswith(PEFT_PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ConfigError(f"unexpected tensor {key!r} in {WEIGHTS_FILE}: only LoRA A/B weights are supported")
        name, kind, _ = key[len(PEFT_PREFIX):].rsplit(".", 2)          # '<module>.lora_A.weight'
        parts.setdefault(name, {})[kind] = t.float()
    state: AdapterState = {}
    for name, ab in parts.items():
        a, b = ab.get("lora_A"), ab.get("lora_B")
        if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != config.rank \
                or b.shape[1] != config.rank:
            raise ConfigError(f"adapter module {name!r} needs A [r={config.rank}, in] and "
                              f"B [out, r={config.rank}]: the file does not match its adapter_config.json")
        if not config.matches(name):
            raise ConfigError(f"adapter module {name!r} is not among target_modules {list(config.targets)}")
        state[name] = (a, b)
    if not state:
        raise ConfigError(f"{folder / WEIGHTS_FILE} holds no LoRA weights")
    return state, config
