"""GPU-only checks (run through the device machine): Triton paged attention vs the torch reference,
and CUDA-graph decode vs eager decode."""
import random

import pytest
import torch

from engine.attention import AttentionMetadata, paged_attention_reference

pytestmark = pytest.mark.gpu


def _random_batch(group, n_kv, head_dim, page, q_lens, ctx_lens, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    n_blocks = sum(-(-n // page) for n in ctx_lens) + 4
    k_cache = torch.randn(n_blocks, page, n_kv, head_dim, generator=gen).to("cuda", dtype)
    v_cache = torch.randn(n_blocks, page, n_kv, head_dim, generator=gen).to("cuda", dtype)
    free = list(range(n_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-n // page))] for n in ctx_lens]
    width = max(map(len, tables))
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    q = torch.randn(qsl[-1], group * n_kv, head_dim, generator=gen).to("cuda", dtype)
    meta = AttentionMetadata(
        slot_mapping=None, query_start_loc=torch.tensor(qsl, dtype=torch.int32, device="cuda"),
        seq_lens=torch.tensor(ctx_lens, dtype=torch.int32, device="cuda"),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device="cuda"),
        max_query_len=max(q_lens), max_seq_len=max(ctx_lens), is_decode=all(n == 1 for n in q_lens),
        query_start_loc_host=qsl, seq_lens_host=ctx_lens)
    return q, k_cache, v_cache, meta


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float32, 5e-3)])
@pytest.mark.parametrize("group,n_kv,head_dim,page,q_lens,ctx_lens", [
    (4, 8, 128, 16, [1] * 7, [1, 15, 16, 17, 300, 1000, 64]),      # decode, GQA 4
    (3, 3, 64, 16, [7, 1, 20, 513], [7, 33, 50, 700]),               # mixed prefill chunks + decode
    (1, 4, 64, 16, [200], [200]),                                     # plain causal prefill, MHA
])
def test_triton_paged_attention_matches_reference(dtype, tol, group, n_kv, head_dim, page, q_lens, ctx_lens):
    from engine.kernels.paged_attention import paged_attention_triton
    q, k_cache, v_cache, meta = _random_batch(group, n_kv, head_dim, page, q_lens, ctx_lens, dtype, seed=len(q_lens))
    scale = head_dim ** -0.5
    ref = paged_attention_reference(q.double(), k_cache.double(), v_cache.double(), meta, scale)
    out = paged_attention_triton(q, k_cache, v_cache, meta, scale)
    assert torch.isfinite(out).all()
    err = float((out.double() - ref).norm() / ref.norm())
    assert err < tol, err


def test_cuda_graph_decode_matches_eager():
    from benchmarks.common import build_engine, llama_config
    from engine.config import EngineConfig
    from engine.sampling_params import SamplingParams

    shape = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=1000, max_position_embeddings=1024, rms_norm_eps=1e-5,
                 tie_word_embeddings=False)
    rng = random.Random(0)
    prompts = [[rng.randrange(1000) for _ in range(n)] for n in (5, 40, 130, 77, 3)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, detokenize=False, logprobs=0)
    outs = []
    for eager in (True, False):
        cfg = EngineConfig(load_format="random", device="cuda", dtype="float32", num_kv_blocks=256,
                           enforce_eager=eager, cuda_graph_max_batch=8, seed=0)
        engine = build_engine(cfg, llama_config(shape))
        outs.append(engine.generate(prompts, params))
        assert (engine.runner.graphs is None) == eager
    for eager_seqs, graph_seqs in zip(*outs):
        assert eager_seqs[0].output_token_ids == graph_seqs[0].output_token_ids
        diffs = [abs(a - b) for a, b in zip(eager_seqs[0].logprobs, graph_seqs[0].logprobs)]
        assert max(diffs) < 1e-3


def test_decode_capture_has_no_host_sync():
    """Issue 4: capturing decode rows (prefill+decode) adds no host sync inside the decode forward."""
    from benchmarks.common import build_engine, llama_config
    from engine.config import EngineConfig
    from engine.sampling_params import SamplingParams

    shape = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=1000, max_position_embeddings=1024, rms_norm_eps=1e-5)
    cfg = EngineConfig(load_format="random", device="cuda", num_kv_blocks=64, capture="prefill+decode",
                       activation_pool_bytes=64 << 20, cuda_graph_max_batch=8, enforce_eager=True)
    engine = build_engine(cfg, llama_config(shape))
    engine.add_request("r", list(range(3, 40)), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    engine.step()                                            # prefill
    runner = engine.runner
    batch = engine.scheduler.schedule()
    input_ids, positions, ctx, _ = runner.prepare(batch, engine.capture.begin(batch))
    assert ctx.capture is not None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode():
            runner.model.compute_logits(runner.model(input_ids, positions, ctx))
    finally:
        torch.cuda.set_sync_debug_mode("default")



def test_cuda_graph_decode_captures_one_sequence_as_eager_does():
    """prefill+decode capture with one sequence decoding: its rows are one run of pool slots (no slot
    list), which the CUDA-graph decode must still write (since c43e80b it passed None: f1f905b);
    the rows equal eager decode's."""
    from benchmarks.common import build_engine, llama_config
    from engine.config import EngineConfig
    from engine.sampling_params import SamplingParams
    from store.pool_layout import KINDS

    shape = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=1000, max_position_embeddings=1024, rms_norm_eps=1e-5)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, detokenize=False)
    pools = []
    for eager in (True, False):
        cfg = EngineConfig(load_format="random", device="cuda", dtype="float32", num_kv_blocks=64, seed=0,
                           capture="prefill+decode", activation_pool_bytes=64 << 20, cuda_graph_max_batch=8,
                           enforce_eager=eager)
        engine = build_engine(cfg, llama_config(shape))
        engine.generate([list(range(3, 40))], params)
        assert (engine.runner.graphs is None) == eager      # captured at the first decode step
        pools.append(engine.activation_pool)
    (key,) = pools[0]._records
    assert pools[0].get(key).captured == pools[1].get(key).captured == 37 + 11
    for layer in range(2):
        for kind in KINDS:
            torch.testing.assert_close(pools[1].gather(key, layer, kind), pools[0].gather(key, layer, kind),
                                       rtol=1e-4, atol=1e-4)

def test_training_attention_takes_the_flash_kernel():
    """The training context's attention must run on SDPA's flash kernel (the math fallback keeps
    [heads, n, n] probabilities: quadratic memory). With only flash allowed, a fallback raises."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from trainer.reuse import TrainingContext
    ctx = TrainingContext([0, 300, 1000], {})
    q = torch.randn(1000, 32, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1000, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1000, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = ctx.attention(0, q, k, v, 0.125)
        out.float().sum().backward()
    with sdpa_kernel([SDPBackend.MATH]):
        ref = ctx.attention(0, q.float(), k.float(), v.float(), 0.125)
    assert out.shape == (1000, 32, 64)
    assert float((out.float() - ref).norm() / ref.norm()) < 1e-2


def test_fused_op_called_while_another_thread_compiles_runs_eagerly():
    """While one thread compiles (make_fx raises a process-wide FX-tracing flag), a fused op called from
    another thread must still run (eagerly) instead of raising: the trainer thread compiles its backward
    graphs while the engine thread serves. The flag is raised here as a compile would."""
    import torch.fx._symbolic_trace as fx_trace
    from engine.layers import rms_norm
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(256, device="cuda", dtype=torch.bfloat16)
    fused = rms_norm(x, w, 1e-5)                                 # compiled before the flag is raised
    saved, fx_trace._is_fx_tracing_flag = fx_trace._is_fx_tracing_flag, True
    try:
        during = rms_norm(x, w, 1e-5)
    finally:
        fx_trace._is_fx_tracing_flag = saved
    torch.testing.assert_close(during, fused, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(during, rms_norm.reference(x, w, 1e-5), rtol=0, atol=0)


def test_side_stream_and_in_place_capture_write_the_same_pool_rows():
    """capture_stream=side (prompt steps copy captured rows on a side stream, joined before the step
    ends) and steps whose rows are one run of slots (projections write the pool in place) record
    exactly the rows the in-order copies record, packed groups included."""
    from benchmarks.common import build_engine, llama_config
    from engine.config import EngineConfig
    from engine.sampling_params import SamplingParams
    from store.pool_layout import KINDS

    shape = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=1000, max_position_embeddings=1024, rms_norm_eps=1e-5,
                 tie_word_embeddings=False)
    rng = random.Random(1)
    prompts = [[rng.randrange(1000) for _ in range(n)] for n in (300, 40, 700, 77)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, detokenize=False)
    pools, outs = [], []
    for variant in ("copy", "serving", "side"):
        stream = "side" if variant == "side" else "serving"
        cfg = EngineConfig(load_format="random", device="cuda", dtype="bfloat16", num_kv_blocks=256,
                           cuda_graph_max_batch=8, seed=0, capture="prefill", capture_stream=stream,
                           activation_pool_bytes=256 << 20, max_num_batched_tokens=256)
        engine = build_engine(cfg, llama_config(shape))
        assert (engine.capture.side_stream is not None) == (stream == "side")
        if variant == "copy":
            engine.capture.run_start = lambda slots: None           # every step copies its rows
        outs.append([s[0].output_token_ids for s in engine.generate(prompts, params)])
        pools.append(engine.activation_pool)
        if variant == "serving":
            assert engine.capture.steps["one_run"] > 0              # some steps wrote in place
    assert outs[0] == outs[1] == outs[2]
    keys = [k for k in pools[0]._records]
    assert len(keys) == len(prompts)
    for pool in pools[1:]:
        assert sorted(keys) == sorted(pool._records)
        for key in keys:
            assert pools[0].get(key).captured == pool.get(key).captured > 0
            for layer in range(2):
                for kind in KINDS:
                    assert torch.equal(pools[0].gather(key, layer, kind), pool.gather(key, layer, kind))


def test_varlen_training_attention_matches_per_record():
    """One varlen flash call per layer (where this torch has it) gives per-record SDPA's output and
    gradients (bf16 tolerance), GQA included; the test says which path 'auto' took."""
    from trainer.attention import causal_attention, varlen_applies
    cu = [0, 300, 301, 1000, 1517]
    gen = torch.Generator(device="cuda").manual_seed(0)
    make = lambda heads: torch.randn(cu[-1], heads, 64, device="cuda", dtype=torch.bfloat16,
                                     generator=gen).requires_grad_(True)
    q, k, v = make(32), make(8), make(8)
    if not varlen_applies(q):
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn we can call")
    results = []
    for kind in ("varlen", "per_record"):
        out = causal_attention(q, k, v, cu, 0.125, kind)                  # [T, 32, 64]
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        results.append((out.float(), [g.float() for g in grads]))
    (out_v, grads_v), (out_p, grads_p) = results
    assert float((out_v - out_p).norm() / out_p.norm()) < 1e-2
    for gv, gp in zip(grads_v, grads_p):
        assert float((gv - gp).norm() / gp.norm()) < 2e-2


def _served_bf16_engine(capture: str):
    """A small bf16 Llama on CUDA (packed projections, fused ops, in-place capture, CUDA-graph decode)
    with perturbed LoRA adapters, and the records it served with `capture` (chunked prefill)."""
    from benchmarks.common import build_engine, llama_config
    from engine.config import EngineConfig
    from trainer.adapters import AdapterManager
    from trainer.check_grad import perturb, serve_records
    from trainer.lora import LoRAConfig

    shape = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=1000, max_position_embeddings=1024, rms_norm_eps=1e-5,
                 tie_word_embeddings=False)
    cfg = EngineConfig(load_format="random", device="cuda", dtype="bfloat16", num_kv_blocks=256,
                       cuda_graph_max_batch=8, seed=0, capture=capture, activation_pool_bytes=256 << 20,
                       max_num_batched_tokens=64)
    engine = build_engine(cfg, llama_config(shape))
    gen = torch.Generator().manual_seed(0)
    manager = AdapterManager(engine.runner.model, LoRAConfig(rank=8, alpha=16), generator=gen)
    perturb(engine, manager, gen)
    return engine, manager, serve_records(engine, 0)


@pytest.mark.parametrize("capture", ["prefill+decode", "prefill"])
def test_reuse_matches_recompute_on_cuda(capture):
    """The eager reuse step on CUDA in bf16 (rows written by serving's fused, packed, in-place and
    CUDA-graph paths) gives recompute's loss and LoRA gradients within bf16 noise (cosine 0.99997 in
    session 7's probe)."""
    from trainer.check_grad import compare, train_once
    engine, manager, records = _served_bf16_engine(capture)
    reuse, g_reuse = train_once(engine, manager, records, True, 0)
    recompute, g_recompute = train_once(engine, manager, records, False, 0)
    assert reuse.outcomes == {"hit": len(records)} and reuse.reused_rows > 0
    assert abs(reuse.loss - recompute.loss) < 1e-3 * abs(recompute.loss)
    result = compare([g.float() for g in g_reuse], [g.float() for g in g_recompute])
    assert result["cosine"] > 0.999 and result["rel_err"] < 3e-2, result


@pytest.mark.parametrize("capture", ["prefill+decode", "prefill"])
def test_compiled_training_layer_matches_eager(capture):
    """trainer.compiled_layer under Inductor (each layer's forward + backward one graph, fused ops and
    varlen attention inside) gives the eager step's loss and LoRA gradients (bf16 tolerance)."""
    from trainer.check_grad import compare, train_once
    from trainer.compiled_layer import CompiledLayers
    engine, manager, records = _served_bf16_engine(capture)
    eager, g_eager = train_once(engine, manager, records, True, 0)
    compiled, g_compiled = train_once(engine, manager, records, True, 0, compiled=CompiledLayers())
    assert compiled.outcomes == eager.outcomes == {"hit": len(records)}
    assert abs(compiled.loss - eager.loss) < 1e-2 * abs(eager.loss)
    result = compare([g.float() for g in g_compiled], [g.float() for g in g_eager])
    assert result["cosine"] > 0.999 and result["rel_err"] < 3e-2, result
