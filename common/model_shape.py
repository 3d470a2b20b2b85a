"""Shape facts of an HF decoder config that engine/ and store/ both read (one formula each)."""
from __future__ import annotations


def head_dim(hf_config) -> int:
    """Width of one attention head: the config's `head_dim` where it sets one (Mistral, Qwen3), else
    hidden_size / num_attention_heads."""
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
