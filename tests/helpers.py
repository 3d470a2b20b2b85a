"""Shared test helpers: tiny random HF models saved as engine folders, the real SmolLM2 (HF reference
and engine parts, loaded once per test process), and a recorder of every logit the engine computes."""
from __future__ import annotations

import functools

import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.setup import build_activation_pool, build_engine_parts

TINY_VOCAB = 256
TINY_EOS = 2


class NullTokenizer:
    """Stands in for a tokenizer where none is needed (requests use detokenize=False)."""
    eos_token_id = None

    def decode(self, ids, **kwargs) -> str:
        return ""


def _llama3_rope() -> dict:
    return {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


# name -> (HF config class name, kwargs); each differs in what it exercises
TINY_CONFIGS = {
    "llama-untied-gqa1": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=4,
                                              tie_word_embeddings=False)),
    "llama-tied-gqa4-bias": ("LlamaConfig", dict(num_attention_heads=8, num_key_value_heads=2,
                                                 tie_word_embeddings=True, attention_bias=True,
                                                 mlp_bias=True)),
    "llama3-rope": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=False, rope_parameters=_llama3_rope(),
                                        max_position_embeddings=512)),
    "qwen2-tied-gqa4": ("Qwen2Config", dict(num_attention_heads=8, num_key_value_heads=2,
                                            tie_word_embeddings=True,
                                            rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "mistral-gqa4-headdim": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                                                   tie_word_embeddings=False, sliding_window=512)),
}


def tiny_hf_config(name: str):
    import transformers
    cls_name, kwargs = TINY_CONFIGS[name]
    base = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=TINY_EOS,
                pad_token_id=0)
    base.update(kwargs)
    return getattr(transformers, cls_name)(**base)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that every component moves the logits; norms and biases not ones/zeros."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.3 * noise)
        elif name.endswith("bias"):
            p.copy_(0.3 * noise)
        elif "embed_tokens" in name:
            p.copy_(0.3 * noise)
        else:
            p.copy_(noise / p.shape[-1] ** 0.5 * 1.5)


def make_tiny_model(name: str, path, seed: int = 0):
    """Create the HF model for `name` with fixed random weights, save it to `path`; return the model."""
    from transformers import AutoModelForCausalLM
    config = tiny_hf_config(name)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    randomize(model, seed)
    model.save_pretrained(str(path), safe_serialization=True)
    return model


def tiny_engine(path, **overrides) -> LLMEngine:
    """An engine over a saved tiny model (no tokenizer files: a NullTokenizer)."""
    from transformers import AutoConfig
    values = dict(model=str(path), device="cpu", dtype="float32", num_kv_blocks=64, block_size=4)
    values.update(overrides)
    config = EngineConfig(**values)
    parts = build_engine_parts(config, hf_config=AutoConfig.from_pretrained(str(path)),
                               tokenizer=NullTokenizer())
    return LLMEngine(config, parts, build_activation_pool(config, parts))


@torch.no_grad()
def hf_logits(model, token_ids: list[int]) -> torch.Tensor:
    """HF logits [L, V] (fp32) of one unpadded sequence."""
    return model(input_ids=torch.tensor([token_ids])).logits[0].float()


class LogitRecorder:
    """Wraps an engine's runner: records, for every token the engine computes (any chunk, any step),
    the full logits row keyed by (sequence, position). The hook stays on the model: use it only with
    an engine that owns its model (tiny_engine), never with the shared SmolLM2 weights."""

    def __init__(self, engine: LLMEngine):
        self.rows: list[tuple[object, int, torch.Tensor]] = []
        self.num_steps = 0
        runner, model = engine.runner, engine.runner.model
        self._pending: list[tuple[object, int]] = []
        original = runner.execute

        def execute(batch, capture=None):
            self._pending = [(s, s.num_computed_tokens + j)
                             for s, n in zip(batch.seqs, batch.num_new_tokens) for j in range(n)]
            self.num_steps += 1
            return original(batch, capture)

        def hook(module, args, hidden):
            logits = model.compute_logits(hidden).float()
            assert logits.shape[0] == len(self._pending)
            for (seq, pos), row in zip(self._pending, logits):
                self.rows.append((seq, pos, row.clone()))

        runner.execute = execute
        model.register_forward_hook(hook)


# -- the real SmolLM2 ---------------------------------------------------------------------------

SMOL_PROMPTS = [
    "Hi!",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers greater than ten and explain briefly why each one is prime.",
    "Explain gravity to a child.",
    "Translate 'good morning' into Spanish, French and German.",
    "Give me a short recipe for pancakes with exactly four ingredients, and say how long to cook them.",
    "Why is the sky blue?",
    "Name a famous painter.",
]


@functools.lru_cache(maxsize=None)
def smollm2():
    """(model folder, tokenizer, HF model fp32 eval) of the embedded SmolLM2-135M-Instruct."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from engine.embedded_model import ensure_default_model
    path = ensure_default_model()
    tok = AutoTokenizer.from_pretrained(str(path))
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return str(path), tok, hf


def chat_ids(tok, text: str) -> list[int]:
    prompt = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                     tokenize=False)
    return tok(prompt, add_special_tokens=False).input_ids


@functools.lru_cache(maxsize=None)
def _smollm2_parts():
    path, tok, _ = smollm2()
    return build_engine_parts(EngineConfig(model=path, device="cpu", dtype="float32"), tokenizer=tok)


def smollm2_engine(**overrides) -> LLMEngine:
    """A fresh engine (own KV cache, activation pool and scheduler) sharing the once-loaded SmolLM2
    weights."""
    path, _, _ = smollm2()
    values = dict(model=path, device="cpu", dtype="float32", num_kv_blocks=96, block_size=16)
    values.update(overrides)
    config = EngineConfig(**values)
    parts = _smollm2_parts()
    return LLMEngine(config, parts, build_activation_pool(config, parts))


@torch.no_grad()
def hf_greedy(hf, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, len(prompt):].tolist()


def pack_bases(model) -> None:
    """What engine/setup and then apply_lora do on CUDA (q|k|v and gate|up weights in one buffer, and
    their adapters' factors too), here after LoRA was applied."""
    from engine.packing import pack_model, pack_model_lora
    pack_model(model)
    pack_model_lora(model)


def go_live(engine: LLMEngine, offer) -> None:
    """Offer an adapter version to `engine` and pass a step boundary: it serves from now on."""
    engine.offer_adapter(offer)
    engine.apply_adapter_offer()
