"""engine.layers: the fused cheap ops compile once per kind of call, and every kind that serving and
training make together fits under the recompile limit (dynamo's default of 8 did not: with
fullgraph=True the 9th kind raised inside an engine or training step)."""
import pytest
import torch

from engine import layers


def rope_calls(fn):
    """The kinds of call RoPE gets: fp32 / bf16, one row / several, inference mode (serving) / grad
    (training) / plain, fresh tensors or views into a bigger buffer (q|k|v split from one GEMM)."""
    base = torch.randn(64, 192)
    for dtype in (torch.float32, torch.bfloat16):
        cos, sin = torch.randn(128, 16).to(dtype), torch.randn(128, 16).to(dtype)
        for rows in (1, 5):
            for view in (False, True):
                for mode in ("inference", "grad", "plain"):
                    if view and mode == "grad":
                        continue
                    context = torch.inference_mode() if mode == "inference" else torch.enable_grad()
                    with context:
                        y = base.to(dtype)[7:7 + rows] if view else \
                            torch.randn(rows, 192, dtype=dtype, requires_grad=mode == "grad")
                        q, k, _ = y.split([64, 64, 64], dim=-1)
                        out = fn(q.view(rows, 4, 16), k.view(rows, 4, 16), torch.arange(rows), cos, sin)
                        ref = layers._rope(q.view(rows, 4, 16), k.view(rows, 4, 16), torch.arange(rows), cos, sin)
                        assert all(torch.equal(a, b) for a, b in zip(out, ref))


def test_every_kind_of_call_compiles_within_the_limit():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=8):                     # dynamo's default
        try:
            rope_calls(layers.compile_fused(layers._rope, backend="eager"))  # 14 kinds: no raise
            assert torch._dynamo.config.recompile_limit == layers.FUSED_RECOMPILE_LIMIT
        finally:
            torch._dynamo.reset()


def test_the_default_limit_is_too_small_for_them():
    """Why the limit is raised: the same calls through a plain fullgraph compile stop at 8 kinds."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=8):
        try:
            with pytest.raises(Exception, match="(?i)recompile|fullgraph"):   # by torch version
                rope_calls(torch.compile(layers._rope, dynamic=True, fullgraph=True, backend="eager"))
        finally:
            torch._dynamo.reset()


def test_compiling_turns_inductor_gemm_padding_off():
    """Inductor's pad_mm (CUDA only, so only the device test of the trainer's warm-up can show the
    recompile) guards a compiled GEMM's row count; compile_fused turns it off for every later compile."""
    import torch._inductor.config as inductor_config
    with inductor_config.patch(shape_padding=True):
        layers.compile_fused(layers._silu_mul, backend="eager")
        assert inductor_config.shape_padding is False
