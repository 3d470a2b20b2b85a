"""The prompt LM term's targets: only the users' own message tokens (trainer/user_text.py UserText)."""
import pytest
import torch

from tests.helpers import smollm2
from trainer.step import forward_backward
from trainer.user_text import UserText, all_prompt_positions, prompt_lm_positions

LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def _ids(tok, messages, generation_prompt=True) -> list[int]:
    text = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    return tok(text, add_special_tokens=False).input_ids


def _user_text(tok, ids) -> list[str]:
    """The target tokens as text, one string per maximal run of consecutive positions."""
    runs, last = [], None
    for j in UserText.from_tokenizer(tok).positions(ids):
        if last is None or j != last + 1:
            runs.append([])
        runs[-1].append(ids[j])
        last = j
    return [tok.decode(r) for r in runs]


def _fresh_smollm2_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2()[0])


CONVERSATION = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Name three colors."},
                {"role": "assistant", "content": "Red, green and blue."},
                {"role": "user", "content": "And two fruits?"}]


def test_single_turn_is_the_message_only():
    """SmolLM2's template adds a default system prompt: it, the headers and the generation prompt are not
    user text."""
    tok = smollm2()[1]
    assert _user_text(tok, _ids(tok, [{"role": "user", "content": "Why is the sky blue?"}])) == [
        "Why is the sky blue?"]


def test_multi_turn_keeps_each_user_message_and_drops_system_and_assistant():
    tok = smollm2()[1]
    assert _user_text(tok, _ids(tok, CONVERSATION)) == ["Name three colors.", "And two fruits?"]


def test_completion_prompt_without_template_is_all_user_text():
    tok = smollm2()[1]
    ids = tok("The river rose slowly through the night").input_ids
    assert UserText.from_tokenizer(tok).positions(ids) == list(range(1, len(ids)))


def test_llama3_style_header_of_several_tokens():
    tok = _fresh_smollm2_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|begin_of_text|>", "<|start_header_id|>",
                                                          "<|end_header_id|>", "<|eot_id|>"]})
    tok.chat_template = LLAMA3_TEMPLATE
    user = UserText.from_tokenizer(tok)
    assert tok.decode(list(user.open)).strip() == "<|start_header_id|>user<|end_header_id|>"
    assert tok.decode(list(user.close)) == "<|eot_id|>"
    assert [t.strip() for t in _user_text(tok, _ids(tok, CONVERSATION))] == ["Name three colors.",
                                                                             "And two fruits?"]


def test_no_chat_template_gives_none():
    tok = _fresh_smollm2_tokenizer()
    tok.chat_template = None
    assert UserText.from_tokenizer(tok) is None


def test_without_a_usable_tokenizer_every_prompt_token_counts():
    tok = _fresh_smollm2_tokenizer()
    tok.chat_template = None
    assert prompt_lm_positions(None) is all_prompt_positions and prompt_lm_positions(tok) is all_prompt_positions
    user = prompt_lm_positions(_fresh_smollm2_tokenizer())
    ids = _ids(_fresh_smollm2_tokenizer(), CONVERSATION)
    assert user is not all_prompt_positions and 0 < len(user(ids)) < len(ids) - 1


def test_the_online_trainer_uses_the_engines_chat_template(tmp_path):
    from tests.test_online_trainer import Rig
    rig = Rig(tmp_path)                              # tiny random model: no tokenizer
    assert rig.trainer.prompt_lm_targets is all_prompt_positions


def test_term_covers_only_the_given_targets(tmp_path):
    """loss = objective + w * mean NLL of the prompt tokens at the target positions (HF's NLL)."""
    from tests.helpers import make_tiny_model, tiny_engine
    from trainer.adapters import AdapterManager
    from trainer.lora import LoRAConfig
    from trainer.reuse import TrainRecord
    hf = make_tiny_model("llama-untied-gqa1", tmp_path)
    model = tiny_engine(tmp_path).runner.model
    manager = AdapterManager(model, LoRAConfig(rank=2, alpha=4, targets=("q_proj",)))   # B = 0: the base model
    adapters = manager.training_adapters(manager.masters())
    records = [TrainRecord("a", [5, 9, 13, 21, 7, 40], [3, 8, 11]), TrainRecord("b", [6, 10, 14, 22], [4, 9])]
    targets = {6: [2, 3, 4], 4: [3]}                               # prompt length -> user positions
    plain = forward_backward(model, records, adapters, reuse=False).loss
    anchored = forward_backward(model, records, adapters, reuse=False, prompt_lm_weight=0.5,
                                prompt_lm_targets=lambda ids: targets[len(ids)]).loss
    nlls = []
    with torch.no_grad():
        for r in records:
            logp = hf(torch.tensor([r.prompt_ids])).logits[0].float().log_softmax(-1)     # [P, V]
            where = targets[len(r.prompt_ids)]
            nlls += [-float(logp[j - 1, r.prompt_ids[j]]) for j in where]
    assert anchored == pytest.approx(plain + 0.5 * sum(nlls) / len(nlls), rel=1e-5)
    everything = forward_backward(model, records, adapters, reuse=False, prompt_lm_weight=0.5).loss
    assert everything != pytest.approx(anchored, rel=1e-6)          # default: every prompt token
