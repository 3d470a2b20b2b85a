"""The compiled training layer (trainer.compiled_layer): the same step as the eager one, and one graph for
every layer after the first. CPU, with torch.compile's `aot_eager` backend (dynamo tracing and
AOTAutograd's forward/backward split, without code generation); the GPU test runs it under Inductor."""
import pytest
import torch

import trainer.check_grad as check_grad
from trainer.check_grad import adapted_engine, compare, serve_records, train_once
from tests.helpers import pack_bases
from trainer.compiled_layer import PROJECTION_CALLS, CompiledLayers
from trainer.lora import ALL_PROJECTIONS, LoRAConfig


@pytest.mark.parametrize("model,capture,reuse,checkpoint,packed", [
    ("tiny-llama", "prefill+decode", True, False, False),   # every row injected
    ("tiny-qwen2", "prefill", True, False, False),     # prompt rows injected, response rows multiplied; bias, GQA
    ("tiny-qwen2", "prefill", False, False, True),     # recompute; q|k|v and gate|up packed, some without LoRA
    ("tiny-llama", "prefill+decode", True, True, True),     # checkpointed layers gather their rows again
])
def test_compiled_layers_give_the_eager_step(model, capture, reuse, checkpoint, packed):
    targets = ("q_proj", "v_proj", "up_proj", "down_proj") if packed else ALL_PROJECTIONS
    engine, manager = adapted_engine(model, capture, 0, torch.Generator().manual_seed(0),
                                     lora=LoRAConfig(rank=4, alpha=8, targets=targets))
    if packed:                                             # as engine/setup does on CUDA
        pack_bases(engine.runner.model)
    records = serve_records(engine, 0)
    eager, g_eager = train_once(engine, manager, records, reuse, 0, checkpoint)
    compiled, g_compiled = train_once(engine, manager, records, reuse, 0, checkpoint,
                                      compiled=CompiledLayers("aot_eager"))
    assert compiled.outcomes == eager.outcomes and compiled.reused_rows == eager.reused_rows
    assert (compiled.reused_rows > 0) == reuse
    assert abs(compiled.loss - eager.loss) < 1e-6
    assert compare(g_compiled, g_eager)["max_rel_err"] < 1e-5


def test_one_graph_serves_every_layer_after_the_first(monkeypatch):
    """Nothing in the graph is looked up by layer or module, so a 4-layer model compiles twice (the
    first layer, whose input needs no grad, and the rest) and a second step compiles nothing."""
    from torch._dynamo.utils import counters
    tiny = check_grad.tiny_hf_config

    def four_layers(name):
        config = tiny(name)
        config.num_hidden_layers = 4
        return config
    monkeypatch.setattr(check_grad, "tiny_hf_config", four_layers)
    torch._dynamo.reset()                     # graphs compiled by earlier tests would be cache hits
    engine, manager = adapted_engine("tiny-llama", "prefill+decode", 0, torch.Generator().manual_seed(0))
    pack_bases(engine.runner.model)                        # per-layer packed buffers are graph inputs too
    records = serve_records(engine, 0)
    compiled = CompiledLayers("aot_eager")
    graphs = []
    for _ in range(2):
        before = counters["stats"]["unique_graphs"]
        result, _ = train_once(engine, manager, records, True, 0, compiled=compiled)
        graphs.append(counters["stats"]["unique_graphs"] - before)
    assert result.reused_rows > 0 and len(engine.runner.model.model.layers) == 4
    assert graphs == [2, 0]


def test_projection_calls_are_the_models():
    """The kinds a Llama-family layer passes to ctx.project, which the layer context is keyed by."""
    assert PROJECTION_CALLS == (("q", "k", "v"), ("gate", "up"), ("o",), ("down",))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_injected_linear_with_fresh_rows_traces_the_eager_gradient(backend):
    """Some rows injected, the rest multiplied, under torch.compile: the same y and dX as eager. Under
    torch 2.11 the in-place row writes gave dX 6% off (loss right) on CPU and CUDA alike; the
    traced path (in_place False) builds y out of place."""
    import torch.nn.functional as F
    from engine.layers import compile_fused
    from trainer.reuse import InjectedLinear
    g = torch.Generator().manual_seed(0)
    x0, weight, bias, a = (torch.randn(*shape, generator=g) for shape in ((37, 64), (96, 64), (96,), (4, 64)))
    order = torch.randperm(37, generator=g)
    stored_idx, fresh_idx = order[:25].sort().values, order[25:].sort().values
    stored = F.linear(x0[stored_idx], weight, bias)                           # [25, 96]

    def loss(x, in_place):
        y = InjectedLinear.apply(x, weight, bias, stored, stored_idx, fresh_idx, in_place)   # [37, 96]
        return (y + F.linear(x, a).sum(-1, keepdim=True)).square().sum()
    torch._dynamo.reset()
    results = []
    for fn, in_place in ((loss, True), (compile_fused(loss, backend=backend), False)):
        x = x0.clone().requires_grad_(True)
        value = fn(x, in_place)
        results.append((value.detach(), torch.autograd.grad(value, (x,))[0]))
    (eager, dx_eager), (traced, dx_traced) = results
    assert abs(float(traced - eager)) <= 1e-6 * abs(float(eager))
    assert float((dx_traced - dx_eager).norm() / dx_eager.norm()) < 1e-5   # the bug: 5.6e-2


def test_warm_up_compiles_the_layer_graphs_of_recompute_mixed_and_injected_steps():
    """trainer.step.warm_up with a CompiledLayers compiles, before serving, the graphs a step meets:
    recompute, multiplied rows beside injected ones (prefill capture) and every row injected
    (prefill+decode); its scratch pool record is gone afterwards. (The CPU's per-record attention also
    specialises on the number of records: the steps here use the warm-up's.)"""
    from torch._dynamo.utils import counters
    from trainer.step import forward_backward, warm_up
    torch._dynamo.reset()
    served = {}
    for capture in ("prefill", "prefill+decode"):
        engine, manager = adapted_engine("tiny-llama", capture, 0, torch.Generator().manual_seed(0))
        served[capture] = (engine, manager, serve_records(engine, 0))
    engine, manager, _ = served["prefill"]
    pool, compiled = engine.activation_pool, CompiledLayers("aot_eager")
    free, model = pool.num_free_blocks, engine.runner.model
    before = counters["stats"]["unique_graphs"]
    warm_up(model, manager.training_adapters(manager.masters(engine.adapter_version)), engine.hf_config.vocab_size, engine.device,
            pool, compiled)
    assert counters["stats"]["unique_graphs"] - before >= 6         # 3 kinds of step x (first layer, rest)
    assert pool.num_free_blocks == free and pool.get(("alchemist-warm-up", 0)) is None
    for capture, records in (("prefill", lambda r: r[:2]), ("prefill+decode", lambda r: r[:1])):
        engine, manager, all_records = served[capture]
        before = counters["stats"]["unique_graphs"]
        live = engine.adapter_version
        result = forward_backward(engine.runner.model, records(all_records), manager.training_adapters(
            manager.masters(live)), pool=engine.activation_pool, trainer_version=live, compiled=compiled)
        assert result.reused_rows > 0 and (result.computed_rows > 0) == (capture == "prefill")
        assert counters["stats"]["unique_graphs"] == before, capture
