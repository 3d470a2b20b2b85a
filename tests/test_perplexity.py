"""The held-out perplexity tool computes HF's perplexity, with and without an adapter."""
import math

import pytest
import torch

from trainer.heldout import HELDOUT_TEXTS
from trainer.perplexity import perplexity


@pytest.fixture(scope="module")
def smollm2():
    from engine.config import EngineConfig
    from engine.embedded_model import ensure_default_model
    from engine.setup import build_engine_parts
    path = str(ensure_default_model())
    return path, build_engine_parts(EngineConfig(model=path, capture="none"))


def test_matches_hf_perplexity(smollm2):
    from transformers import AutoModelForCausalLM
    path, parts = smollm2
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    texts = HELDOUT_TEXTS[:4]
    nll, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = parts.tokenizer(text, add_special_tokens=False).input_ids
            loss = hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss
            nll += float(loss) * (len(ids) - 1)
            count += len(ids) - 1
    ours = perplexity(parts.model, parts.tokenizer, texts)
    assert abs(ours - math.exp(nll / count)) / ours < 1e-4


def test_adapter_changes_perplexity_only_when_nonzero(smollm2):
    _, parts = smollm2
    layer = parts.model.model.layers[0].self_attn.q_proj
    gen = torch.Generator().manual_seed(0)           # not the global RNG: other tests move it
    a = torch.randn(4, layer.in_features, generator=gen) * 0.1
    zero = {layer: (a, torch.zeros(layer.out_features, 4), 2.0)}
    big = {layer: (a, torch.randn(layer.out_features, 4, generator=gen), 2.0)}
    base = perplexity(parts.model, parts.tokenizer, HELDOUT_TEXTS[:2])
    assert perplexity(parts.model, parts.tokenizer, HELDOUT_TEXTS[:2], zero) == pytest.approx(base, rel=1e-6)
    assert abs(perplexity(parts.model, parts.tokenizer, HELDOUT_TEXTS[:2], big) - base) / base > 1e-3


def test_compare_reads_the_latest_checkpoint(smollm2, tmp_path):
    """`alchemist perplexity`: a checkpointed adapter with B = 0 leaves perplexity unchanged."""
    from trainer.adapters import AdapterManager
    from trainer.checkpoint import save_checkpoint
    from trainer.lora import LoRAConfig
    from trainer.perplexity import compare
    path, _ = smollm2
    from engine.config import EngineConfig
    from engine.setup import build_engine_parts
    model = build_engine_parts(EngineConfig(model=path, capture="none")).model
    lora = LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"))
    manager = AdapterManager(model, lora)
    save_checkpoint(tmp_path, manager.state(0), lora, {}, {"version": 3, "step": 1}, path)
    result = compare(path, tmp_path, None)
    assert result["version"] == 3
    assert result["ratio"] == pytest.approx(1.0, rel=1e-6)


def test_largest_increases_sums_per_token_changes(smollm2):
    """The diagnostic's total is the summed per-token NLL change, i.e. consistent with perplexity."""
    from trainer.perplexity import largest_increases
    _, parts = smollm2
    layer = parts.model.model.layers[0].self_attn.q_proj
    big = {layer: (torch.randn(4, layer.in_features) * 0.1, torch.randn(layer.out_features, 4), 2.0)}
    texts = HELDOUT_TEXTS[:2]
    out = largest_increases(parts.model, parts.tokenizer, big, top=3, texts=texts)
    count = sum(len(parts.tokenizer(t, add_special_tokens=False).input_ids) - 1 for t in texts)
    base = perplexity(parts.model, parts.tokenizer, texts)
    adapted = perplexity(parts.model, parts.tokenizer, texts, big)
    assert out["total_nll_increase"] / count == pytest.approx(math.log(adapted / base), rel=1e-4, abs=1e-6)
    assert out["base_ppl"] == pytest.approx(base, rel=1e-6) and out["adapted_ppl"] == pytest.approx(adapted, rel=1e-6)
    assert len(out["top"]) == 3 and out["top"][0]["delta"] >= out["top"][-1]["delta"]
