"""engine.rows.copy_rows_ is index_copy_ along dim 0, on 8-byte words where the layout allows."""
import pytest
import torch

import engine.rows
from engine.rows import as_words, copy_rows_


@pytest.fixture
def words_for_any_row(monkeypatch):
    monkeypatch.setattr(engine.rows, "MIN_WORD_ROW_BYTES", 0)     # the word path for these small rows


def reference(dst, index, src):
    out = dst.clone()
    out.index_copy_(0, index, src)
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_matches_index_copy_on_rows_and_heads(dtype, words_for_any_row):
    g = torch.Generator().manual_seed(0)
    for shape in [(40, 24), (40, 3, 8)]:                      # [slots, dim] and a KV cache's [slots, n_kv, d]
        dst = torch.randn(*shape, generator=g).to(dtype)
        src = torch.randn(7, *shape[1:], generator=g).to(dtype)
        index = torch.randperm(40, generator=g)[:7]
        expected = reference(dst, index, src)
        assert as_words(dst) is not None                     # the fast path is the one under test
        assert torch.equal(copy_rows_(dst, index, src), expected)


def test_column_slices_of_a_group_buffer_take_the_word_path(words_for_any_row):
    g = torch.Generator().manual_seed(1)
    group = torch.randn(20, 12, generator=g).to(torch.bfloat16)      # q|k|v side by side: 4 + 4 + 4
    columns = group[:, 4:8]                                          # k's columns: strided rows
    src = torch.randn(5, 4, generator=g).to(torch.bfloat16)
    index = torch.tensor([0, 3, 19, 7, 8])
    expected_group = group.clone()
    expected_group[:, 4:8].index_copy_(0, index, src)
    assert as_words(columns) is not None
    copy_rows_(columns, index, src)
    assert torch.equal(group, expected_group)                       # other columns untouched


def test_layouts_without_whole_words_fall_back(words_for_any_row):
    g = torch.Generator().manual_seed(2)
    dst = torch.randn(10, 3, generator=g).to(torch.bfloat16)          # 6-byte rows
    src = torch.randn(4, 3, generator=g).to(torch.bfloat16)
    index = torch.tensor([9, 0, 5, 2])
    assert as_words(dst) is None
    assert torch.equal(copy_rows_(dst.clone(), index, src), reference(dst, index, src))
    odd = torch.randn(10, 9, generator=g).to(torch.bfloat16)[:, 1:5]  # 8-byte rows at a 2-byte offset
    assert as_words(odd) is None
    expected = reference(odd, index, src[:, :1].expand(4, 4).contiguous())
    assert torch.equal(copy_rows_(odd.clone(), index, src[:, :1].expand(4, 4).contiguous()), expected)
    mixed = torch.randn(4, 3, generator=g)                            # fp32 rows into bf16: an error, as index_copy_
    with pytest.raises(RuntimeError):
        copy_rows_(dst.clone(), index, mixed)


def test_narrow_rows_keep_index_copy(monkeypatch):
    used = []
    monkeypatch.setattr(engine.rows, "as_words", lambda t: used.append(t) or as_words(t))
    dst, src = torch.zeros(8, 4, dtype=torch.bfloat16), torch.ones(2, 4, dtype=torch.bfloat16)
    copy_rows_(dst, torch.tensor([1, 6]), src)                       # 8-byte rows: under the threshold
    assert not used and dst.sum() == 8
    wide_dst = torch.zeros(8, 4096, dtype=torch.bfloat16)           # 8 KiB rows: words
    copy_rows_(wide_dst, torch.tensor([1, 6]), torch.ones(2, 4096, dtype=torch.bfloat16))
    assert used and wide_dst[[1, 6]].eq(1).all() and wide_dst.sum() == 2 * 4096
