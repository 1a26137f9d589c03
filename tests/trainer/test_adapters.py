"""adapters.py, modeling.py and training_args.py: spec -> peft config / 4-bit loading / TrainingArguments, and
the ConfigErrors that stop a job before training (unknown target modules, missing model, ...).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/trainer/test_adapters.py -q
"""

from __future__ import annotations

import pytest

from kubetune_trainer import adapters, modeling, training_args
from kubetune_trainer.errors import ConfigError


@pytest.fixture(scope="module")
def base(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model)


def test_lora_config_uses_effective_defaults(make_job):
    cfg = adapters.peft_config(make_job(adapter={"type": "lora", "rank": None}).spec)
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (16, 32, 0.05)
    assert cfg.target_modules == "all-linear" and cfg.use_dora is False and cfg.init_lora_weights is True
    assert cfg.task_type == "CAUSAL_LM"


@pytest.mark.parametrize("adapter,check", [
    ({"type": "dora", "rank": 4}, lambda c: c.use_dora and c.r == 4),
    ({"type": "lora", "useRslora": True, "alpha": 8}, lambda c: c.use_rslora and c.lora_alpha == 8),
    ({"type": "lora", "init": "pissa"}, lambda c: c.init_lora_weights == "pissa"),
    ({"type": "lora", "init": "olora"}, lambda c: c.init_lora_weights == "olora"),
    ({"type": "qlora", "init": "gaussian", "targetModules": ["q_proj"]},
     lambda c: c.init_lora_weights == "gaussian" and set(c.target_modules) == {"q_proj"}),
])
def test_adapter_variants(make_job, adapter, check):
    assert check(adapters.peft_config(make_job(adapter=adapter).spec))


def test_reward_models_get_a_trainable_head(make_job):
    assert adapters.peft_config(make_job().spec, "reward").task_type == "SEQ_CLS"


@pytest.mark.parametrize("kind", ["full", "galore"])
def test_full_and_galore_use_no_peft(make_job, kind):
    spec = make_job(adapter={"type": kind, "rank": None}).spec
    assert adapters.peft_config(spec) is None and not adapters.uses_peft(spec)


def test_unknown_target_module_lists_the_models_linear_modules(make_job, base):
    spec = make_job(adapter={"targetModules": ["q_proj", "query_key_value"]}).spec
    with pytest.raises(ConfigError) as e:
        adapters.validate(spec, base)
    assert e.value.field == "spec.adapter.targetModules"
    assert "'query_key_value'" in e.value.message and "'q_proj'" not in e.value.message.split(";")[0]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in e.value.message
    adapters.validate(make_job(adapter={"targetModules": ["q_proj", "down_proj"]}).spec, base)  # fine


def test_all_linear_is_exclusive(make_job, base):
    with pytest.raises(ConfigError, match="all-linear"):
        adapters.validate(make_job(adapter={"targetModules": ["all-linear", "q_proj"]}).spec, base)


def test_galore_training_args_and_checks(make_job, base):
    spec = make_job(adapter={"type": "galore", "rank": None,
                             "galore": {"rank": 8, "updateProjGap": 50, "scale": 0.5}}).spec
    extra = adapters.training_args_additions(spec)
    assert extra == {"optim": "galore_adamw", "optim_target_modules": ["attn", "mlp"],
                     "optim_args": "rank=8,update_proj_gap=50,scale=0.5"}
    adapters.validate(spec, base)
    bad = make_job(adapter={"type": "galore", "rank": None, "galore": {"targetModules": ["attention"]}}).spec
    with pytest.raises(ConfigError) as e:
        adapters.validate(bad, base)
    assert e.value.field == "spec.adapter.galore.targetModules"
    eight = make_job(adapter={"type": "galore", "rank": None, "galore": {"optimizer": "galore_adamw_8bit"}}).spec
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        adapters.validate(eight, base)


def test_qlora_with_pissa_is_refused(make_job, base):
    with pytest.raises(ConfigError) as e:
        adapters.validate(make_job(adapter={"type": "qlora", "init": "pissa"}).spec, base)
    assert e.value.field == "spec.adapter.init"


# ------------------------------------------------------------------------------------------------ modeling
def test_missing_model_is_a_config_error_naming_the_source(tmp_path):
    with pytest.raises(ConfigError) as e:
        modeling.fetch_model(f"file://{tmp_path}/nope", tmp_path / "cache")
    assert e.value.field == "spec.model.source" and "nope" in e.value.message
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "weights.bin").write_text("")
    with pytest.raises(ConfigError) as e:
        modeling.fetch_model(f"file://{tmp_path}/empty", tmp_path / "cache")
    assert "no config.json" in e.value.message and "weights.bin" in e.value.message


def test_unloadable_model_is_a_config_error(tmp_path, make_job):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(ConfigError) as e:
        modeling.load_model(tmp_path, make_job().spec, uri="s3://models/broken")
    assert e.value.field == "spec.model.source" and "s3://models/broken" in e.value.message


def test_qlora_loads_4bit_on_cpu_and_reward_loads_a_one_label_head(tiny_model, make_job):
    import bitsandbytes as bnb
    import torch

    spec = make_job(adapter={"type": "qlora"}).spec
    tok = modeling.load_tokenizer(tiny_model, spec)
    m = modeling.load_model(tiny_model, spec, tokenizer=tok)
    assert isinstance(m.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert m.model.layers[0].self_attn.q_proj.weight.quant_type == "nf4"
    assert modeling.compute_dtype(spec) == torch.float32  # CPU
    prepared = adapters.prepare_base(m, spec)
    assert not any(p.requires_grad for p in prepared.parameters())  # only the adapter will train
    r = modeling.load_model(tiny_model, make_job().spec, kind="reward", tokenizer=tok)
    assert r.config.num_labels == 1 and r.config.pad_token_id == tok.pad_token_id
    assert r(torch.tensor([[5, 6, 7]])).logits.shape == (1, 1)
    assert modeling.resolve_dtype(spec) == torch.float32


def test_qlora_counts_parameters_not_packed_4bit_storage(tiny_model, make_job):
    """The same LoRA on the same base trains the same number of parameters out of the same total, whether the
    base is 4-bit (two weights per stored byte) or full precision."""
    counts = {}
    for kind in ("lora", "qlora"):
        spec = make_job(adapter={"type": kind, "rank": 8}).spec
        base = adapters.prepare_base(modeling.load_model(tiny_model, spec), spec)
        counts[kind] = adapters.trainable_parameters(adapters.wrap(base, adapters.peft_config(spec)))
    assert counts["qlora"] == counts["lora"]
    trainable, total = counts["qlora"]
    assert 0 < trainable < total


def test_tokenizer_without_pad_token_pads_with_eos(tiny_model, tmp_path, make_job):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    loaded = modeling.load_tokenizer(tmp_path, make_job().spec)
    assert loaded.pad_token == loaded.eos_token


# ------------------------------------------------------------------------------------------------ args
def test_training_args_on_cpu(make_job, tmp_path):
    job = make_job(training={"precision": "bf16", "warmupRatio": 0.1, "gradientCheckpointing": False})
    kw = training_args.build(job, tmp_path, has_eval=True)
    assert kw["use_cpu"] is True and kw["bf16"] is False and kw["fp16"] is False  # TRL defaults bf16=True
    assert kw["gradient_checkpointing"] is False  # TRL defaults it to True
    assert kw["logging_nan_inf_filter"] is False and kw["report_to"] == [] and kw["disable_tqdm"] is True
    assert kw["eval_strategy"] == "steps" and kw["eval_steps"] == 50 and kw["eval_on_start"] is True
    assert kw["save_strategy"] == "steps" and kw["save_steps"] == 50 and kw["save_total_limit"] == 2
    assert kw["max_steps"] == 3 and kw["warmup_steps"] == 0.1 and kw["include_num_input_tokens_seen"] is True
    assert kw["output_dir"].startswith(str(tmp_path))
    no_eval = training_args.build(make_job(training={"maxSteps": None, "epochs": 2}), tmp_path, has_eval=False)
    assert no_eval["eval_strategy"] == "no" and no_eval["max_steps"] == -1 and no_eval["num_train_epochs"] == 2
    galore = training_args.build(make_job(adapter={"type": "galore", "rank": None}), tmp_path, has_eval=False)
    assert galore["optim"] == "galore_adamw"
    # every kwarg is a real TrainingArguments / SFTConfig field
    from trl import SFTConfig

    SFTConfig(**kw)


# ------------------------------------------------------------------------------------------------ merge
def test_merge_goes_into_a_full_precision_base_and_matches_the_adapter(tiny_model, make_job, tmp_path):
    import torch
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    spec = make_job(adapter={"type": "qlora", "rank": 4, "targetModules": ["q_proj", "v_proj"]}).spec
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), adapters.peft_config(spec))
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter (B starts at zero, which would make merging trivial)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    model.save_pretrained(tmp_path / "adapter")
    merged = adapters.merge(tmp_path / "adapter", tiny_model, spec)
    assert not any("Linear4bit" in type(m).__name__ for m in merged.modules())  # qlora: NOT the 4-bit base
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), tmp_path / "adapter")
    plain = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, reference(ids).logits, atol=1e-4)
        assert not torch.allclose(merged(ids).logits, plain(ids).logits, atol=1e-3)
