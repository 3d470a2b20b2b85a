"""Llama-family decoder (Llama incl. llama3 rope scaling, Mistral, Qwen2) with HF parameter names.

Projections are plain `nn.Linear` modules so adapters can wrap them; the model never decides
grad mode or device placement — the runner does.
"""
from __future__ import annotations

import torch
from torch import nn

from common.errors import ConfigError
from common.model_shape import head_dim
from engine.context import ForwardContext
from engine.layers import add_rms_norm, rms_norm, rope, silu_mul

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.variance_epsilon)


def rope_parameters(config) -> dict:
    params = getattr(config, "rope_parameters", None)
    if params:
        return dict(params)
    params = dict(getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_type", params.pop("type", "default"))
    params["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    return params


class RotaryEmbedding(nn.Module):
    """cos/sin cache [max_positions, head_dim] in fp32, indexed by position."""

    def __init__(self, config, head_dim: int, max_positions: int):
        super().__init__()
        params = rope_parameters(config)
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
            inv_freq, scaling = 1.0 / (params["rope_theta"] ** exponents), 1.0
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
            if rope_type not in ("linear", "llama3"):
                raise ConfigError(f"rope_type {rope_type!r} is not supported: use default, linear or llama3")
            # device None: the ambient default device (meta inside build_empty; an explicit cpu
            # there would copy out of a meta tensor and fail)
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None)
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq.float())                  # [P, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)                            # [P, d]
        self.register_buffer("cos_cache", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin_cache", emb.sin() * scaling, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q: [T, n_heads, d], k: [T, n_kv, d] rotated at `positions` [T]."""
        return rope(q, k, positions, self.cos_cache, self.sin_cache)


class LlamaAttention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim(config)
        self.scale = self.head_dim ** -0.5
        qkv_bias = config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
        o_bias = bool(getattr(config, "attention_bias", False)) and config.model_type != "qwen2"
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=o_bias)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
                ctx: ForwardContext) -> torch.Tensor:
        t = x.shape[0]                                                     # x: [T, h]
        q, k, v = ctx.project(self.layer_idx, ("q", "k", "v"), (self.q_proj, self.k_proj, self.v_proj), x)
        q = q.view(t, self.num_heads, self.head_dim)                       # q: [T, n_heads, d]
        k = k.view(t, self.num_kv_heads, self.head_dim)                    # k: [T, n_kv, d]
        v = v.view(t, self.num_kv_heads, self.head_dim)
        q, k = rotary(positions, q, k)
        o = ctx.attention(self.layer_idx, q, k, v, self.scale)             # o: [T, n_heads, d]
        return ctx.project(self.layer_idx, ("o",), (self.o_proj,), o.reshape(t, self.num_heads * self.head_dim))[0]


class LlamaMLP(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        bias = bool(getattr(config, "mlp_bias", False))
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        gate, up = ctx.project(self.layer_idx, ("gate", "up"), (self.gate_proj, self.up_proj), x)
        return ctx.project(self.layer_idx, ("down",), (self.down_proj,), silu_mul(gate, up))[0]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, positions, rotary, ctx):
        attn_out = self.self_attn(self.input_layernorm(x), positions, rotary, ctx)
        norm = self.post_attention_layernorm
        x, h = add_rms_norm(x, attn_out, norm.weight, norm.variance_epsilon)
        return x + self.mlp(h, ctx)


class LlamaModel(nn.Module):
    def __init__(self, config, max_positions: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config, head_dim(config), max_positions)

    def forward(self, input_ids, positions, ctx):
        x = self.embed_tokens(input_ids)                                   # x: [T, h]
        for layer in self.layers:
            x = ctx.call_layer(layer, x, positions, self.rotary_emb, ctx)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config, max_positions: int):
        super().__init__()
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"model_type {config.model_type!r} is not supported: use one of {SUPPORTED_MODEL_TYPES}")
        self.config = config
        self.model = LlamaModel(config, max_positions)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, h]."""
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)                                        # [N, vocab]
