"""The prompt LM term's targets (DESIGN §4, issue 5): the tokens of the users' own messages, read off
the tokenizer's chat template — not the template, role headers, system prompt, earlier assistant turns or
the generation prompt, which an LM term would otherwise teach the model to produce everywhere."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

def _find(seq: list[int], sub: tuple[int, ...], start: int) -> int:
    """First index >= start where `sub` occurs in `seq`, or -1."""
    for i in range(start, len(seq) - len(sub) + 1):
        if tuple(seq[i:i + len(sub)]) == sub:
            return i
    return -1


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@dataclass(frozen=True)
class UserText:
    """Where the users' own messages sit in a prompt, read off the tokenizer's chat template: from after
    each `open` (the user header, e.g. `<|im_start|>user\\n`) up to the next `close` (e.g. `<|im_end|>`).
    System prompts, earlier assistant turns, role headers and the generation prompt are not user text.
    A prompt holding none of the template's marker tokens (a /v1/completions text) is all user text."""
    open: tuple[int, ...]
    close: tuple[int, ...]
    markers: frozenset[int]         # the special tokens in open + close

    def positions(self, prompt_ids: list[int]) -> list[int]:
        """Indices j >= 1 of the prompt tokens that are user text (predicted from prompt[:j])."""
        if not self.markers.intersection(prompt_ids):
            return list(range(1, len(prompt_ids)))
        out, j = [], _find(prompt_ids, self.open, 0)
        while j >= 0:
            start = j + len(self.open)
            end = _find(prompt_ids, self.close, start) if self.close else -1
            end = len(prompt_ids) if end < 0 else end
            out += range(max(start, 1), end)
            j = _find(prompt_ids, self.open, end)
        return out

    @classmethod
    def from_tokenizer(cls, tok) -> "UserText | None":
        """Render one user message with two contents; the template is what the renders share. None if
        the tokenizer has no chat template or its user header has no special token to anchor on."""
        if tok is None or not getattr(tok, "chat_template", None):
            return None
        render = lambda text: list(tok(tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False),
                                       add_special_tokens=False).input_ids)
        a, b = render("Alpha beta gamma."), render("Zulu yankee xray?")
        head = _common_prefix(a, b)
        tail = _common_prefix(a[head:][::-1], b[head:][::-1])
        prefix, suffix = a[:head], a[len(a) - tail:]
        special = set(tok.all_special_ids) | {i for i, t in getattr(tok, "added_tokens_decoder", {}).items()
                                              if getattr(t, "special", False)}
        named = [i for i, t in enumerate(prefix) if "user" in tok.decode([t]).lower()]
        starts = [i for i, t in enumerate(prefix[:named[-1] + 1] if named else prefix) if t in special]
        if not starts:
            return None
        ends = [i for i, t in enumerate(suffix) if t in special]
        close = tuple(suffix[:ends[0] + 1] if ends else suffix)
        open_ = tuple(prefix[starts[-1]:])
        return cls(open_, close, frozenset(t for t in open_ + close if t in special))


def all_prompt_positions(prompt_ids: list[int]) -> list[int]:
    return list(range(1, len(prompt_ids)))


def prompt_lm_positions(tokenizer) -> Callable[[list[int]], list[int]]:
    """The prompt LM term's target positions for this tokenizer: its user messages; every prompt token
    when there is no tokenizer or its chat template has no special token to anchor on."""
    user = UserText.from_tokenizer(tokenizer)
    return user.positions if user is not None else all_prompt_positions
