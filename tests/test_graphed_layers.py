"""Issue 17: the graphed training layers' bookkeeping on the CPU (capture=False runs the very functions a
CUDA graph captures, eagerly): a step that fills a bucket runs them and gives the eager step's loss and
gradients; steps that cannot replay fall back to eager and say why. The captured graphs themselves:
tests/test_gpu_graphed.py."""
import pytest
import torch

from common.errors import ConfigError
from trainer.check_grad import adapted_engine, serve_records
from trainer.config import TrainerConfig
from trainer.graphed_layers import GraphedLayers, check_graphs
from trainer.step import forward_backward


def _step(engine, masters, records, reuse, buckets, compiled=None):
    manager = masters.manager
    for pair in masters.values():
        for t in pair:
            t.grad = None
    result = forward_backward(engine.runner.model, records, manager.training_adapters(dict(masters)),
                              pool=engine.activation_pool, reuse=reuse, trainer_version=engine.adapter_version,
                              prompt_lm_weight=0.3, buckets=buckets, compiled=compiled)
    return result, torch.cat([t.grad.flatten() for pair in masters.values() for t in pair])


class Masters(dict):
    """The trainer's fp32 masters: the same tensors in every step (the graphs read them in place)."""

    def __init__(self, engine, manager):
        super().__init__(manager.masters(engine.adapter_version))
        self.manager = manager


def _graphs(engine, masters, buckets, max_segments=16):
    model = engine.runner.model
    adapters = masters.manager.training_adapters(masters)
    graphs = GraphedLayers(model, adapters, buckets, max_segments, capture=False)
    graphs.capture_all(engine.hf_config.hidden_size, torch.float32)
    return graphs


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2"])
def test_a_bucket_step_through_the_graph_functions_equals_the_eager_step(model):
    gen = torch.Generator().manual_seed(0)
    engine, manager = adapted_engine(model, "prefill", 0, gen)
    masters = Masters(engine, manager)
    records = serve_records(engine, 0)
    tokens = sum(r.num_inputs for r in records)
    buckets = [tokens + 21, tokens + 300]
    graphs = _graphs(engine, masters, buckets)
    eager, g_eager = _step(engine, masters, records, False, None)
    graphed, g_graphed = _step(engine, masters, records, False, buckets, graphs)
    assert graphs.replays == 1 and not graphs.fallbacks
    assert abs(graphed.loss - eager.loss) <= 1e-6 * abs(eager.loss)
    assert float((g_graphed - g_eager).norm() / g_eager.norm()) <= 1e-6
    # a smaller batch in the same bucket: the same functions, new positions and bounds
    graphed, g_graphed = _step(engine, masters, records[:3], False, buckets, graphs)
    eager, g_eager = _step(engine, masters, records[:3], False, None)
    assert graphs.replays == 2 and graphs.captures == 0      # capture=False: nothing is captured
    assert float((g_graphed - g_eager).norm() / g_eager.norm()) <= 1e-6


def test_steps_that_cannot_replay_run_eager_and_say_why():
    gen = torch.Generator().manual_seed(1)
    engine, manager = adapted_engine("tiny-llama", "prefill", 1, gen)
    masters = Masters(engine, manager)
    records = serve_records(engine, 1)
    tokens = sum(r.num_inputs for r in records)
    graphs = _graphs(engine, masters, [tokens + 5], max_segments=3)
    _step(engine, masters, records, False, [tokens + 5], graphs)         # 6 records + padding > 3 segments
    _step(engine, masters, records[:1], False, None, graphs)            # unpadded: not a bucket
    reused, _ = _step(engine, masters, records[:2], True, [tokens + 5], graphs)   # pool rows injected
    assert reused.reused_rows > 0
    assert graphs.replays == 0
    assert graphs.fallbacks == {"too_many_records": 1, "not_a_bucket": 1, "injected_rows": 1}
    assert graphs.status()["eager_steps"]["injected_rows"] == 1


def test_graphs_are_configured_with_what_they_need():
    with pytest.raises(ConfigError, match="compile_layers"):
        TrainerConfig(cuda_graphs=True, compile_layers=True)
    with pytest.raises(ConfigError, match="CUDA"):
        check_graphs(TrainerConfig(cuda_graphs=True), torch.device("cpu"))
    assert TrainerConfig(cuda_graphs=True, step_tokens=512).step_buckets() == [512]
    assert TrainerConfig(cuda_graphs=True, token_buckets=[256, 2048]).step_buckets() == [256, 2048]
    assert TrainerConfig().step_buckets() is None


def test_the_trainers_graphs_are_captured_on_a_stream_of_their_own():
    """Graphs captured on one stream share its cuBLAS workspace: the trainer's must not share the
    engine's decode graphs' (torch's default capture stream) or replaying both at once races on it."""
    from trainer.graphed_layers import own_capture_stream
    graph = torch.cuda.graphs.graph
    saved, mine = graph.default_capture_stream, object()
    with own_capture_stream(mine):
        assert graph.default_capture_stream is mine
    assert graph.default_capture_stream is saved


def test_graphed_steps_after_an_eager_one_bind_their_own_bounds():
    """A step too long for every bucket runs eager between graphed ones; the next graphed step fills
    the bucket's positions and bounds again and still equals its eager twin."""
    gen = torch.Generator().manual_seed(2)
    engine, manager = adapted_engine("tiny-llama", "prefill", 2, gen)
    masters = Masters(engine, manager)
    records = serve_records(engine, 2)
    small = sum(r.num_inputs for r in records[:2])
    buckets = [small + 3]
    graphs = _graphs(engine, masters, buckets)
    _step(engine, masters, records[:2], False, buckets, graphs)
    _step(engine, masters, records, False, buckets, graphs)            # longer than the bucket: eager
    graphed, g_graphed = _step(engine, masters, records[1:2], False, buckets, graphs)
    eager, g_eager = _step(engine, masters, records[1:2], False, None)
    assert graphs.replays == 2 and graphs.fallbacks == {"not_a_bucket": 1}
    assert float((g_graphed - g_eager).norm() / g_eager.norm()) <= 1e-6
