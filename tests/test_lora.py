"""LoRA by module replacement on the engine's model, versioned publish/rollback, and the PEFT format:
an adapter exported by us gives the same logits in HF transformers + peft as in our engine, and one
saved by peft loads into our engine with the same logits (fp32, CPU, atol 1e-4)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from common.errors import ConfigError, ConflictError, NotFoundError
from engine.packing import add_lora
from engine.sampling_params import SamplingParams
from tests.helpers import (TINY_CONFIGS, TINY_VOCAB, LogitRecorder, go_live, hf_logits, make_tiny_model,
                           tiny_engine)
from trainer.adapters import AdapterManager, export_peft, load_peft
from trainer.lora import ALL_PROJECTIONS, LoRAConfig, LoRALinear, apply_lora

ATOL = 1e-4
CONFIG = LoRAConfig(rank=4, alpha=8)


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    make_tiny_model(request.param, path, seed=7)
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-tied-gqa4-bias")
    make_tiny_model("llama-tied-gqa4-bias", path, seed=3)
    return path


def engine_with_recorder(path):
    engine = tiny_engine(path, enable_prefix_caching=False)     # a new adapter must not reuse old KV
    return engine, LogitRecorder(engine)


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, TINY_VOCAB, (n,), generator=gen).tolist() for n in (5, 17)]


def run_greedy(engine, rec: LogitRecorder, max_tokens: int = 4) -> list[tuple[list[int], torch.Tensor]]:
    """Per sequence: (token ids, logits [L-1, V] of every position the engine computed)."""
    rec.rows.clear()
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    engine.generate(prompts(), params)
    by_seq: dict[int, tuple[object, dict[int, torch.Tensor]]] = {}
    for seq, pos, row in rec.rows:
        by_seq.setdefault(id(seq), (seq, {}))[1][pos] = row
    return [(list(seq.token_ids), torch.stack([rows[p] for p in sorted(rows)])) for seq, rows in by_seq.values()]


def same_outputs(a, b) -> bool:
    return all(ta == tb and torch.equal(la, lb) for (ta, la), (tb, lb) in zip(a, b))


def random_masters(manager: AdapterManager, seed: int) -> dict:
    """Non-zero A and B large enough to move the logits clearly."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, (a, b) in manager.masters().items():
        new_a = torch.randn(a.shape, generator=gen) / a.shape[1] ** 0.5
        new_b = torch.randn(b.shape, generator=gen) / b.shape[1] ** 0.5 * 0.5
        out[name] = (new_a.requires_grad_(True), new_b.requires_grad_(True))
    return out


# -- config and module replacement ---------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [dict(rank=0), dict(rank=2.5), dict(alpha=0), dict(alpha=float("nan")),
                                    dict(targets=()), dict(targets="q_proj"), dict(targets=("q_proj", "q_proj")),
                                    dict(dropout=0.05)])
def test_config_rejects_what_cannot_work(kwargs):
    with pytest.raises(ConfigError):
        LoRAConfig(**kwargs)


def test_apply_lora_replaces_exactly_the_targets_and_keeps_hf_names(llama):
    model = tiny_engine(llama).runner.model
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
    config = LoRAConfig(rank=4, alpha=8, targets=("q_proj", "down_proj"))
    wrapped = apply_lora(model, config)
    want = sorted(n for n in linears if n.endswith((".q_proj", ".down_proj")))
    assert sorted(wrapped) == want and "model.layers.0.self_attn.q_proj" in wrapped
    for name, base in linears.items():
        module = model.get_submodule(name)
        if name in wrapped:
            assert module is wrapped[name] and isinstance(module, LoRALinear) and module.base is base
            assert module.weight is base.weight and module.bias is base.bias
            assert (module.in_features, module.out_features) == (base.in_features, base.out_features)
            assert module.lora_A.shape == (4, base.in_features) and module.lora_B.shape == (base.out_features, 4)
        else:
            assert module is base                                   # k/v/o/gate/up, lm_head untouched
    params = dict(model.named_parameters())
    assert "model.layers.1.mlp.down_proj.base.weight" in params and "model.layers.1.mlp.down_proj.lora_B" in params
    assert not any(p.requires_grad for n, p in params.items() if ".base." in n)
    with pytest.raises(ConfigError, match="already applied"):
        apply_lora(model, config)


def test_apply_lora_rejects_a_target_that_matches_nothing(llama):
    model = tiny_engine(llama).runner.model
    with pytest.raises(ConfigError, match="c_attn"):
        apply_lora(model, LoRAConfig(targets=("q_proj", "c_attn")))


def test_serving_output_is_base_plus_scaled_delta():
    """What serving computes for one wrapped projection (engine.packing.add_lora over the base output)."""
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    lin = LoRALinear(base, rank=3, scaling=2.0, generator=torch.Generator().manual_seed(1))
    assert torch.all(lin.lora_B == 0) and 0 < lin.lora_A.abs().max() <= 8 ** -0.5   # PEFT's init
    x = torch.randn(5, 8)
    base_out = base(x)
    assert torch.equal(add_lora(lin, x, base_out), base_out)
    with torch.no_grad():
        lin.lora_B.normal_()
    want = base_out + 2.0 * (x @ lin.lora_A.T) @ lin.lora_B.T
    out = add_lora(lin, x, base_out)
    assert torch.allclose(out, want, atol=1e-6)
    assert out is not base_out and torch.equal(base_out, base(x))     # out of place: base rows may be pool rows


# -- serving: B = 0, publish, rollback ------------------------------------------------------------------

def test_zero_b_keeps_the_engine_logits(llama):
    engine, rec = engine_with_recorder(llama)
    before = run_greedy(engine, rec)
    manager = AdapterManager(engine.runner.model, LoRAConfig())
    assert engine.adapter_version == 0 and len(manager.modules) == 2 * len(ALL_PROJECTIONS)
    assert same_outputs(run_greedy(engine, rec), before)


def test_publish_copies_in_place_and_bumps_the_version(llama):
    engine = tiny_engine(llama)
    manager = AdapterManager(engine.runner.model, CONFIG)
    ptrs = {n: (a.data_ptr(), b.data_ptr()) for n, (a, b) in manager.serving_state().items()}
    masters = manager.masters()
    a0, b0 = next(iter(masters.values()))
    assert a0.is_leaf and a0.requires_grad and a0.dtype == torch.float32 and torch.all(b0 == 0)
    assert not any(t.requires_grad for ab in manager.serving_state().values() for t in ab)
    adapters = manager.training_adapters(masters)          # what trainer.reuse.TrainingContext takes
    assert set(adapters) == set(manager.modules.values())
    assert adapters[manager.modules[next(iter(masters))]] == (a0, b0, CONFIG.scaling)
    new = random_masters(manager, seed=1)
    offer = manager.stage(new, version=1)
    assert engine.adapter_version == 0 and manager.versions() == [0, 1]      # kept, not served yet
    go_live(engine, offer)
    assert engine.adapter_version == 1
    for name, (a, b) in manager.serving_state().items():
        assert (a.data_ptr(), b.data_ptr()) == ptrs[name]
        assert torch.equal(a, new[name][0].detach()) and torch.equal(b, new[name][1].detach())
    assert all(torch.equal(m[0], new[n][0]) for n, m in manager.masters(1).items())
    with pytest.raises(ConflictError):
        manager.stage(new, version=1)
    bad = dict(new)
    bad.pop(next(iter(bad)))
    with pytest.raises(ConfigError):
        manager.stage(bad, version=2)


def test_activate_rolls_back_to_old_outputs(llama):
    engine, rec = engine_with_recorder(llama)
    manager = AdapterManager(engine.runner.model, CONFIG, max_history=3)
    base = run_greedy(engine, rec)
    go_live(engine, manager.stage(random_masters(manager, seed=1), version=1))
    v1 = run_greedy(engine, rec)
    go_live(engine, manager.stage(random_masters(manager, seed=2), version=2))
    v2 = run_greedy(engine, rec)
    assert not same_outputs(v1, base) and not same_outputs(v2, v1)
    go_live(engine, manager.stage_kept(1))
    assert engine.adapter_version == 1 and same_outputs(run_greedy(engine, rec), v1)
    go_live(engine, manager.stage_kept(0))
    assert same_outputs(run_greedy(engine, rec), base)
    # the history keeps the most recently staged or re-staged versions: 2 is the one to go
    go_live(engine, manager.stage(random_masters(manager, seed=3), version=3))
    assert manager.versions() == [0, 1, 3]
    with pytest.raises(NotFoundError):
        manager.stage_kept(2)
    go_live(engine, manager.stage_kept(1))
    assert same_outputs(run_greedy(engine, rec), v1)


def test_a_version_going_live_mid_answer_is_recorded_per_token(llama):
    """An offer applied while a sequence decodes serves its next tokens; the sequence records where each
    version began, and a sequence still waiting moves to the new version whole (its prompt KV too)."""
    engine = tiny_engine(llama, enable_prefix_caching=False)
    manager = AdapterManager(engine.runner.model, CONFIG)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, detokenize=False)
    (running,) = engine.add_request("running", prompts()[1], params)
    while running.num_output_tokens < 2:
        engine.step()
    (waiting,) = engine.add_request("waiting", prompts()[0], params)
    engine.offer_adapter(manager.stage(random_masters(manager, seed=1), version=1))
    assert running.adapter_versions == [(0, 0)]                  # an offer is not live before a boundary
    engine.step()
    first = running.num_output_tokens - 1                         # the token this step produced
    assert running.adapter_versions == [(0, 0), (first, 1)] and running.adapter_version == 0
    assert waiting.adapter_versions == [(0, 1)] and waiting.adapter_version == 1
    while engine.has_unfinished():
        engine.step()
    assert running.adapter_versions == [(0, 0), (first, 1)]


# -- PEFT format -------------------------------------------------------------------------------------

def assert_engine_matches(engine, rec, hf) -> None:
    """Every logits row the engine computes in greedy generation equals HF's at the same position."""
    for token_ids, logits in run_greedy(engine, rec):
        ref = hf_logits(hf, token_ids)[:len(logits)]
        err = (logits - ref).abs().max().item()
        assert err < ATOL, f"max |diff| {err}"


def test_exported_adapter_loads_in_peft_with_the_same_logits(tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    engine, rec = engine_with_recorder(tiny)
    manager = AdapterManager(engine.runner.model, CONFIG)
    go_live(engine, manager.stage(random_masters(manager, seed=5), version=1))
    export_peft(manager.state(1), tmp_path / "adapter", CONFIG, str(tiny))
    hf = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32).eval()
    base_logits = hf_logits(hf, prompts()[1])
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    assert (hf_logits(peft_model, prompts()[1]) - base_logits).abs().max() > 0.1, (hf_logits(peft_model, prompts()[1]) - base_logits).abs().max()
    assert_engine_matches(engine, rec, peft_model)


def test_adapter_saved_by_peft_loads_into_the_engine(llama, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(llama), dtype=torch.float32)
    torch.manual_seed(11)
    peft_cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                          lora_dropout=0.0, task_type="CAUSAL_LM", init_lora_weights=False)
    peft_model = get_peft_model(hf, peft_cfg).eval()
    peft_model.save_pretrained(str(tmp_path / "saved"))
    state, config = load_peft(tmp_path / "saved")
    assert (config.rank, config.alpha, set(config.targets)) == (4, 16, {"q_proj", "v_proj", "down_proj"})
    engine, rec = engine_with_recorder(llama)
    manager = AdapterManager(engine.runner.model, config)
    go_live(engine, manager.stage(state, version=1))
    assert_engine_matches(engine, rec, peft_model)


def test_load_peft_round_trip_and_validation(llama, tmp_path):
    manager = AdapterManager(tiny_engine(llama).runner.model, CONFIG)
    state = {n: (a.detach(), b.detach()) for n, (a, b) in random_masters(manager, seed=9).items()}
    export_peft(state, tmp_path / "a", CONFIG, "tiny-base")
    loaded, config = load_peft(tmp_path / "a")
    assert config == CONFIG and sorted(loaded) == sorted(state)
    assert all(torch.equal(loaded[n][0], a) and torch.equal(loaded[n][1], b) for n, (a, b) in state.items())
    with pytest.raises(NotFoundError):
        load_peft(tmp_path / "missing")
    raw = (tmp_path / "a" / "adapter_config.json").read_text()
    (tmp_path / "a" / "adapter_config.json").write_text(raw.replace('"use_dora": false', '"use_dora": true'))
    with pytest.raises(ConfigError, match="use_dora"):
        load_peft(tmp_path / "a")
    other = AdapterManager(tiny_engine(llama).runner.model, LoRAConfig(rank=8, alpha=16))
    with pytest.raises(ConfigError, match="same rank"):
        other.stage(loaded, version=1)
