"""kubetune_api.memory against real tensors on CPU: parameter, gradient and optimizer-state bytes must match
exactly; activations (what autograd saves for backward) within a tolerance.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/trainer/test_memory_estimate.py -q

The estimate's cuda=False mode is what a CPU run holds (fp32 everywhere, no CUDA runtime), so the same
formulas the operator uses for GPUs are checked byte for byte here; bench/estimator_vs_gpu.py does the GPU side.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from kubetune_api import memory  # noqa: E402
from kubetune_api.finetunejob import FineTuneJobSpec  # noqa: E402

CONFIG = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 176,
          "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
          "tie_word_embeddings": False, "torch_dtype": "float32", "max_position_embeddings": 256}
BATCH, SEQ = 2, 48


def _spec(adapter: dict, stage: str = "cpt", **training) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate({
        "stage": stage, "model": {"source": "file:///m"}, "adapter": adapter, "resources": {"gpus": 0},
        "dataset": {"format": "text" if stage == "cpt" else "preference", "train": [{"uri": "file:///d"}]},
        "training": {"batchSize": BATCH, "maxLength": SEQ, **training}, "output": {"uri": "file:///o"}})


def _model(spec: FineTuneJobSpec, config: dict = CONFIG, kind: str = "causal"):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig

    from kubetune_trainer import adapters

    torch.manual_seed(0)
    cfg = LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"}, attn_implementation="sdpa")
    if kind == "reward":
        cfg.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(cfg)
    else:
        model = AutoModelForCausalLM.from_config(cfg)
    model = adapters.wrap(model, adapters.peft_config(spec, kind))
    model.train()
    return model


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _step(model):
    """One forward/backward/AdamW step; returns (gradient bytes, optimizer-state bytes, saved-activation
    bytes at the peak: what the forward saved plus, with checkpointing, one layer's recomputation)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}
    phase = {"backward": False}
    recomputed: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.device.type == "cpu":
            (recomputed if phase["backward"] else saved)[st.data_ptr()] = st.nbytes()
        return t

    ids = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, labels=ids)
        phase["backward"] = True
        out.loss.backward()
    layers = CONFIG["num_hidden_layers"]
    acts = sum(saved.values()) + sum(recomputed.values()) / layers  # recomputed: 0 when checkpoint hides them
    grads = _nbytes(p.grad for p in model.parameters() if p.grad is not None)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    opt.step()
    states = _nbytes(v for s in opt.state.values() for k, v in s.items() if k != "step")
    return grads, states, acts


SHAPE = memory.ModelShape.from_config(CONFIG)


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_is_exact(tied):
    cfg = {**CONFIG, "tie_word_embeddings": tied}
    model = _model(_spec({"type": "full"}), cfg)
    assert memory.ModelShape.from_config(cfg).parameters() == sum(p.numel() for p in model.parameters())
    reward = _model(_spec({"type": "full"}), cfg, kind="reward")
    assert memory.ModelShape.from_config(cfg).parameters("reward") == sum(p.numel() for p in reward.parameters())


@pytest.mark.parametrize("adapter", [
    {"type": "full"},
    {"type": "lora", "rank": 8},
    {"type": "lora", "rank": 4, "targetModules": ["q_proj", "v_proj"], "dropout": 0.0},
    {"type": "dora", "rank": 8},
])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_weights_gradients_optimizer_exact_and_activations_close(adapter, checkpointing):
    spec = _spec(adapter, gradientCheckpointing=checkpointing)
    est = memory.estimate(spec, SHAPE, cuda=False)
    model = _model(spec)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    assert est.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert est.gpu["weights"] == _nbytes(model.parameters())
    grads, states, acts = _step(model)
    assert est.gpu["gradients"] == grads
    assert est.gpu["optimizer"] == states
    # the returned logits are alive but not a saved tensor; with checkpointing the recomputed layer is not
    # seen by the hooks (checkpoint uses its own), so compare the forward's checkpoints only
    predicted = est.gpu["activations"] + est.gpu["logits"] - BATCH * SEQ * CONFIG["vocab_size"] * 4
    if checkpointing:
        predicted -= est.layer_activations
    print(f"{adapter['type']} ckpt={checkpointing}: activations estimated {predicted / 1e6:.2f} MB, "
          f"measured {acts / 1e6:.2f} MB ({predicted / acts - 1:+.0%})")
    assert predicted == pytest.approx(acts, rel=0.25)


def test_qlora_weight_bytes_close_to_bitsandbytes():
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

    # 4-bit blocks of 64 need in_features divisible by 64
    cfg = {**CONFIG, "hidden_size": 128, "intermediate_size": 256, "head_dim": 32}
    spec = _spec({"type": "qlora", "rank": 8})
    cfg_obj = LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    model = AutoModelForCausalLM.from_config(cfg_obj)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        q = AutoModelForCausalLM.from_pretrained(d, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32), dtype=torch.float32)
    from peft import prepare_model_for_kbit_training

    from kubetune_trainer import adapters

    q = adapters.wrap(prepare_model_for_kbit_training(q), adapters.peft_config(spec))
    measured = _nbytes(q.parameters())
    for m in q.modules():  # quantisation constants live in each layer's quant_state
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None:
            measured += qs.absmax.numel() * qs.absmax.element_size()
            if qs.state2 is not None:
                measured += _nbytes([qs.state2.absmax, qs.state2.code])
    est = memory.estimate(spec, memory.ModelShape.from_config(cfg), cuda=False)
    print(f"qlora weights: estimated {est.gpu['weights']} B, measured {measured} B")
    assert est.gpu["weights"] == pytest.approx(measured, rel=0.05)


def test_trainer_refuses_a_job_that_cannot_fit_before_loading(monkeypatch, tiny_model):
    """The pre-flight check on a (simulated: CI has no GPU) 16 GiB GPU: the tiny model with a huge batch
    needs more, so the run stops with exit 78 and the numbers; a small batch passes."""
    from types import SimpleNamespace

    from kubetune_api.constants import ExitCode
    from kubetune_trainer import modeling
    from kubetune_trainer.errors import InsufficientMemoryError

    monkeypatch.setattr(modeling, "has_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(total_memory=16 * memory.GiB, name="Test-GPU-16GB"))
    monkeypatch.delenv(modeling.ENV_GPU_MEMORY, raising=False)
    big = FineTuneJobSpec.model_validate({**_spec({"type": "lora"}).model_dump(by_alias=True, exclude_none=True),
                                          "resources": {"gpus": 1},
                                          "training": {"batchSize": 64, "maxLength": 65536}})
    with pytest.raises(InsufficientMemoryError) as err:
        modeling.check_memory(big, tiny_model)
    msg = err.value.message
    assert err.value.exit_code == ExitCode.CONFIG_ERROR and err.value.field == "spec.resources"
    assert msg.startswith("needs ~52 GiB per GPU, have 16 (Test-GPU-16GB): use batchSize 1 "), msg
    assert "activations" in msg and "logits" in msg
    small = FineTuneJobSpec.model_validate({**big.model_dump(by_alias=True, exclude_none=True),
                                            "training": {"batchSize": 4, "maxLength": 512}})
    modeling.check_memory(small, tiny_model)  # fits: no error
    # a declared value below the device's (KUBETUNE_GPU_MEMORY, e.g. a MIG slice) is what counts
    monkeypatch.setenv(modeling.ENV_GPU_MEMORY, "1Mi")
    with pytest.raises(InsufficientMemoryError, match="configured GPU memory"):
        modeling.check_memory(small, tiny_model)


@pytest.mark.parametrize("adapter", ["full", "galore", "lora", "qlora", "dora"])
@pytest.mark.parametrize("precision", ["auto", "bf16", "fp16", "fp32"])
@pytest.mark.parametrize("deepspeed", [None, {"zeroStage": 3}])
def test_estimate_uses_the_trainers_load_dtype(adapter, precision, deepspeed, monkeypatch):
    """kubetune_api.memory cannot import torch, so it restates modeling.resolve_dtype's rules: they must agree."""
    from kubetune_trainer import modeling

    monkeypatch.setattr(modeling, "has_cuda", lambda: True)
    monkeypatch.setattr(modeling, "bf16_supported", lambda: True)
    data = _spec({"type": adapter}, precision=precision).model_dump(by_alias=True, exclude_none=True)
    if deepspeed:
        data["distributed"] = {"deepspeed": deepspeed}
    spec = FineTuneJobSpec.model_validate(data)
    assert memory._weight_dtype(spec, cuda=True) == str(modeling.resolve_dtype(spec)).replace("torch.", "")
