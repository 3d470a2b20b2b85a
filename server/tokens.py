"""Tokenizer helpers: chat prompts, prompt lists, per-token text and bytes for logprobs."""
from __future__ import annotations

from functools import lru_cache

from common.errors import InvalidRequestError


def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE: the printable character that stands for each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenTexts:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._bytes_of = _byte_decoder()
        self.info = lru_cache(maxsize=65536)(self._info)

    def _info(self, token_id: int) -> tuple[str, list[int]]:
        """(text, utf-8 bytes) of one token; exact bytes for byte-level BPE vocabularies."""
        text = self.tokenizer.decode([token_id], skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and piece and all(ch in self._bytes_of for ch in piece) \
                and token_id not in self.tokenizer.all_special_ids:
            return text, [self._bytes_of[ch] for ch in piece]
        return text, list(text.encode("utf-8", errors="replace"))

    # -- prompts -------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                      tokenize=False)
        except Exception as exc:                 # a template that rejects this conversation
            raise InvalidRequestError(f"cannot apply the chat template: {exc}", param="messages") from exc
        return self.encode(text, add_special_tokens=False)

    def text_prompt(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.encode(text, add_special_tokens)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """Token ids of `text`, through the Rust tokenizer's batch call where there is one: that call
        lets go of the GIL while it works, its one-text call does not (10 MB of text: ~20 s in which
        no other Python thread, the event loop included, runs)."""
        backend = self._backend()
        if backend is None:
            return list(self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)   # fast: no offsets (5x)
        return encode([text], add_special_tokens=add_special_tokens)[0].ids

    def _backend(self):
        """The tokenizers.Tokenizer of a fast tokenizer that neither truncates nor pads, else None."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None or backend.truncation is not None or backend.padding is not None:
            return None
        return backend

    def decode(self, token_ids: list[int]) -> str:
        vocab = len(self.tokenizer)
        if any(not 0 <= t < vocab for t in token_ids):
            raise InvalidRequestError(f"token ids must be in [0, {vocab})", param="tokens")
        backend = self._backend()
        if backend is not None:                  # the batch call lets go of the GIL (see encode)
            return backend.decode_batch([token_ids], skip_special_tokens=False)[0]
        return self.tokenizer.decode(token_ids, skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)
