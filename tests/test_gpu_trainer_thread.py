"""GPU-only (run through the device machine): the trainer thread on CUDA — its own stream (or a green
context of part of the SMs) beside the engine's serving stream and decode CUDA graphs; a version goes
live only in the engine's step hook, and decode graphs replay it."""
import random
import time

import pytest
import torch

from store.feedback_store import CompletionRecord, FeedbackStore
from trainer.config import TrainerConfig
from trainer.online import OnlineTrainer

pytestmark = pytest.mark.gpu


def cuda_engine(dtype: str = "float32"):
    from benchmarks.common import build_engine, llama_config
    from engine.config import EngineConfig
    shape = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=1000, max_position_embeddings=1024, rms_norm_eps=1e-5,
                 tie_word_embeddings=False)
    cfg = EngineConfig(load_format="random", device="cuda", dtype=dtype, num_kv_blocks=256,
                       cuda_graph_max_batch=8, seed=0, capture="prefill", activation_pool_bytes=64 << 20)
    return build_engine(cfg, llama_config(shape))


def serve(engine, store, rng, num: int, hook) -> list[CompletionRecord]:
    from engine.sampling_params import SamplingParams
    seqs = []
    for i in range(num):
        prompt = [rng.randrange(1000) for _ in range(rng.randrange(20, 120))]
        params = SamplingParams(temperature=1.0, seed=i, max_tokens=12, ignore_eos=True, detokenize=False)
        seqs += engine.add_request(f"r{rng.random()}", prompt, params)
    while engine.has_unfinished():
        engine.step()
        hook()                                            # what the engine thread runs between steps
    records = [CompletionRecord(s.request_id, s.index, list(s.prompt_token_ids), list(s.output_token_ids),
                                list(s.logprobs), s.adapter_version, None, time.time()) for s in seqs]
    store.record_completions(records)
    return records


@pytest.mark.parametrize("sm_share", [None, 0.5])
def test_trainer_thread_trains_beside_cuda_graph_decode(tmp_path, sm_share):
    engine, store, rng = cuda_engine(), FeedbackStore(tmp_path / "f.db"), random.Random(0)
    torch.cuda.set_stream(engine.runner.stream)           # this thread plays the engine thread
    trainer = OnlineTrainer(TrainerConfig(lora_rank=4, lora_alpha=8.0, lr=1e-2, min_records_per_step=2,
                                          sm_share=sm_share), engine.training_port(), store, tmp_path / "run")
    assert trainer.thread is not None                     # auto: a thread on CUDA
    trainer.start()
    try:
        for rec in serve(engine, store, rng, 4, engine.apply_adapter_offer):
            store.add_feedback(response_id=rec.response_id, choice_index=rec.choice_index, rating=1)
            trainer.pin_for_feedback(rec.response_id, rec.choice_index)
        deadline = time.monotonic() + 120
        while trainer.totals["steps"] < 1 and time.monotonic() < deadline:
            serve(engine, store, rng, 2, engine.apply_adapter_offer)   # the engine keeps serving meanwhile
        assert trainer.totals["steps"] >= 1 and trainer.last_error is None
        assert trainer.totals["outcome_hit"] + trainer.totals["outcome_stale"] >= 2   # reused on CUDA
        with trainer.lock:
            engine.apply_adapter_offer()                  # the newest version goes live here
            assert engine.adapter_version == trainer.version >= 1
            for name, (a, b) in trainer.masters.items():
                module = trainer.adapters.modules[name]
                assert torch.equal(module.lora_A, a.detach()) and torch.equal(module.lora_B, b.detach())
        assert engine.runner.graphs is not None           # decode ran through CUDA graphs meanwhile
        total = torch.cuda.get_device_properties(0).multi_processor_count
        assert trainer.thread.sms == total if sm_share is None else trainer.thread.sms <= total
        later = serve(engine, store, rng, 2, engine.apply_adapter_offer)
        assert all(r.adapter_version >= 1 for r in later)
    finally:
        trainer.stop()
        torch.cuda.set_stream(torch.cuda.default_stream())


def test_trainer_start_compiles_the_training_graphs_before_serving(tmp_path):
    """OnlineTrainer's init runs a tiny warm-up step on CUDA, so the first real training step (beside
    serving) compiles nothing: a compile holds the interpreter for seconds while the engine serves."""
    from torch._dynamo.utils import counters

    from trainer.reuse import TrainRecord
    from trainer.step import forward_backward
    torch._dynamo.reset()                     # forget graphs earlier tests compiled
    engine, store = cuda_engine(), FeedbackStore(tmp_path / "f.db")
    trainer = OnlineTrainer(TrainerConfig(lora_rank=4, lora_alpha=8.0), engine.training_port(), store, tmp_path / "run")
    assert all(t.grad is None for pair in trainer.masters.values() for t in pair)   # warm-up left no grads
    compiled = counters["stats"]["unique_graphs"]
    rng = random.Random(0)
    records = [TrainRecord(None, [rng.randrange(1000) for _ in range(n)], [rng.randrange(1000) for _ in range(9)],
                           [0.0] * 9) for n in (40, 130)]
    forward_backward(engine.runner.model, records, trainer._adapter_map(), reuse=False)
    torch.cuda.synchronize()
    assert counters["stats"]["unique_graphs"] == compiled


def test_compiled_layers_are_compiled_at_start_up_and_train_any_batch(tmp_path):
    """training.compile_layers (Inductor, bf16: varlen attention, so the batch's bounds are a tensor):
    the trainer's warm-up compiles every layer graph; steps over batches of different sizes and lengths
    compile nothing more, and train mostly by reuse."""
    from torch._dynamo.utils import counters
    engine, store, rng = cuda_engine("bfloat16"), FeedbackStore(tmp_path / "f.db"), random.Random(0)
    trainer = OnlineTrainer(TrainerConfig(lora_rank=4, lora_alpha=8.0, lr=1e-2, min_records_per_step=1,
                                          concurrency="interleaved", compile_layers=True), engine.training_port(), store,
                            tmp_path / "run")
    for num in (2, 5):
        for rec in serve(engine, store, rng, num, lambda: None):    # may compile serving's fused ops
            store.add_feedback(response_id=rec.response_id, choice_index=rec.choice_index, rating=1)
            trainer.pin_for_feedback(rec.response_id, rec.choice_index)
        graphs = counters["stats"]["unique_graphs"]
        assert trainer.step()
        assert counters["stats"]["unique_graphs"] == graphs, "a training step compiled a graph"
        assert trainer.last.outcomes == {"hit": num} and trainer.last.reused_rows > 0
