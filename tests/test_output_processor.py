"""Model-free tests of incremental detokenization and stop strings, with a byte-level fake tokenizer."""
import itertools
import random

import pytest

from engine.block_manager import BlockManager
from engine.output_processor import IncrementalDetokenizer, SequenceTextState
from engine.sampling_params import SamplingParams
from engine.scheduler import SampleResult, Scheduler, SchedulerConfig
from engine.sequence import Sequence

EOS = 0
VOCAB = {
    EOS: b"</s>", 1: b"Hello", 2: b" wor", 3: b"ld", 4: b"!", 5: b"\xc3", 6: b"\xa9",   # 5+6 = "é"
    7: b"\n", 8: b"ST", 9: b"OP", 10: b"a-b-c", 11: b"x", 12: b"STOP and more", 13: b"\xe2\x82",
    14: b"\xac",                                                                        # 13+14 = "€"
}


class FakeTokenizer:
    def __init__(self):
        self.calls = 0

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        assert clean_up_tokenization_spaces is False
        self.calls += 1
        data = b"".join(b"" if (skip_special_tokens and i == EOS) else VOCAB[i] for i in ids)
        return data.decode("utf-8", errors="replace")


TOK = FakeTokenizer()
_ids = itertools.count()


def make_seq(**params):
    return Sequence(next(_ids), "r", 0, [1, 2, 3], SamplingParams(**params), seed=0)


def feed(tokens, finish_at=None, **params):
    """Append tokens one by one, advancing the text state like the engine; returns per-step (text, stop)."""
    seq = make_seq(**params)
    state = SequenceTextState(seq, TOK)
    out = []
    for k, t in enumerate(tokens):
        seq.append_token(t, -0.1, None)
        finished = finish_at is not None and k + 1 == finish_at
        text, stop = state.advance(finished)
        out.append((text, stop))
        if stop is not None or finished:
            break
    return out


def joined(steps):
    return "".join(t for t, _ in steps)


def test_incremental_matches_full_decode_randomized():
    rng = random.Random(7)
    for _ in range(300):
        ids = [rng.choice(list(VOCAB)) for _ in range(rng.randrange(1, 12))]
        detok, parts = IncrementalDetokenizer(TOK), []
        for k in range(1, len(ids) + 1):
            parts.append(detok.step(ids[:k]))
            assert "\ufffd" not in parts[-1][-1:], "emitted text ends in an incomplete character"
        parts.append(detok.flush(ids))
        assert "".join(parts) == TOK.decode(ids), ids


def test_multichar_tokens_and_incomplete_utf8_waits():
    detok = IncrementalDetokenizer(TOK)
    ids = [1, 5]
    assert detok.step(ids[:1]) == "Hello"
    assert detok.step(ids) == ""                 # "\xc3" alone: wait for the rest of the character
    ids.append(6)
    assert detok.step(ids) == "é"
    ids += [13]
    assert detok.step(ids) == ""
    ids += [14, 2]
    assert detok.step(ids) == "€ wor"            # two tokens complete the char, then more text
    assert detok.flush(ids) == ""


def test_incomplete_char_flushed_as_is_at_finish():
    steps = feed([1, 5], finish_at=2, max_tokens=2)
    assert steps == [("Hello", None), ("\ufffd", None)]


def test_special_tokens_skipped():
    assert joined(feed([1, EOS], finish_at=2)) == "Hello"
    detok = IncrementalDetokenizer(TOK, skip_special_tokens=False)
    assert detok.step([1, EOS]) == "Hello</s>"


def test_stop_string_across_token_boundary_not_returned():
    steps = feed([1, 8, 9, 4], stop=["STOP"])
    assert steps == [("He", None), ("ll", None), ("o", "STOP")]     # the last 3 chars are held back


def test_stop_string_included_when_asked():
    steps = feed([1, 8, 9, 4], stop=["STOP"], include_stop_str_in_output=True)
    assert joined(steps) == "HelloSTOP" and steps[-1][1] == "STOP"


def test_text_after_stop_in_same_token_dropped():
    assert joined(feed([1, 12], stop=["STOP"])) == "Hello"
    assert joined(feed([1, 12], stop=["STOP"], include_stop_str_in_output=True)) == "HelloSTOP"


@pytest.mark.parametrize("tokens, stops, want_text, want_stop", [
    ([1, 10], ["c", "b-"], "Helloa-", "b-"),
    ([1, 10], ["b-", "c"], "Helloa-", "b-"),
    ([1, 10], ["-c", "a-b"], "Hello", "a-b"),
    ([1, 2], ["wor", "lo w"], "Hel", "lo w"),      # earliest start wins, even spanning the boundary
])
def test_earliest_of_several_stop_strings_wins(tokens, stops, want_text, want_stop):
    steps = feed(tokens, stop=stops)
    assert steps[-1][1] == want_stop and joined(steps) == want_text


def test_text_held_back_while_stop_could_form_then_flushed():
    steps = feed([1, 11, 2], finish_at=3, stop=["xyzw"])       # hold = 3 characters
    assert steps == [("He", None), ("l", None), ("lox wor", None)]
    # the suffix "ld" could start "ld!?" so it is held, then released when it cannot
    steps = feed([1, 2, 3, 4, 1], stop=["ld!?"])
    assert joined(steps) == "Hello world!He" and all(s is None for _, s in steps)


def test_stop_string_completing_a_utf8_char():
    steps = feed([1, 5, 6, 4], stop=["é"])
    assert steps == [("Hello", None), ("", None), ("", "é")]


def test_no_detokenize_returns_no_text():
    assert feed([1, 8, 9], stop=["STOP"], detokenize=False) == [("", None)] * 3


def test_engine_loop_stop_string_finishes_and_frees_blocks():
    """The engine's loop: schedule -> fake runner -> postprocess -> stop strings finish the sequence."""
    bm = BlockManager(16, 4)
    sched = Scheduler(SchedulerConfig(4, 16, 64), bm, {EOS})
    script = [1, 2, 3, 8, 9, 4, 4]
    seqs = [Sequence(next(_ids), f"r{i}", 0, list(range(20, 30)), SamplingParams(max_tokens=7, stop=stop), 0)
            for i, stop in enumerate([["ldS"], []])]
    states, texts = {}, {}
    for s in seqs:
        sched.add(s)
        states[s.seq_id], texts[s.seq_id] = SequenceTextState(s, TOK), ""
    while sched.has_unfinished():
        batch = sched.schedule()
        results = [SampleResult(script[s.num_output_tokens], -0.1) if batch.samples(i) else None
                   for i, s in enumerate(batch.seqs)]
        sched.postprocess(batch, results)
        for s, r in zip(batch.seqs, results):
            if r is None:
                continue
            text, stop = states[s.seq_id].advance(s.is_finished)
            texts[s.seq_id] += text
            if stop is not None and not s.is_finished:
                s.stop_reason = stop
                sched.finish(s, "stop")
    a, b = seqs
    assert (texts[a.seq_id], a.finish_reason, a.stop_reason, a.num_output_tokens) == ("Hello wor", "stop", "ldS", 4)
    assert (texts[b.seq_id], b.finish_reason, b.num_output_tokens) == ("Hello worldSTOP!!", "length", 7)
    assert bm.num_free_blocks == bm.num_blocks
