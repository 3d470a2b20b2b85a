"""Fused LoRA kernels for serving (engine/kernels/lora.py, engine.lora_kernel): the reference is
exactly today's two-GEMM path; engines serving with lora_kernel=triton (the reference on the CPU)
and folded give today's tokens and capture the same base rows; the Triton kernels through the
interpreter (CPU, when Triton is importable) and on the GPU (bf16, 8B shapes, CUDA-graph replay
after a new version is copied in)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from common.errors import ConfigError
from engine.config import EngineConfig
from engine.kernels.lora import lora_add, lora_expand, lora_reference, lora_shrink, make_slices, uses_triton
from engine.packing import lora_added, lora_group, set_lora_kernel

ROOT = Path(__file__).resolve().parent.parent
# name -> (in, [out per projection]); rank 16 each: the 8B model's groups
SHAPES_8B = {"qkv": (4096, [4096, 1024, 1024]), "gate_up": (4096, [14336, 14336]),
             "o": (4096, [4096]), "down": (14336, [4096])}


def drawer(seed: int, integers: bool):
    """Random tensors of a shape: normal, or small integers (float64: every sum exact)."""
    gen = torch.Generator().manual_seed(seed)
    if integers:
        return lambda *shape: torch.randint(-3, 4, shape, generator=gen).double()
    return lambda *shape: torch.randn(*shape, generator=gen)


def factors(in_features, outs, rank, dtype, device="cpu", seed=0, integers=False):
    """A group's A [R, in], block-diagonal B [out, R] (zeros off the blocks) and slices."""
    draw = drawer(seed, integers)
    slices = make_slices(outs, [rank] * len(outs), device)
    a = (draw(rank * len(outs), in_features) / (1 if integers else in_features ** 0.5)).to(device, dtype)
    b = torch.zeros(sum(outs), rank * len(outs), dtype=dtype, device=device)
    for out_start, out_end, rank_start, r in slices.table.tolist():
        block = draw(out_end - out_start, r) * (1 if integers else 0.1)
        b[out_start:out_end, rank_start:rank_start + r] = block.to(device, dtype)
    return a, b, slices


def inputs(t, in_features, out, dtype, device="cpu", seed=1, integers=False):
    """x [T, in] and a base output y [T, out]."""
    draw = drawer(seed, integers)
    return draw(t, in_features).to(device, dtype), draw(t, out).to(device, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("outs,t", [([48, 16, 16], 7), ([40, 40], 1), ([24], 33)])
def test_reference_is_todays_path_exactly(dtype, outs, t):
    a, b, slices = factors(32, outs, 4, dtype)
    x, y = inputs(t, 32, sum(outs), dtype)
    today = lora_added(y, x, a, b, 2.0)
    assert torch.equal(lora_reference(y, x, a, b, 2.0, slices), today)
    in_place = y.clone()
    assert lora_reference(in_place, x, a, b, 2.0, slices, out=in_place) is in_place
    assert torch.equal(in_place, today)
    if not uses_triton(x):                  # the CPU: lora_add is the reference
        in_place = y.clone()
        assert torch.equal(lora_add(in_place, x, a, b, 2.0, slices, out=in_place), today)
        assert torch.equal(in_place, today)


def folded(x, y_weight, a, b, alpha, slices):
    """The folded path by hand: one GEMM over [W; A] -> [y | s], then the expand into y in place."""
    full = F.linear(x, torch.cat([y_weight, a]))                            # full: [T, out + R]
    y, s = full[:, :slices.out_features], full[:, slices.out_features:]
    return lora_expand(y, s, b, alpha, slices, out=y)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_folded_path_matches_todays_within_rounding(dtype, tol):
    a, b, slices = factors(64, [48, 16, 16], 4, dtype)
    weight = torch.randn(80, 64, generator=torch.Generator().manual_seed(5)).to(dtype)
    x, _ = inputs(9, 64, 80, dtype)
    today = lora_added(F.linear(x, weight), x, a, b, 0.5)
    torch.testing.assert_close(folded(x, weight, a, b, 0.5, slices), today, rtol=tol, atol=tol)


def test_folded_path_is_exact_in_float64():
    """Small integers: every sum is exact in float64 whatever the GEMMs' order, so any difference is a
    wrong block, offset or scale."""
    a, b, slices = factors(64, [48, 16, 16], 4, torch.float64, integers=True)
    weight = torch.randint(-3, 4, (80, 64), generator=torch.Generator().manual_seed(5)).double()
    x, _ = inputs(9, 64, 80, torch.float64, integers=True)
    today = lora_added(F.linear(x, weight), x, a, b, 0.5)
    assert torch.equal(folded(x, weight, a, b, 0.5, slices), today)


def test_engine_config_rejects_an_unknown_lora_kernel():
    with pytest.raises(ConfigError, match="lora_kernel='cuda'.*use one of"):
        EngineConfig(lora_kernel="cuda")
    assert EngineConfig().lora_kernel == "torch"


def test_server_config_file_rejects_an_unknown_lora_kernel(tmp_path):
    from server.config import ServerConfig
    path = tmp_path / "c.json"
    path.write_text('{"engine": {"lora_kernel": "fast"}}')
    with pytest.raises(ConfigError, match="lora_kernel='fast'"):
        ServerConfig.load(path)
    path.write_text('{"engine": {"lora_kernel": "folded"}}')
    assert ServerConfig.load(path).engine.lora_kernel == "folded"


def served(model: str, kernel: str, capture: str = "prefill", lengths=(5, 23, 40)):
    """Tokens, logprobs and pool of an engine with adapters (bases and adapters packed as on CUDA)
    under `kernel`, after a new version went live (version 2: folded copies A into the weight);
    prompts of `lengths` served together (steps that mix them record scattered rows)."""
    from tests.helpers import pack_bases
    from trainer.check_grad import adapted_engine, perturb
    from engine.sampling_params import SamplingParams
    gen = torch.Generator().manual_seed(0)
    engine, manager = adapted_engine(model, capture, 0, gen)
    set_lora_kernel(engine.runner.model, kernel)                 # what EngineConfig.lora_kernel does
    pack_bases(engine.runner.model)                              # as apply_lora does over packed bases
    perturb(engine, manager, gen)                                # version 2
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, detokenize=False, logprobs=0)
    prompts = [[(7 * i + 3 * j) % 200 + 3 for j in range(n)] for i, n in enumerate(lengths)]
    return engine, [s[0] for s in engine.generate(prompts, params)]


@pytest.mark.parametrize("kernel", ["triton", "folded"])
def test_rows_written_straight_into_the_pool_stay_base_rows(kernel):
    """One prompt alone: its prompt step's projections write the pool rows directly (one run of
    slots); the expand must then write a new tensor, never those rows."""
    from store.pool_layout import KINDS
    torch_engine, (want,) = served("tiny-llama", "torch", lengths=(20,))
    engine, (got,) = served("tiny-llama", kernel, lengths=(20,))
    assert engine.capture.steps["one_run"] > 0
    assert got.output_token_ids == want.output_token_ids
    for layer in range(2):
        for kind in KINDS:
            rows, base = engine.activation_pool.gather(got.record_key, layer, kind), \
                torch_engine.activation_pool.gather(want.record_key, layer, kind)
            if kernel == "triton" and not uses_triton(rows):
                assert torch.equal(rows, base)
            else:
                torch.testing.assert_close(rows, base, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2"])
def test_engines_serve_todays_tokens_and_capture_base_rows_under_each_kernel(model):
    from store.pool_layout import KINDS
    torch_engine, torch_seqs = served(model, "torch")
    for kernel in ("triton", "folded"):
        engine, seqs = served(model, kernel)
        layer = engine.runner.model.model.layers[0]
        group = lora_group((layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj))
        assert group is not None and (group.folded is not None) == (kernel == "folded")
        assert lora_group((layer.self_attn.o_proj,)) is not None
        for a, b in zip(torch_seqs, seqs):
            assert a.output_token_ids == b.output_token_ids
            gap = max(abs(p - q) for p, q in zip(a.logprobs, b.logprobs))
            assert gap == 0 if kernel == "triton" and not uses_triton(torch.zeros(1)) else gap < 1e-5
            for index in range(2):
                for kind in KINDS:           # base outputs: the in-place expand never reaches the pool
                    assert torch.equal(engine.activation_pool.gather(b.record_key, index, kind),
                                       torch_engine.activation_pool.gather(a.record_key, index, kind))


def test_torch_kernel_keeps_no_groups_and_folded_keeps_weights_shared():
    engine, _ = served("tiny-llama", "folded", capture="none")
    model = engine.runner.model
    layer = model.model.layers[0]
    group = lora_group((layer.mlp.gate_proj, layer.mlp.up_proj))
    full, _ = group.folded
    assert layer.mlp.gate_proj.base.weight.untyped_storage().data_ptr() == full.untyped_storage().data_ptr()
    assert torch.equal(full[group.slices.out_features:], group.a)          # refreshed after version 2
    assert set_lora_kernel(model, "torch") == 0 and lora_group((layer.mlp.gate_proj, layer.mlp.up_proj)) is None
    with pytest.raises(ConfigError, match="use one of"):
        set_lora_kernel(model, "fast")


def interpreter_checks() -> None:
    """Run under TRITON_INTERPRET=1 (a subprocess): the Triton kernels against the reference, B's
    off-diagonal blocks NaN (never read), in place and not, one split and several (T small, in large)."""
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        for t, in_features, outs in ((7, 96, [40, 20, 24]), (1, 1024, [64, 64]), (70, 64, [48]),
                                     (20, 8192, [32, 16]), (3, 20480, [16])):   # 2, 4 and 32 splits
            a, b, slices = factors(in_features, outs, 16, dtype)
            x, y = inputs(t, in_features, sum(outs), dtype)
            want = lora_reference(y, x, a, b, 1.5, slices)
            for start, end, rank_start, rank in slices.table.tolist():    # off the diagonal blocks
                b[start:end, :rank_start] = float("nan")
                b[start:end, rank_start + rank:] = float("nan")
            got = lora_add(y, x, a, b, 1.5, slices)
            splits = max(1, min(in_features // 512, 32 if t <= 16 else 4))
            assert lora_shrink(x, a).shape[0] == splits                          # s: [splits, T, R]
            in_place = y.clone()
            lora_add(in_place, x, a, b, 1.5, slices, out=in_place)
            scale = want.abs().max().item()
            torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale)
            assert torch.equal(in_place, got)
    folded_interpreted()
    engines_interpreted()
    print("interpreter checks passed")


def folded_interpreted() -> None:
    """The expand over the folded GEMM's strided views (y, s rows of out + R)."""
    a, b, slices = factors(64, [48, 16, 16], 16, torch.float32)
    weight = torch.randn(80, 64, generator=torch.Generator().manual_seed(5))
    x, _ = inputs(9, 64, 80, torch.float32)
    today = lora_added(F.linear(x, weight), x, a, b, 0.5)
    torch.testing.assert_close(folded(x, weight, a, b, 0.5, slices), today, rtol=1e-5, atol=1e-5)


def engines_interpreted() -> None:
    """Whole engines with the Triton kernels (interpreted): torch's tokens and captured base rows."""
    from store.pool_layout import KINDS
    (torch_engine, torch_seqs), (engine, seqs) = served("tiny-llama", "torch"), served("tiny-llama", "triton")
    for a, b in zip(torch_seqs, seqs):
        assert a.output_token_ids == b.output_token_ids
        assert max(abs(p - q) for p, q in zip(a.logprobs, b.logprobs)) < 1e-4
        for layer in range(2):               # base rows (the adapter's delta would be far off 1e-4)
            for kind in KINDS:
                torch.testing.assert_close(engine.activation_pool.gather(b.record_key, layer, kind),
                                           torch_engine.activation_pool.gather(a.record_key, layer, kind),
                                           rtol=1e-4, atol=1e-4)
        assert torch.equal(engine.activation_pool.gather(b.record_key, 0, "q"),   # before any adapter
                           torch_engine.activation_pool.gather(a.record_key, 0, "q"))


def test_triton_kernels_through_the_interpreter():
    probe = subprocess.run([sys.executable, "-c", "import triton"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("triton is not importable here (CPU torch wheels ship without it)")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(sys.path))
    code = "from tests.test_lora_kernels import interpreter_checks; interpreter_checks()"
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0 and "interpreter checks passed" in run.stdout, run.stdout + run.stderr


def test_benchmark_smoke_runs_on_the_cpu(tmp_path):
    from benchmarks import gpu_lora_kernels
    out = tmp_path / "lora.json"
    gpu_lora_kernels.main(["--smoke", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["smoke"] is True and result["rows"]
    row = result["rows"][0]
    assert {"group", "tokens", "base_ms", "options"} <= set(row)
    assert row["options"]["torch"]["ratio"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 7, 256, 1024])
@pytest.mark.parametrize("name", sorted(SHAPES_8B))
def test_triton_matches_reference_at_8b_shapes(name, t):
    in_features, outs = SHAPES_8B[name]
    a, b, slices = factors(in_features, outs, 16, torch.bfloat16, "cuda")
    x, y = inputs(t, in_features, sum(outs), torch.bfloat16, "cuda")
    assert uses_triton(x)
    want = lora_reference(y, x, a, b, 2.0, slices)
    got = y.clone()
    lora_add(got, x, a, b, 2.0, slices, out=got)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    delta, want_delta = (got.float() - y.float()), (want.float() - y.float())
    assert (delta - want_delta).abs().max() < 0.05 * want_delta.abs().max()


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["triton", "folded"])
def test_cuda_graph_replay_sees_a_new_version_copied_into_the_factors(kernel):
    in_features, outs = SHAPES_8B["qkv"]
    a, b, slices = factors(in_features, outs, 16, torch.bfloat16, "cuda")
    weight = torch.randn(sum(outs), in_features, device="cuda", dtype=torch.bfloat16) / 64
    full = torch.cat([weight, a])                               # folded: [out + R, in]
    x, _ = inputs(1, in_features, sum(outs), torch.bfloat16, "cuda")

    def step():
        if kernel == "folded":
            both = F.linear(x, full)                            # [1, out + R]
            y = both[:, :slices.out_features]
            return lora_expand(y, both[:, slices.out_features:], b, 2.0, slices, out=y)
        y = F.linear(x, weight)
        return lora_add(y, x, a, b, 2.0, slices, out=y)

    for _ in range(2):
        step()                                                  # compile outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    a2, b2, _ = factors(in_features, outs, 16, torch.bfloat16, "cuda", seed=9)
    a.copy_(a2)                                                 # a new version, same tensors
    b.copy_(b2)
    full[slices.out_features:].copy_(a2)                        # refresh_folded_lora's copy
    graph.replay()
    want = lora_reference(F.linear(x, weight), x, a2, b2, 2.0, slices)
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("stream", ["serving", "side"])
def test_gpu_engine_serves_the_same_tokens_under_each_kernel(stream):
    """bf16 engines on CUDA (decode graphs, packed groups, capture in place and on a side stream):
    triton and folded give torch's first tokens (later ones may part on a bf16 near-tie) and capture
    base rows: layer 0's q|k|v (whose input no adapter touched yet) bit for bit, the rest within bf16."""
    from benchmarks.common import build_engine, llama_config
    from engine.sampling_params import SamplingParams
    from store.pool_layout import KINDS
    from trainer.adapters import AdapterManager
    from trainer.lora import LoRAConfig
    shape = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=1000, max_position_embeddings=1024, rms_norm_eps=1e-5,
                 tie_word_embeddings=False)
    prompts = [[(13 * i + 7 * j) % 1000 for j in range(n)] for i, n in enumerate((300, 40, 77))]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, detokenize=False)
    outs, pools = [], []
    for kernel in ("torch", "triton", "folded"):
        cfg = EngineConfig(load_format="random", device="cuda", dtype="bfloat16", num_kv_blocks=256,
                           cuda_graph_max_batch=8, seed=0, capture="prefill", capture_stream=stream,
                           activation_pool_bytes=256 << 20, max_num_batched_tokens=256, lora_kernel=kernel)
        engine = build_engine(cfg, llama_config(shape))
        gen = torch.Generator().manual_seed(0)
        manager = AdapterManager(engine.runner.model, LoRAConfig(rank=16, alpha=32), generator=gen)
        masters = manager.masters(0)
        with torch.no_grad():
            for a, b in masters.values():                       # A too: folded must copy it in
                a.add_(torch.randn(a.shape, generator=gen).to(a.device) * 0.05)
                b.add_(torch.randn(b.shape, generator=gen).to(b.device) * 0.05)
        engine.offer_adapter(manager.stage(masters, 1))
        engine.apply_adapter_offer()
        outs.append([s[0].output_token_ids[0] for s in engine.generate(prompts, params)])
        pools.append(engine.activation_pool)
    assert outs[0] == outs[1] == outs[2]
    for pool in pools[1:]:
        assert sorted(pool._records) == sorted(pools[0]._records)
        for key in list(pools[0]._records):      # a gather touches the LRU order
            for layer in range(2):
                for kind in KINDS:
                    got, want = pool.gather(key, layer, kind).float(), pools[0].gather(key, layer, kind).float()
                    if layer == 0 and kind in ("q", "k", "v"):
                        assert torch.equal(got, want)
                    else:
                        assert (got - want).norm() <= 2e-2 * want.norm()
