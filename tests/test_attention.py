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


def _records_attention(query, key, value, cu_seq_q, causal, scale=None):
    """What a varlen kernel computes, from its own arguments: causal SDPA per record, equal head counts."""
    assert key.shape[1] == query.shape[1]
    bounds = cu_seq_q.tolist()
    return torch.cat([torch.nn.functional.scaled_dot_product_attention(
        query[a:b].transpose(0, 1), key[a:b].transpose(0, 1), value[a:b].transpose(0, 1),
        is_causal=causal, scale=scale).transpose(0, 1) for a, b in zip(bounds[:-1], bounds[1:])])


def test_varlen_adapts_to_both_signatures_of_torchs_varlen_attn(monkeypatch):
    """Every signature torch's varlen_attn has had — window_size + enable_gqa + scale (2.13), window_size +
    scale without GQA, is_causal without GQA or scale (the first) — is called so that the result is
    per-record causal attention, GQA included."""
    import torch.nn.attention.varlen as module
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(30, heads, 8, generator=gen) for heads in (4, 2, 2))
    cu = [0, 12, 19, 30]
    default_scale = 8 ** -0.5
    calls = []

    def new(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
            window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
        calls.append(("new", window_size, enable_gqa, max_q))
        key, value = attention.repeat_kv(key, value, query.shape[1]) if enable_gqa else (key, value)
        return _records_attention(query, key, value, cu_seq_q, window_size == (-1, 0), scale)

    def old(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        calls.append(("old", is_causal, key.shape[1], max_q))
        return _records_attention(query, key, value, cu_seq_q, is_causal)

    def middle(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
               window_size=(-1, -1)):
        calls.append(("middle", window_size, key.shape[1], max_q))
        return _records_attention(query, key, value, cu_seq_q, window_size == (-1, 0), scale)

    for fake, expected_call in ((new, ("new", (-1, 0), True, 12)), (middle, ("middle", (-1, 0), 4, 12)),
                                (old, ("old", True, 4, 12))):
        monkeypatch.setattr(module, "varlen_attn", fake)
        attention.varlen_function.cache_clear()
        for scale in (default_scale, 0.3):
            if fake is old and scale != default_scale:                 # the old one cannot take a scale
                try:
                    attention.varlen(q, k, v, cu, scale)
                except NotImplementedError:
                    continue
                raise AssertionError("a non-default scale must not reach a varlen_attn without `scale`")
            out = attention.varlen(q, k, v, cu, scale)
            assert calls[-1] == expected_call
            torch.testing.assert_close(out, attention.per_record(q, k, v, cu, scale), rtol=1e-5, atol=1e-6)
    monkeypatch.undo()
    attention.varlen_function.cache_clear()


def test_no_varlen_attn_without_a_causal_argument(monkeypatch):
    import torch.nn.attention.varlen as module
    monkeypatch.setattr(module, "varlen_attn", lambda query, key, value, cu_seq_q, cu_seq_k, max_q, max_k: query)
    attention.varlen_function.cache_clear()
    try:
        assert attention.varlen_function() is None
    finally:
        monkeypatch.undo()
        attention.varlen_function.cache_clear()
