"""Online-training configuration (the server config's "training" object)."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.config import from_known_dict
from common.errors import ConfigError
from trainer.buckets import check_buckets

OBJECTIVES = ("sft", "kto", "pg")
CONCURRENCY = ("auto", "thread", "interleaved")
COMPILE_BACKENDS = ("inductor", "aot_eager")
DEFAULT_DUTY_THREAD, DEFAULT_DUTY_INTERLEAVED = 0.25, 0.5


@dataclass
class TrainerConfig:
    enabled: bool = True
    objective: str = "pg"               # sft | kto | pg (DESIGN §4); pg: best rate per perplexity rise in our CPU runs
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"])
    lr: float = 3e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_update_norm: float | None = None   # cap on ||adapter_after - adapter_before|| per step
    step_tokens: int = 2048             # token budget of one training step
    max_records_per_step: int = 16
    min_records_per_step: int = 8       # wait for this many ratings before a step ...
    max_wait_s: float = 20.0            # ... or until the first of them has waited this long
    max_staleness: int = 4              # adapter versions a record's activations may lag and still be reused
    # most of the wall time training steps may take while serving; None: 0.5 interleaved (CPU), on a
    # trainer thread 1.0 with the latency budget (tbt_slo_ratio) pacing it, else 0.25. Serving's TBT p99 at each: BENCHMARKS.md "What slows serving, and a smaller
    # duty cycle"; learning at 0.5: "Online learning in one process"
    duty_cycle: float | None = None
    # where steps run: "thread" = a trainer thread (on CUDA a low-priority stream beside serving's),
    # "interleaved" = on the engine thread between engine steps; "auto" = thread on CUDA, else interleaved
    concurrency: str = "auto"
    # thread mode: the latency budget (trainer/latency_budget.py). Training takes whatever time serving
    # leaves while serving's steps stay within this ratio of their length with training off (learned
    # from moments without training); full speed while nothing is served. None: no budget, the fixed
    # duty cycle (0.25 by default) paces the thread instead
    tbt_slo_ratio: float | None = 1.15
    # thread mode: at each layer boundary (forward and backward) the trainer also waits while an engine
    # step computes at least this many prompt tokens; None: never wait (the latency budget decides)
    yield_prefill_tokens: int | None = None
    # thread mode on CUDA: the share of the GPU's SMs the trainer's kernels may use (a CUDA green
    # context; serving keeps the rest free for its kernels); None: all SMs, at the lowest stream priority
    sm_share: float | None = None
    # thread mode: the interpreter's thread switch interval while the trainer thread runs (CPython's
    # default is 5 ms): the engine thread waits at most this long for the GIL each time it needs it back.
    # Serving's TBT p99 with training on/off at 0.1 and 0.5: BENCHMARKS.md "A shorter GIL switch interval"
    switch_interval_ms: float = 0.1
    # each training layer's forward + backward as one torch.compile'd graph (trainer/compiled_layer.py),
    # compiled at start-up; its step time against eager and its compile time per graph variant (8B shape):
    # BENCHMARKS.md "Training on one H200", session 7. compile_backend "aot_eager" generates no code
    compile_layers: bool = False
    compile_backend: str = "inductor"
    # pad each step's batch to the smallest of these token counts that holds it (trainer/buckets.py): a
    # few fixed shapes that graphs replay; None: no padding. The largest must be >= step_tokens
    token_buckets: list[int] | None = None
    # CUDA only: each training layer's forward and backward as CUDA graphs, one set per token
    # bucket (token_buckets, or [step_tokens] when unset), captured at start-up (trainer/graphed_layers.py);
    # a step replays them when it injects no pool rows. Their memory: /v1/training/status "graphs"
    cuda_graphs: bool = False
    # reuse captured activations in training steps; false: recompute every row (with cuda_graphs, every
    # step then replays graphs). Which is faster at a model size: BENCHMARKS.md "Training on one H200"
    reuse: bool = True
    checkpoint_every: int = 10          # steps; also on shutdown
    # a rating whose step fails alone (after bisecting the failing step; trainer/isolation.py) while a
    # 12-token probe step succeeds is quarantined and training goes on; this many quarantined in a row,
    # with no step succeeding in between, look like a fault of the trainer, not of the ratings: training
    # pauses (an admin resumes it and retries the quarantined ones). None: never pause for this
    max_consecutive_quarantines: int | None = 8
    run_name: str = "default"
    kto_beta: float = 0.1
    pg_clip: float = 0.2
    baseline_momentum: float = 0.9
    prompt_lm_weight: float = 0.3       # weight of an NLL term on the users' message tokens (a language-model
                                        # anchor; 0 turns it off; BENCHMARKS.md "Online learning in one process")

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"training.objective={self.objective!r}: use one of {OBJECTIVES}")
        if self.lr <= 0 or self.max_grad_norm <= 0:
            raise ConfigError("training.lr and training.max_grad_norm must be positive")
        if self.max_update_norm is not None and self.max_update_norm <= 0:
            raise ConfigError("training.max_update_norm must be positive (or null for no cap)")
        if self.step_tokens < 16 or self.max_records_per_step < 1:
            raise ConfigError("training.step_tokens must be >= 16 and max_records_per_step >= 1")
        if not 1 <= self.min_records_per_step <= self.max_records_per_step or self.max_wait_s < 0:
            raise ConfigError(f"training.min_records_per_step={self.min_records_per_step} must be in "
                              f"[1, max_records_per_step={self.max_records_per_step}] and max_wait_s >= 0")
        if self.concurrency not in CONCURRENCY:
            raise ConfigError(f"training.concurrency={self.concurrency!r}: use one of {CONCURRENCY}")
        if self.yield_prefill_tokens is not None and self.yield_prefill_tokens < 1:
            raise ConfigError("training.yield_prefill_tokens must be >= 1 (or null to never yield)")
        if not 0.0 < self.switch_interval_ms <= 5.0:
            raise ConfigError("training.switch_interval_ms must be in (0, 5] (CPython's default is 5)")
        if self.tbt_slo_ratio is not None and not self.tbt_slo_ratio > 1.0:
            raise ConfigError("training.tbt_slo_ratio must be > 1 (serving's step time with training over "
                              "without it), or null for the fixed duty cycle")
        if self.sm_share is not None and not 0.0 < self.sm_share < 1.0:
            raise ConfigError("training.sm_share must be in (0, 1) (or null for all SMs at low priority)")
        if self.duty_cycle is not None and not 0.0 < self.duty_cycle <= 1.0:
            raise ConfigError("training.duty_cycle must be in (0, 1] (or null for the default of the mode)")
        if not (self.prompt_lm_weight >= 0):
            raise ConfigError("training.prompt_lm_weight must be >= 0 (0 turns the prompt LM term off)")
        if self.compile_backend not in COMPILE_BACKENDS:
            raise ConfigError(f"training.compile_backend={self.compile_backend!r}: use one of {COMPILE_BACKENDS}")
        if self.max_consecutive_quarantines is not None and self.max_consecutive_quarantines < 1:
            raise ConfigError("training.max_consecutive_quarantines must be >= 1 (or null: never pause for them)")
        check_buckets(self.token_buckets, self.step_tokens)
        if self.cuda_graphs and self.compile_layers:
            raise ConfigError("training.cuda_graphs and training.compile_layers are two ways to run the training "
                              "layers: set one of them to false")
        if self.checkpoint_every < 1 or self.max_staleness < 0:
            raise ConfigError("training.checkpoint_every must be >= 1 and max_staleness >= 0")
        if not self.run_name or "/" in self.run_name or self.run_name.startswith("."):
            raise ConfigError(f"training.run_name={self.run_name!r}: use a plain folder name")

    def duty_for(self, threaded: bool) -> float:
        if self.duty_cycle is not None:
            return self.duty_cycle
        if threaded and self.tbt_slo_ratio is not None:
            return 1.0                  # the latency budget paces the thread
        return DEFAULT_DUTY_THREAD if threaded else DEFAULT_DUTY_INTERLEAVED

    def step_buckets(self) -> list[int] | None:
        """The token counts a step is padded to: token_buckets, or [step_tokens] for cuda_graphs."""
        if self.token_buckets is None and self.cuda_graphs:
            return [self.step_tokens]
        return self.token_buckets

    @classmethod
    def from_dict(cls, values: dict) -> "TrainerConfig":
        return from_known_dict(cls, values, "training")
