"""Training attention (trainer/attention.py) on the CPU: the per-record reference, and 'auto' falling
back to it for good when the varlen kernel fails at run time (a GPU without one must still train)."""
import torch

from trainer import attention


def test_auto_falls_back_to_per_record_once_varlen_fails(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(30, heads, 8, generator=gen) for heads in (4, 2, 2))
    cu = [0, 12, 30]
    reference = attention.per_record(q, k, v, cu, 0.3)
    calls = []

    def broken(*args):
        calls.append(args)
        raise RuntimeError("no varlen kernel for this GPU")
    monkeypatch.setattr(attention, "varlen", broken)
    monkeypatch.setattr(attention, "varlen_function", lambda: object())    # as if torch had one ...
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))   # ... and q were on CUDA
    monkeypatch.setattr(attention, "_varlen_failed", type(attention._varlen_failed)())
    q16, k16, v16 = (t.to(torch.bfloat16) for t in (q, k, v))
    assert attention.varlen_applies(q16)
    out = attention.causal_attention(q16, k16, v16, cu, 0.3)              # tries varlen, falls back
    assert not attention.varlen_applies(q16)                              # and stops trying
    attention.causal_attention(q16, k16, v16, cu, 0.3)
    monkeypatch.undo()
    assert len(calls) == 1 and torch.allclose(out.float(), reference, atol=3e-2)
    for start, end in zip(cu[:-1], cu[1:]):                               # causal within each record only
        alone = attention.per_record(q[start:end], k[start:end], v[start:end], [0, end - start], 0.3)
        assert torch.allclose(reference[start:end], alone, atol=1e-6)
