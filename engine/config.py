"""Engine configuration as dataclasses that reject bad combinations with a message saying what to change."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

from common.errors import ConfigError

CAPTURE_MODES = ("none", "prefill", "prefill+decode")   # which rows are recorded (engine/capture.py)
LORA_KERNELS = ("torch", "triton", "folded")   # how serving adds LoRA (engine/packing.py, engine/kernels/lora.py)


def alchemist_home() -> Path:
    return Path(os.environ.get("ALCHEMIST_HOME", Path.home() / ".cache" / "alchemist"))


@dataclass
class EngineConfig:
    model: str = ""                      # folder with config.json, *.safetensors, tokenizer files
    load_format: str = "safetensors"     # safetensors | random (benchmarks: speed does not depend on values)
    device: str = "auto"                 # auto | cpu | cuda
    dtype: str = "auto"                  # auto (fp32 on CPU, bf16 on CUDA) | float32 | bfloat16 | float16
    block_size: int = 16                 # tokens per KV block
    num_kv_blocks: int | None = None     # None: derived from kv_cache_memory_fraction / kv_cache_bytes
    kv_cache_bytes: int | None = None
    kv_cache_memory_fraction: float = 0.85   # of free device memory after weights (CUDA)
    max_num_seqs: int = 256              # running sequences at most
    max_num_batched_tokens: int = 2048   # per-step token budget (chunked prefill)
    max_model_len: int | None = None     # None: min(model max positions, 8192)
    enable_prefix_caching: bool = True
    enforce_eager: bool = False          # no CUDA graphs for decode
    cuda_graph_max_batch: int = 128
    capture: str = "prefill"             # none | prefill | prefill+decode: activations kept for training
    capture_fraction: float = 1.0        # share of requests recorded (deterministic in the request id)
    # where eager (prompt) steps copy captured rows into the pool on CUDA: "serving" = in order on the
    # serving stream; "side" = on a side stream that overlaps the copies with the next GEMMs (joined
    # before the step ends). Decode CUDA graphs always copy in order.
    capture_stream: str = "serving"
    activation_pool_bytes: int | None = None        # None: 1 GiB on CPU, a fraction of free memory on CUDA
    activation_pool_memory_fraction: float = 0.1    # of free device memory (CUDA), taken before the KV cache
    activation_pool_cpu_bytes: int = 0              # pinned-CPU tier for evicted records (0 = drop)
    # a captured record still unrated this long after serving is evicted first, dropped (0 = no window)
    feedback_window_s: float = 300.0
    seed: int = 0
    # how serving adds a projection group's LoRA: "torch" = two GEMMs (x @ A^T, then addmm with the
    # block-diagonal B); "triton" = one shrink and one in-place expand launch per group (CUDA, bf16);
    # "folded" = A's rows appended to the base weight, so one GEMM yields [y | x @ A^T], then the expand
    lora_kernel: str = "torch"
    # prepare step N+1 on the host while step N runs on the device; outputs come one step later
    # (engine/overlap.py). Off until measured on the GPU.
    overlap_scheduling: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size={self.block_size}: use a power of two such as 16")
        if self.max_num_seqs < 1:
            raise ConfigError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ConfigError("max_num_batched_tokens must be >= 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device={self.device!r}: use auto, cpu or cuda")
        if self.dtype not in ("auto", "float64", "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype={self.dtype!r}: use auto, float32, bfloat16, float16 (or float64 for checks)")
        if not 0.0 < self.kv_cache_memory_fraction <= 0.95:
            raise ConfigError("kv_cache_memory_fraction must be in (0, 0.95]")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ConfigError("num_kv_blocks must be >= 1 (or leave it unset to size from memory)")
        if self.capture not in CAPTURE_MODES:
            raise ConfigError(f"capture={self.capture!r}: use one of {CAPTURE_MODES}")
        if self.capture_stream not in ("serving", "side"):
            raise ConfigError(f"capture_stream={self.capture_stream!r}: use serving or side")
        if not 0.0 <= self.capture_fraction <= 1.0:
            raise ConfigError("capture_fraction must be in [0, 1]")
        if not 0.0 < self.activation_pool_memory_fraction < 0.9:
            raise ConfigError("activation_pool_memory_fraction must be in (0, 0.9)")
        if self.feedback_window_s < 0:
            raise ConfigError(f"feedback_window_s={self.feedback_window_s}: use seconds >= 0 (0 = no window)")
        if self.lora_kernel not in LORA_KERNELS:
            raise ConfigError(f"lora_kernel={self.lora_kernel!r}: use one of {LORA_KERNELS} (torch: today's "
                              "two GEMMs; triton: fused kernels; folded: shrink folded into the base GEMM)")
        if not isinstance(self.overlap_scheduling, bool):
            raise ConfigError(f"overlap_scheduling={self.overlap_scheduling!r}: use true or false")
        if self.overlap_scheduling and self.capture == "prefill+decode":
            raise ConfigError("overlap_scheduling with capture=prefill+decode: every step records decode rows, "
                              "so no step could overlap; use capture=prefill (or none), or overlap_scheduling=false")
        if self.load_format not in ("safetensors", "random"):
            raise ConfigError(f"load_format={self.load_format!r}: use safetensors or random")

    @classmethod
    def from_dict(cls, values: dict) -> "EngineConfig":
        moved = sorted(set(values) & {"max_waiting", "served_model_name"})
        if moved:
            raise ConfigError(f"engine option(s) {moved} are server options now: put them at the top level "
                              "of the config file")
        return from_known_dict(cls, values, "engine")


def from_known_dict(cls, values: dict, section: str):
    """Build a config dataclass from a dict; unknown keys are an error that lists the known ones."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown {section} option(s) {unknown}; known: {sorted(known)}")
    return cls(**values)
