"""The online trainer in-process (no HTTP): a tiny random Llama served by the engine with activation
capture, completions and ratings in a FeedbackStore, `Rig.step()` doing what the engine thread does in
interleaved mode: the trainer's step (its hook), then the engine applies the newest adapter offer.
Covers publish by reuse, skipped non-finite steps, the update cap, crash/restart exactly-once,
rollback, and one step of each objective."""
from __future__ import annotations

import copy
import dataclasses
import math
import random
import time
import uuid

import pytest
import torch

from common.errors import NotFoundError
from engine.sampling_params import SamplingParams
from store.feedback_store import CompletionRecord, FeedbackStore
from trainer.check_grad import build_engine
from trainer.config import TrainerConfig
from trainer.online import OnlineTrainer


class Rig:
    """An engine + store + trainer over one run folder; `restart()` simulates a crash."""

    def __init__(self, tmp_path, seed: int = 0, **options):
        self.tmp_path, self.seed, self.published = tmp_path, seed, []
        options = {"lora_rank": 4, "lora_alpha": 8.0, "lr": 1e-2, "checkpoint_every": 10,
                   "min_records_per_step": 1, **options}
        self.config = TrainerConfig(**options)
        self.store = FeedbackStore(tmp_path / "feedback.db")
        self.rng = random.Random(seed)
        self.restart()

    def restart(self) -> None:
        """A fresh engine and trainer on the same run folder and store (whatever was in memory is gone)."""
        self.engine = build_engine("tiny-llama", "prefill", self.seed)
        engine_port = self.engine.training_port()
        port = dataclasses.replace(engine_port, offer=lambda offer: (self.published.append(offer.version),
                                                                     engine_port.offer(offer)))
        self.trainer = OnlineTrainer(copy.deepcopy(self.config), port, self.store, self.tmp_path / "run",
                                     base_model="tiny-llama")
        self.engine.apply_adapter_offer()        # the engine's first step boundary: a resumed version is live

    def step(self) -> bool:
        """The engine thread in interleaved mode: the trainer's hook, then the step boundary."""
        trained = self.trainer.step()
        self.engine.apply_adapter_offer()
        return trained

    def serve(self, num: int = 3) -> list[CompletionRecord]:
        """Serve `num` requests (prefill chunked over several steps) and record each choice."""
        seqs = []
        for _ in range(num):
            prompt = [self.rng.randrange(3, 500) for _ in range(self.rng.randrange(12, 30))]
            params = SamplingParams(temperature=1.0, seed=self.rng.randrange(1 << 30), max_tokens=6, ignore_eos=True)
            seqs += self.engine.add_request(f"chatcmpl-{uuid.uuid4().hex[:12]}", prompt, params)
        while self.engine.has_unfinished():
            self.engine.step()
        records = [CompletionRecord(s.request_id, s.index, list(s.prompt_token_ids), list(s.output_token_ids),
                                    list(s.logprobs), s.adapter_version, None, time.time()) for s in seqs]
        self.store.record_completions(records)
        return records

    def rate(self, records, ratings=None) -> None:
        for i, rec in enumerate(records):
            value = 1 if ratings is None else ratings[i]
            score = {"rating": value} if value in (-1, 1) else {"stars": value[1]}
            self.store.add_feedback(response_id=rec.response_id, choice_index=rec.choice_index, **score)
            self.trainer.pin_for_feedback(rec.response_id, rec.choice_index)

    def serving(self) -> list[torch.Tensor]:
        return [t.detach().clone() for _, m in sorted(self.trainer.adapters.modules.items())
                for t in (m.lora_A, m.lora_B)]

    def masters(self) -> list[torch.Tensor]:
        return [t.detach().clone() for n in self.trainer.names for t in self.trainer.masters[n]]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def norm_of_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float((x - y).pow(2).sum()) for x, y in zip(a, b)))


def test_step_publishes_version_one_mostly_by_reuse(tmp_path):
    rig = Rig(tmp_path)
    records = rig.serve(3)
    rig.rate(records)
    pool = rig.engine.activation_pool
    assert all(pool.get((r.response_id, r.choice_index)).pinned for r in records)
    before = rig.serving()
    assert rig.step()
    assert rig.trainer.version == 1 and rig.engine.adapter_version == 1 and rig.published == [1]
    assert not same(before, rig.serving())                        # the serving LoRA tensors moved
    assert same(rig.serving(), rig.masters())                     # and hold exactly the published masters
    totals = rig.trainer.totals
    assert totals["steps"] == 1 and totals["outcome_hit"] == 3
    assert totals["tokens_reuse"] > totals["tokens_recompute"]
    assert math.isfinite(rig.trainer.last.loss)
    assert all(pool.get((r.response_id, r.choice_index)) is None for r in records)   # released
    assert rig.store.count_feedback("pending") == 3               # marked trained only at a checkpoint
    status = rig.trainer.status()
    assert status["keep_up"]["backlog_ratings"] == 0 and status["keep_up"]["trained_tok_s"] > 0
    assert status["staleness"] == {"0": 3}                        # served and trained at version 0
    assert totals["cpu_seconds"] > 0
    assert not rig.step()                           # read watermark: nothing twice
    rig.trainer.checkpoint()
    assert rig.store.count_feedback("trained") == 3 and not rig.trainer.dirty


def test_step_waits_for_a_batch_or_max_wait(tmp_path):
    """Fewer than min_records_per_step ratings wait (no step, no version) until max_wait_s has passed
    since the first of them; a full batch trains at once."""
    rig = Rig(tmp_path, min_records_per_step=4, max_wait_s=0.3)
    rig.rate(rig.serve(2))
    assert not rig.step() and rig.trainer.version == 0
    time.sleep(0.35)
    rig.trainer.pacing.poll_now()                                  # skip the 1 s poll pause
    assert rig.step() and rig.trainer.version == 1  # waited long enough: a step of 2
    served = rig.serve(4)                                          # served by version 1
    rig.rate(served)
    assert rig.trainer.status()["keep_up"]["backlog_ratings"] == 4
    assert rig.trainer.status()["keep_up"]["backlog_tokens"] > 0
    rig.trainer.pacing.poll_now()
    assert rig.step() and rig.trainer.version == 2  # a full batch: at once
    assert rig.trainer.staleness == {0: 6}                         # each trained against its serving version
    assert rig.trainer.totals["outcome_hit"] + rig.trainer.totals["outcome_stale"] == 6


def test_a_failing_step_pauses_training_until_resume(tmp_path, monkeypatch):
    """The step hook never raises into the engine thread: a failure pauses training, is kept in
    last_error, and resume clears both."""
    rig = Rig(tmp_path)
    rig.rate(rig.serve(2))
    monkeypatch.setattr(rig.trainer, "_work", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert rig.step() is False
    assert rig.trainer.paused and rig.trainer.last_error == "RuntimeError: boom"
    monkeypatch.undo()
    rig.trainer.resume()
    assert not rig.trainer.paused and rig.trainer.last_error is None
    assert rig.step() and rig.trainer.version == 1


def test_ratings_of_a_step_that_failed_are_trained_after_resume(tmp_path, monkeypatch):
    rig = Rig(tmp_path)
    rig.rate(rig.serve(2))
    monkeypatch.setattr("trainer.online.forward_backward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("oom")))
    assert rig.step() is False and rig.trainer.paused
    monkeypatch.undo()
    rig.trainer.resume()
    assert rig.step() and rig.trainer.version == 1
    assert rig.trainer.totals["outcome_hit"] == 2                 # the same two, still pinned: reused
    assert not rig.store.pending_feedback(rig.trainer.read_seq, 1)


def test_non_finite_step_is_skipped_and_nothing_published(tmp_path, monkeypatch):
    """Nothing of a non-finite step is applied; its ratings are bisected, and each whose step is
    non-finite alone (while the probe step is finite) is quarantined as non_finite, not marked trained."""
    rig = Rig(tmp_path)
    rig.rate(rig.serve(2))
    monkeypatch.setattr(rig.trainer, "_loss", lambda logprobs, records: logprobs[0].sum() * float("nan"))
    before, masters = rig.serving(), rig.masters()
    rig.step()
    assert rig.trainer.skipped["non_finite"] == 3 and rig.trainer.totals["steps"] == 0   # both, then each
    assert rig.trainer.version == 0 and rig.engine.adapter_version == 0 and rig.published == []
    assert same(before, rig.serving()) and same(masters, rig.masters())
    assert rig.trainer.adapters.versions() == [0]
    assert rig.trainer.quarantine.counts == {"non_finite": 2} and not rig.trainer.unmarked
    assert rig.trainer.last_error is None and not rig.trainer.paused


def test_non_finite_adapters_pause_training_instead_of_quarantining(tmp_path):
    """If even the probe step is non-finite (the adapters themselves went bad), the fault is the
    trainer's: training pauses and the ratings stay pending."""
    rig = Rig(tmp_path)
    rig.rate(rig.serve(2))
    with torch.no_grad():
        for a, _ in rig.trainer.masters.values():
            a.fill_(float("nan"))
    rig.step()
    assert rig.trainer.paused and "NonFiniteStep" in rig.trainer.last_error
    assert not rig.trainer.quarantine.counts and rig.store.pending_feedback(rig.trainer.read_seq, 4)


def test_max_update_norm_caps_the_update(tmp_path):
    cap = 1e-3
    rig = Rig(tmp_path, lr=0.5, max_update_norm=cap)
    rig.rate(rig.serve(2))
    before = rig.masters()
    assert rig.step() and rig.trainer.version == 1
    moved = norm_of_difference(rig.masters(), before)
    assert rig.trainer.skipped["update_capped"] == 1
    assert cap * 0.99 < moved <= cap * 1.0001
    published = rig.trainer.adapters.state(1)
    first = rig.trainer.adapters.state(0)
    flat = lambda s: [t for n in sorted(s) for t in s[n]]
    assert norm_of_difference(flat(published), flat(first)) <= cap * 1.0001


def test_crash_restart_resumes_checkpoint_and_trains_each_rating_once(tmp_path):
    rig = Rig(tmp_path, checkpoint_every=1)
    served = rig.serve(3)
    for rec in served[:2]:                                  # steps 1 and 2, each checkpointed
        rig.rate([rec])
        assert rig.step()
    assert rig.trainer.version == 2 and rig.store.count_feedback("trained") == 2
    optimizer = copy.deepcopy(rig.trainer.optimizer.state_dict())
    serving_v2, masters_v2 = rig.serving(), rig.masters()
    rig.trainer.config.checkpoint_every = 1000              # step 3 is never checkpointed
    rig.rate(served[2:])
    assert rig.step() and rig.trainer.version == 3
    assert rig.store.count_feedback("pending") == 1

    del rig.trainer                                         # crash: nothing of step 3 was saved
    rig.restart()
    trainer = rig.trainer
    assert trainer.version == 2 and rig.engine.adapter_version == 2 and trainer.step_count == 2
    assert same(rig.serving(), serving_v2) and same(rig.masters(), masters_v2)
    resumed = trainer.optimizer.state_dict()
    assert resumed["param_groups"] == optimizer["param_groups"]
    for key, state in optimizer["state"].items():
        assert all(torch.equal(state[k], resumed["state"][key][k]) for k in state)
    assert trainer.next_version == 4                        # version 3 was served: never reuse its number
    assert rig.store.count_feedback("pending") == 1 and rig.store.count_feedback("trained") == 2

    assert rig.step() and trainer.version == 4    # the 3rd rating again, once, by recompute
    assert trainer.totals["tokens_reuse"] == 0 and trainer.totals["tokens_recompute"] > 0
    assert trainer.totals["outcome_evicted"] == 1
    assert not rig.step()
    trainer.checkpoint()
    assert rig.store.count_feedback("trained") == 3 == rig.store.count_feedback()


def test_rollback_restores_an_older_version_at_the_next_step(tmp_path):
    rig = Rig(tmp_path)
    first, second = rig.serve(1), rig.serve(1)
    rig.rate(first)
    assert rig.step()
    serving_v1 = rig.serving()
    rig.rate(second)
    assert rig.step() and rig.trainer.version == 2
    assert not same(serving_v1, rig.serving())
    with pytest.raises(NotFoundError):
        rig.trainer.request_activate(99)
    rig.trainer.request_activate(1)
    assert rig.engine.adapter_version == 2                  # applies at the next step boundary
    rig.step()
    assert same(rig.serving(), serving_v1) and same(rig.masters(), serving_v1)
    assert rig.trainer.version == 1 and rig.engine.adapter_version == 1 and rig.published[-1] == 1
    rig.rate(rig.serve(1))                                  # the next step builds on version 1 ...
    assert rig.step() and rig.trainer.version == 3   # ... and gets a new number
    rig.trainer.request_activate(1)
    rig.step()
    rig.trainer.checkpoint()                                # the latest checkpoint now holds version 1
    rig.restart()
    assert rig.trainer.version == 1 and same(rig.serving(), serving_v1)
    assert rig.trainer.next_version == 4


@pytest.mark.parametrize("objective", ["sft", "kto", "pg"])
def test_each_objective_takes_a_finite_step(tmp_path, objective):
    rig = Rig(tmp_path, objective=objective)
    records = rig.serve(4)
    rig.rate(records, [1, -1, ("stars", 5), ("stars", 2)])
    assert rig.step()
    assert rig.trainer.version == 1 and rig.trainer.totals["steps"] == 1
    assert math.isfinite(rig.trainer.last.loss)
    assert rig.trainer.skipped["non_finite"] == 0


def test_compile_layers_is_refused_off_cuda_before_it_touches_the_engine(tmp_path):
    """training.compile_layers needs CUDA (the CPU's per-record attention would compile per batch size);
    the error comes before adapters are attached. A backend other than inductor / aot_eager is refused."""
    from common.errors import ConfigError
    engine = build_engine("tiny-llama", "prefill", 0)
    with pytest.raises(ConfigError, match="compile_layers"):
        OnlineTrainer(TrainerConfig(compile_layers=True), engine.training_port(), FeedbackStore(tmp_path / "f.db"), tmp_path / "run")
    assert not any(name.endswith(".base") for name, _ in engine.runner.model.named_modules())   # no LoRA wrappers
    with pytest.raises(ConfigError, match="compile_backend"):
        TrainerConfig(compile_backend="eager")
