"""kubetune_api.memory without torch: the shipped examples against their models' config.json, refusals with
their numbers and fixes, where the GPU memory comes from. (Byte-exact checks against real tensors:
tests/trainer/test_memory_estimate.py.)

    .venv/bin/python -m pytest tests/unit/test_memory_estimate.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kubetune_api import memory, parse_job

REPO = Path(__file__).resolve().parents[2]
LLAMA_70B = memory.ModelShape.from_config(json.loads((REPO / "examples/model-configs/llama-3.3-70b.json").read_text()))


def _job(path: str):
    return parse_job(yaml.safe_load((REPO / path).read_text()))


def test_70b_shape_matches_the_published_parameter_count():
    assert LLAMA_70B.parameters() == 70_553_706_496  # Llama-3.3-70B's safetensors index total / 2 bytes


def test_multinode_example_fits_as_written():
    """examples/multinode-deepspeed.yaml: 70B full fine-tuning, ZeRO-3 + optimizer offload, 4 x 8 H100-80GB."""
    spec = _job("examples/multinode-deepspeed.yaml").spec
    available, source = memory.declared_gpu_memory(spec)
    assert source == "nodeSelector nvidia.com/gpu.product" and available == 80 * 1019 * 2 ** 20
    est = memory.estimate(spec, LLAMA_70B)
    assert memory.check(spec, LLAMA_70B, available, source) is None
    assert est.gpu_total < 0.5 * available  # comfortable: partitioned bf16 weights, grads on the host
    assert est.gpu["optimizer"] == 0 and est.host["optimizer (offloaded)"] > 200 * memory.GiB
    # host memory: the pod's 900Gi holds the offloaded optimizer and the (once, partitioned) load
    assert est.host_total < memory.parse_quantity(spec.resources.memory)
    # what the example did before load-time partitioning: every process materialises 70B fp32
    assert 8 * LLAMA_70B.parameters() * 4 > memory.parse_quantity(spec.resources.memory)


def test_70b_full_finetune_on_one_node_without_zero_is_refused_with_fixes():
    spec = memory._with(_job("examples/multinode-deepspeed.yaml").spec,
                        **{"distributed.deepspeed": None, "resources.nodes": 1})
    v = memory.check(spec, LLAMA_70B, 80 * memory.GiB, "test")
    assert v is not None
    msg = v.message()
    assert msg.startswith(f"needs ~{memory.gib(v.needed)} GiB per GPU, have 80 (test): use ")
    assert v.needed > 1000 * memory.GiB  # fp32 weights + DDP gradients + AdamW: ~20 bytes per parameter
    assert "zeroStage 3 with offloadOptimizer" in msg and "nodes with zeroStage 3" in msg, msg


def test_qlora_70b_fits_one_80gb_gpu_and_lora_does_not():
    spec = _job("examples/multinode-deepspeed.yaml").spec
    base = {"distributed": None, "resources.nodes": 1, "resources.gpus": 1, "training.max_length": 2048}
    qlora = memory._with(spec, adapter={"type": "qlora"}, **base)
    lora = memory._with(spec, adapter={"type": "lora"}, **base)
    assert memory.check(qlora, LLAMA_70B, 80 * memory.GiB) is None
    assert 35 * memory.GiB < memory.estimate(qlora, LLAMA_70B).gpu["weights"] < 45 * memory.GiB
    v = memory.check(lora, LLAMA_70B, 80 * memory.GiB)
    assert v is not None and "adapter.type: qlora" in v.fixes


@pytest.mark.parametrize("example", sorted(p.name for p in (REPO / "examples").glob("*.yaml")))
def test_every_example_estimates(example):
    """Any example can be estimated against a 7B-class config (the breakdown is well-formed)."""
    job = _job(f"examples/{example}")
    shape = memory.ModelShape(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                              num_heads=32, num_kv_heads=32, head_dim=128, dtype="bfloat16")
    est = memory.estimate(job.spec, shape)
    assert est.gpu_total > 0 and all(v >= 0 for v in est.gpu.values())
    assert "total" in memory.format_estimate(est)


def test_declared_gpu_memory_sources():
    spec = _job("examples/multinode-deepspeed.yaml").spec
    spec.resources.node_selector = {"nvidia.com/gpu.memory": "40960"}
    assert memory.declared_gpu_memory(spec) == (40960 * 2 ** 20, "nodeSelector nvidia.com/gpu.memory")
    spec.resources.node_selector = None
    assert memory.declared_gpu_memory(spec) == (None, "no GPU memory declared")
    assert memory.declared_gpu_memory(spec, 24 * memory.GiB) == (24 * memory.GiB, "configured GPU memory")
    assert memory.parse_quantity("80Gi") == 80 * memory.GiB and memory.parse_quantity("81559Mi") == 81559 * 2 ** 20
    assert memory.parse_quantity("85e9") == 85 * 10 ** 9 and memory.parse_quantity(1024) == 1024
    with pytest.raises(ValueError):
        memory.parse_quantity("lots")


def test_config_without_the_needed_keys_is_named():
    with pytest.raises(memory.ModelConfigError, match="hidden_size"):
        memory.ModelShape.from_config({"model_type": "mystery", "vocab_size": 10})
    nested = memory.ModelShape.from_config({"model_type": "llava", "torch_dtype": "bfloat16", "text_config": {
        "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128, "num_hidden_layers": 2,
        "vocab_size": 100}})
    assert nested.hidden_size == 64 and nested.dtype == "bfloat16"


def test_no_gpus_or_nothing_declared_means_no_verdict():
    spec = _job("examples/multinode-deepspeed.yaml").spec
    assert memory.check(spec, LLAMA_70B, None) is None
    cpu = memory._with(spec, **{"resources.gpus": 0})
    assert memory.check(cpu, LLAMA_70B, 1) is None
