"""GPU-only (run through the device machine), issue 17: the training layers as CUDA graphs
(trainer/graphed_layers.py). A graphed step's gradients match the eager step's (bf16), batches of other
sizes and record counts replay the graphs captured at start-up without capturing again, the graphs'
memory is reported, and a trainer with training.cuda_graphs trains through them."""
import random

import pytest
import torch

from store.feedback_store import FeedbackStore
from tests.test_gpu_trainer_thread import cuda_engine, serve
from trainer.adapters import AdapterManager
from trainer.check_grad import perturb
from trainer.config import TrainerConfig
from trainer.graphed_layers import GraphedLayers
from trainer.lora import LoRAConfig
from trainer.online import OnlineTrainer
from trainer.reuse import TrainRecord
from trainer.step import forward_backward

pytestmark = pytest.mark.gpu


def _records(rng, lengths, vocab=1000):
    return [TrainRecord(None, [rng.randrange(vocab) for _ in range(n)], [rng.randrange(vocab) for _ in range(9)],
                        [0.0] * 9) for n in lengths]


def _grads(model, records, masters, adapters, buckets, compiled):
    for pair in masters.values():
        for t in pair:
            t.grad = None
    result = forward_backward(model, records, adapters, reuse=False, buckets=buckets, compiled=compiled)
    return result.loss, torch.cat([t.grad.flatten().float().clone() for pair in masters.values() for t in pair])


def test_graphed_steps_match_eager_and_never_capture_again():
    engine = cuda_engine("bfloat16")
    manager = AdapterManager(engine.runner.model, LoRAConfig(rank=4, alpha=8), generator=torch.Generator().manual_seed(0))
    perturb(engine, manager, torch.Generator().manual_seed(1))
    masters = manager.masters(engine.adapter_version)
    adapters = manager.training_adapters(masters)
    model, buckets = engine.runner.model, [256, 512]
    graphs = GraphedLayers(model, adapters, buckets, max_segments=9)
    graphs.capture_all(engine.hf_config.hidden_size, torch.bfloat16)
    assert graphs.captures == 2 and all(graphs.memory_bytes[t] > 0 for t in buckets)
    rng = random.Random(0)
    for i, lengths in enumerate([(40, 130), (7, 90, 33, 61), (300,), (12, 200, 150, 70, 5, 9, 1)]):
        records = _records(rng, lengths)
        loss_g, g_graphed = _grads(model, records, masters, adapters, buckets, graphs)
        loss_e, g_eager = _grads(model, records, masters, adapters, None, None)
        cosine = float(torch.nn.functional.cosine_similarity(g_graphed, g_eager, dim=0))
        assert cosine >= 0.999, (lengths, cosine)
        assert abs(loss_g - loss_e) <= 2e-2 * abs(loss_e)
        assert graphs.replays == i + 1 and not graphs.fallbacks
    assert graphs.captures == 2                           # no capture after start-up


def test_a_trainer_with_cuda_graphs_trains_through_them(tmp_path):
    engine, store, rng = cuda_engine("bfloat16"), FeedbackStore(tmp_path / "f.db"), random.Random(0)
    trainer = OnlineTrainer(TrainerConfig(lora_rank=4, lora_alpha=8.0, lr=1e-2, min_records_per_step=1,
                                          concurrency="interleaved", cuda_graphs=True, reuse=False,
                                          step_tokens=1024, token_buckets=[512, 1024]),
                            engine.training_port(), store, tmp_path / "run")
    status = trainer.status()["graphs"]
    assert status["captured"] == 2 and status["memory_bytes"]
    for num in (2, 5):
        for rec in serve(engine, store, rng, num, lambda: None):
            store.add_feedback(response_id=rec.response_id, choice_index=rec.choice_index, rating=1)
            trainer.pin_for_feedback(rec.response_id, rec.choice_index)
        assert trainer.step()
    status = trainer.status()["graphs"]
    assert status["replayed_steps"] == 2 and status["captured"] == 2 and not status["eager_steps"]
    assert trainer.version == 2 and trainer.last_error is None


def test_the_trainer_thread_replays_graphs_beside_serving(tmp_path):
    """Thread mode (the server's on CUDA): graph replays on the trainer's low-priority stream while the
    engine serves through its decode graphs; both make progress."""
    import time
    engine, store, rng = cuda_engine("bfloat16"), FeedbackStore(tmp_path / "f.db"), random.Random(0)
    torch.cuda.set_stream(engine.runner.stream)           # this thread plays the engine thread
    trainer = OnlineTrainer(TrainerConfig(lora_rank=4, lora_alpha=8.0, lr=1e-2, min_records_per_step=1,
                                          cuda_graphs=True, reuse=False, step_tokens=1024,
                                          token_buckets=[512, 1024]),
                            engine.training_port(), store, tmp_path / "run")
    trainer.start()
    try:
        deadline, served = time.monotonic() + 90, 0
        while trainer.totals["steps"] < 3 and time.monotonic() < deadline:
            for rec in serve(engine, store, rng, 3, engine.apply_adapter_offer):
                store.add_feedback(response_id=rec.response_id, choice_index=rec.choice_index, rating=1)
                trainer.pin_for_feedback(rec.response_id, rec.choice_index)
                served += 1
        assert trainer.totals["steps"] >= 3 and trainer.last_error is None, (trainer.totals, trainer.last_error)
        assert trainer.status()["graphs"]["replayed_steps"] >= 3
    finally:
        trainer.stop()
        torch.cuda.set_stream(torch.cuda.default_stream())


def test_graphs_on_their_own_stream_replay_beside_decode_like_graphs():
    """Two graphs replayed at once on two streams, as the trainer's and the engine's decode graphs are:
    a decode-shaped GEMM (few rows, long K: cuBLAS picks split-K kernels that use its workspace)
    captured on torch's default capture stream, a training-shaped one captured inside
    own_capture_stream. Each replay's result must equal its own reference: a shared workspace races."""
    from trainer.graphed_layers import own_capture_stream
    torch.manual_seed(0)
    dev = torch.device("cuda")
    w_down = torch.randn(4096, 14336, device=dev, dtype=torch.bfloat16) * 0.01
    w_up = torch.randn(14336, 4096, device=dev, dtype=torch.bfloat16) * 0.01
    x_dec = torch.randn(8, 14336, device=dev, dtype=torch.bfloat16)       # x: [8, 14336]
    x_train = torch.randn(2048, 4096, device=dev, dtype=torch.bfloat16)   # x: [2048, 4096]
    for _ in range(2):                                                     # warm up outside capture
        x_dec @ w_down.t(), x_train @ w_up.t()
    torch.cuda.synchronize()
    decode_graph, train_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(decode_graph):
        y_dec = x_dec @ w_down.t()                                        # [8, 4096]
    with own_capture_stream(torch.cuda.Stream()):
        with torch.cuda.graph(train_graph):
            y_train = x_train @ w_up.t()                                  # [2048, 14336]
    decode_graph.replay()
    train_graph.replay()
    torch.cuda.synchronize()
    want_dec, want_train = y_dec.clone(), y_train.clone()                  # each alone: the reference
    serving, training = torch.cuda.Stream(priority=-1), torch.cuda.Stream()
    for _ in range(200):
        with torch.cuda.stream(training):
            train_graph.replay()
        with torch.cuda.stream(serving):
            for _ in range(4):
                decode_graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y_dec, want_dec) and torch.equal(y_train, want_train)
