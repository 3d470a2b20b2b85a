"""Issue 17: a step padded to a token-count bucket gives the unpadded step's loss and gradients."""
import pytest
import torch

from common.errors import ConfigError
from trainer.buckets import check_buckets, padding_for
from trainer.check_grad import adapted_engine, serve_records
from trainer.step import forward_backward


def test_padding_fills_the_smallest_bucket_that_holds_the_batch():
    assert padding_for(100, [128, 512, 2048]) == 28
    assert padding_for(128, [128, 512]) == 0
    assert padding_for(129, [128, 512]) == 383
    assert padding_for(3000, [128, 2048]) == 0      # longer than every bucket: unpadded
    assert padding_for(100, None) == 0


@pytest.mark.parametrize("buckets", [[8, 4], [16, 16], [8], []])
def test_bad_buckets_are_rejected(buckets):
    with pytest.raises(ConfigError):
        check_buckets(buckets, step_tokens=16)


def test_buckets_must_hold_a_step():
    with pytest.raises(ConfigError, match="step_tokens"):
        check_buckets([64, 128], step_tokens=2048)


def _step(engine, manager, records, reuse, buckets):
    masters = manager.masters(engine.adapter_version)
    for pair in masters.values():
        for t in pair:
            t.grad = None
    result = forward_backward(engine.runner.model, records, manager.training_adapters(masters),
                              pool=engine.activation_pool, reuse=reuse, trainer_version=engine.adapter_version,
                              prompt_lm_weight=0.3, buckets=buckets)
    return result, torch.cat([t.grad.flatten() for pair in masters.values() for t in pair])


@pytest.mark.parametrize("capture", ["prefill", "prefill+decode"])
@pytest.mark.parametrize("reuse", [True, False])
def test_padded_step_equals_the_unpadded_step(capture, reuse):
    gen = torch.Generator().manual_seed(0)
    engine, manager = adapted_engine("tiny-llama", capture, 0, gen)
    records = serve_records(engine, 0)
    tokens = sum(r.num_inputs for r in records)
    plain, g_plain = _step(engine, manager, records, reuse, None)
    padded, g_padded = _step(engine, manager, records, reuse, [tokens + 37, 4096])
    assert padded.computed_rows == plain.computed_rows and padded.reused_rows == plain.reused_rows
    if reuse:
        assert padded.reused_rows > 0
    assert abs(padded.loss - plain.loss) <= 1e-6 * abs(plain.loss)
    assert float((g_padded - g_plain).norm() / g_plain.norm()) <= 1e-6
