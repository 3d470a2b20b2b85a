"""Packed projections in serving (engine/packing.py): q|k|v and gate|up as one GEMM each, and their
adapters as one A and one block-diagonal B per group — the same outputs and captured rows as separate
adapters, in fewer GEMMs; publishing a version writes the packed factors."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine.packing import pack_model, packed_lora
from engine.sampling_params import SamplingParams
from store.pool_layout import KINDS
from tests.helpers import pack_bases
from trainer.check_grad import adapted_engine, perturb


class GemmCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.linear):
            self.count += 1
        return func(*args, **(kwargs or {}))


def served(model: str, pack_adapters: bool):
    """An engine with adapters (version 1), bases packed, adapters packed or not; then version 2 published
    (into the packed factors where packed) and three prompts served greedily."""
    gen = torch.Generator().manual_seed(0)
    engine, manager = adapted_engine(model, "prefill", 0, gen)
    (pack_bases if pack_adapters else pack_model)(engine.runner.model)
    perturb(engine, manager, gen)                    # version 2
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, detokenize=False, logprobs=0)
    prompts = [[(7 * i + 3 * j) % 200 + 3 for j in range(n)] for i, n in enumerate((5, 23, 40))]
    return engine, [s[0] for s in engine.generate(prompts, params)]


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2"])
def test_packed_adapters_serve_and_capture_what_separate_adapters_do(model):
    (plain, plain_seqs), (packed, packed_seqs) = served(model, False), served(model, True)
    layer = packed.runner.model.model.layers[0]
    assert packed_lora((layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)) is not None
    assert packed_lora((layer.mlp.gate_proj, layer.mlp.up_proj)) is not None
    first = plain.runner.model.model.layers[0]
    assert packed_lora((first.self_attn.q_proj, first.self_attn.k_proj, first.self_attn.v_proj)) is None
    for a, b in zip(plain_seqs, packed_seqs):
        assert a.output_token_ids == b.output_token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5
        for index in range(2):
            for kind in KINDS:               # the pool holds base outputs, without the adapter
                torch.testing.assert_close(packed.activation_pool.gather(b.record_key, index, kind),
                                           plain.activation_pool.gather(a.record_key, index, kind))


def test_a_packed_group_runs_its_adapters_in_two_gemms():
    """Per layer, separate adapters take 2 GEMMs per projection after the base GEMM; packed, q|k|v's
    three and gate|up's two take 2 each: 6 fewer GEMMs per layer."""
    counts = []
    for pack_adapters in (False, True):
        gen = torch.Generator().manual_seed(0)
        engine, _ = adapted_engine("tiny-llama", "none", 0, gen)
        (pack_bases if pack_adapters else pack_model)(engine.runner.model)
        engine.add_request("r", list(range(3, 30)), SamplingParams(max_tokens=1, detokenize=False))
        with GemmCounter() as counter:
            engine.step()
        counts.append(counter.count)
    layers = len(engine.runner.model.model.layers)
    assert counts[0] - counts[1] == 6 * layers, counts
