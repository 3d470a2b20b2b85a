"""What a composition root (server state, check-grad, benchmarks, tests) builds an engine from:
device/dtype, config, tokenizer and weights (`build_engine_parts`), and the activation pool that it
hands to the engine (`build_activation_pool`: store/'s pool for this model, sized by the engine
config); `num_kv_blocks` sizes the KV cache when the engine is made, after the pool took its memory."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import EngineConfig
from common.errors import ConfigError
from engine.loader import build_empty, init_random, load_safetensors
from engine.model_runner import ModelRunner
from engine.packing import pack_model
from store.activation_pool import ActivationPool
from store.pool_layout import PoolLayout

log = logging.getLogger("alchemist.engine")

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_CPU_KV_BYTES = 1 << 30
DEFAULT_CPU_POOL_BYTES = 1 << 30


@dataclass
class EngineParts:
    hf_config: object
    tokenizer: object
    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    max_model_len: int
    eos_token_ids: set[int]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible: use device=cpu or auto")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def generation_eos_id(model_dir: str):
    """eos_token_id of the folder's generation_config.json (what HF generate stops on), if any."""
    path = Path(model_dir) / "generation_config.json"
    if not model_dir or not path.is_file():
        return None
    return json.loads(path.read_text()).get("eos_token_id")


def eos_ids(hf_config, tokenizer, generation_eos=None) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(hf_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None),
                   generation_eos):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return ids


def max_model_len_for(config: EngineConfig, hf_config) -> int:
    limit = getattr(hf_config, "max_position_embeddings", 8192)
    window = getattr(hf_config, "sliding_window", None)
    if window and getattr(hf_config, "use_sliding_window", True) and hf_config.model_type == "mistral":
        limit = min(limit, window)      # within the window, full attention is exact
    if config.max_model_len is None:
        return min(limit, 8192)
    if config.max_model_len > limit:
        raise ConfigError(f"max_model_len={config.max_model_len} exceeds the model's {limit}: lower it")
    return config.max_model_len


def memory_budget(configured: int | None, fraction: float, device: torch.device, cpu_default: int) -> int:
    """Bytes for a cache: as configured, else a fraction of free device memory (CUDA) or a CPU default."""
    if configured is not None:
        return configured
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * fraction)
    return cpu_default


def num_kv_blocks(config: EngineConfig, hf_config, device: torch.device, dtype: torch.dtype) -> int:
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    per_block = ModelRunner.kv_bytes_per_block(hf_config, config.block_size, dtype)
    budget = memory_budget(config.kv_cache_bytes, config.kv_cache_memory_fraction, device, DEFAULT_CPU_KV_BYTES)
    blocks = budget // per_block
    if blocks < 2:
        raise ConfigError(f"the KV cache budget of {budget} bytes holds {blocks} blocks: raise kv_cache_bytes")
    log.info("engine: %d KV blocks of %d tokens", blocks, config.block_size)
    return int(blocks)


def build_engine_parts(config: EngineConfig, hf_config=None, tokenizer=None) -> EngineParts:
    from transformers import AutoConfig, AutoTokenizer
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if hf_config is None:
        if not config.model:
            raise ConfigError("no model given: set model to a folder with config.json and safetensors")
        hf_config = AutoConfig.from_pretrained(config.model)
    if tokenizer is None and config.model:
        tokenizer = AutoTokenizer.from_pretrained(config.model)
    max_len = max_model_len_for(config, hf_config)
    model = build_empty(hf_config, max_len, device, dtype)
    if config.load_format == "random":
        init_random(model, config.seed)
    else:
        load_safetensors(model, config.model)
    model.eval().requires_grad_(False)     # base weights are frozen; adapters train on their own masters
    if device.type == "cuda":
        pack_model(model)          # q|k|v and gate|up as one GEMM each (same memory, same names)
    log.info("engine: %s on %s/%s, max_model_len %d", hf_config.model_type, device, dtype, max_len)
    eos = eos_ids(hf_config, tokenizer, generation_eos_id(config.model))
    return EngineParts(hf_config, tokenizer, model, device, dtype, max_len, eos)


def build_activation_pool(config: EngineConfig, parts: EngineParts) -> ActivationPool | None:
    """The activation pool a composition root hands to `LLMEngine` (None when capture is off): every
    projection of the model (store/'s layout), in `activation_pool_bytes` (else a share of free device
    memory, 1 GiB on the CPU). Build it before the engine: the KV cache is sized from what is left."""
    if config.capture == "none":
        return None
    budget = memory_budget(config.activation_pool_bytes, config.activation_pool_memory_fraction, parts.device,
                           DEFAULT_CPU_POOL_BYTES)
    layout = PoolLayout.for_model(parts.hf_config, parts.dtype, parts.device)
    return ActivationPool(layout, budget, config.block_size, config.activation_pool_cpu_bytes,
                          feedback_window_s=config.feedback_window_s)
