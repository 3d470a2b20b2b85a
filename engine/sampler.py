"""Batched sampling on the device: penalties, temperature, top-k, top-p, min-p, seeded noise.

Randomness is a counter-based hash of (sequence seed, output index, token id), so a request with a
seed draws the same tokens whatever else shares its batch, with no per-request generator objects
and no host sync. Sampling uses the exponential race: argmax(p / E) with E ~ Exp(1) draws from p.
Returned logprobs are the model's raw log-softmax (temperature 1, no penalties) of the sampled token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash on int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _M32
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _M32
    return x ^ (x >> 16)


def exponential_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """seeds, steps: [B] int64 -> E: [B, V] float32, Exp(1) noise keyed by (seed, step, token)."""
    row = _mix32(_mix32(seeds & _M32) ^ ((steps * 0x9E3779B1) & _M32))             # [B]
    token = (torch.arange(vocab_size, device=seeds.device, dtype=torch.int64) * 0x85EBCA6B) & _M32
    bits = _mix32(_mix32(row[:, None] ^ token[None, :]) ^ row[:, None])           # [B, V]
    u = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))                  # (0, 1)
    return -torch.log(u)


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor            # [B] float32 (0 = greedy)
    top_p: torch.Tensor                  # [B] float32
    top_k: torch.Tensor                  # [B] int64 (vocab size = off)
    min_p: torch.Tensor                  # [B] float32
    seeds: torch.Tensor                  # [B] int64
    steps: torch.Tensor                  # [B] int64: output index of the token being drawn
    all_greedy: bool
    use_top_k: bool
    use_top_p: bool
    use_min_p: bool
    num_top_logprobs: int                # 0: none requested
    # penalties (None when no row uses them)
    presence_penalty: torch.Tensor | None = None    # [B]
    frequency_penalty: torch.Tensor | None = None   # [B]
    repetition_penalty: torch.Tensor | None = None  # [B]
    output_counts: torch.Tensor | None = None       # [B, V] float32: counts of generated tokens
    seen_mask: torch.Tensor | None = None           # [B, V] bool: token in prompt or output


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Repetition penalty first, on the model's own logits (HF/vLLM: their sign decides divide or
    multiply), then OpenAI's frequency and presence penalties over generated tokens (vLLM order)."""
    counts = meta.output_counts
    rp = meta.repetition_penalty[:, None].expand_as(logits)
    penalized = torch.where(logits > 0, logits / rp, logits * rp)
    logits = torch.where(meta.seen_mask, penalized, logits)
    logits = logits - meta.frequency_penalty[:, None] * counts
    return logits - meta.presence_penalty[:, None] * (counts > 0).float()


def _filter_top_k_top_p(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)             # [B, V]
    vocab = logits.shape[-1]
    if meta.use_top_k:
        kth = sorted_logits.gather(1, (meta.top_k.clamp(1, vocab) - 1)[:, None])  # [B, 1]
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if meta.use_top_p:
        probs = sorted_logits.softmax(dim=-1)
        cum_before = probs.cumsum(dim=-1) - probs                                 # mass before each token
        drop = cum_before >= meta.top_p[:, None]
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)


def sample(logits: torch.Tensor, meta: SamplingMetadata):
    """logits: [B, V] -> (token ids [B] int64, sampled logprobs [B], top ids/logprobs [B, k] or None)."""
    logits = logits.float()
    raw_logprobs = logits.log_softmax(dim=-1)
    x = apply_penalties(logits, meta) if meta.output_counts is not None else logits
    greedy_ids = x.argmax(dim=-1)
    if meta.all_greedy:
        ids = greedy_ids
    else:
        x = x / meta.temperature.clamp_min(1e-5)[:, None]
        if meta.use_top_k or meta.use_top_p:
            x = _filter_top_k_top_p(x, meta)
        probs = x.softmax(dim=-1)
        if meta.use_min_p:
            floor = meta.min_p[:, None] * probs.amax(dim=-1, keepdim=True)
            probs = probs.masked_fill(probs < floor, 0.0)
        noise = exponential_noise(meta.seeds, meta.steps, probs.shape[-1])
        ids = torch.where(meta.temperature == 0, greedy_ids, (probs / noise).argmax(dim=-1))
    sampled_logprobs = raw_logprobs.gather(1, ids[:, None]).squeeze(1)
    top = None
    if meta.num_top_logprobs > 0:
        top = raw_logprobs.topk(meta.num_top_logprobs, dim=-1)
    return ids, sampled_logprobs, top
