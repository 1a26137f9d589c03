"""The memory estimator (kubetune_api.memory) against measured memory, per configuration.

    OMP_NUM_THREADS=1 .venv/bin/python bench/estimator_vs_gpu.py --device cpu      # byte counts on CPU (fp32)
    .venv/bin/python bench/estimator_vs_gpu.py --device cuda                       # torch.cuda.max_memory_allocated
    .venv/bin/python bench/estimator_vs_gpu.py --device cuda --hidden 4096 --layers 32 --seq 4096

Each configuration (adapter x gradient checkpointing x batch) builds a randomly initialised Llama from a
config (the same dict the estimator reads), loads it the trainer's way (modeling/adapters rules: bf16 frozen
base + fp32 LoRA adapters, fp32 weights + bf16 autocast for full fine-tuning, 4-bit for qlora), and runs
`--steps` optimizer steps (AdamW, random tokens):

- cuda: peak = torch.cuda.max_memory_allocated over the steps, compared with the estimate's per-GPU total
  minus its fixed runtime allowance (the CUDA context and allocator slack are not "allocated" memory);
  also weights (allocated after loading) and weights+gradients+optimizer (allocated after a step, between
  steps, when activations are freed).
- cpu: exact byte counts of parameters, gradients and AdamW state, and the bytes autograd saves for
  backward (saved-tensor hooks) against the estimate's cuda=False mode.

Prints one row per configuration with estimated / measured and the ratio; repeats alternate the order of
configurations and report the spread of the measured peaks (allocator peaks are deterministic on CUDA,
so the spread is a sanity check, not noise).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / p) for p in ("operator", "trainer-image")]

from kubetune_api import memory  # noqa: E402
from kubetune_api.finetunejob import FineTuneJobSpec  # noqa: E402

MiB = 2 ** 20


def config(hidden: int, layers: int, vocab: int) -> dict:
    return {"model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
            "intermediate_size": int(hidden * 8 / 3) // 64 * 64, "num_hidden_layers": layers,
            "num_attention_heads": hidden // 64, "num_key_value_heads": max(1, hidden // 256), "head_dim": 64,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16", "max_position_embeddings": 8192}


def spec(adapter: str, ckpt: bool, batch: int, seq: int, gpus: int) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate({
        "stage": "cpt", "model": {"source": "file:///m"}, "adapter": {"type": adapter},
        "dataset": {"format": "text", "train": [{"uri": "file:///d"}]}, "resources": {"gpus": gpus},
        "training": {"batchSize": batch, "maxLength": seq, "gradientCheckpointing": ckpt, "precision": "auto"},
        "output": {"uri": "file:///o"}})


def build(folder: Path, cfg: dict, s: FineTuneJobSpec, device: str):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from kubetune_trainer import adapters

    cuda = device == "cuda"
    kwargs: dict = {"dtype": torch.float32}
    if cuda and s.adapter.type in ("lora", "qlora", "dora"):
        kwargs["dtype"] = torch.bfloat16
    if s.adapter.type == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if cuda else torch.float32)
        if cuda:
            kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="sdpa", **kwargs)
    if s.adapter.type != "qlora":
        model = model.to(device)
    model = adapters.prepare_base(model, s)
    model = adapters.wrap(model, adapters.peft_config(s))
    if s.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    return model


def measure(model, cfg: dict, s: FineTuneJobSpec, device: str, steps: int) -> dict:
    import torch

    cuda = device == "cuda"
    t = s.training
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    out: dict = {}
    if cuda:
        torch.cuda.synchronize()
        out["weights"] = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    saved: dict[int, int] = {}
    pids = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(x):
        st = x.untyped_storage()
        if st.data_ptr() not in pids and st.device.type == "cpu":
            saved[st.data_ptr()] = st.nbytes()
        return x

    for _ in range(steps):
        ids = torch.randint(0, cfg["vocab_size"], (t.batch_size, t.max_length), device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and s.adapter.type in ("full", "galore")):
            if cuda:
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
            else:
                saved.clear()
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
                    loss = model(input_ids=ids, labels=ids).loss
                    out["saved"] = sum(saved.values())
                    loss.backward()
                out["gradients"] = sum(p.grad.numel() * p.grad.element_size() for p in params)
        opt.step()
        opt.zero_grad(set_to_none=True)
        del loss
    if cuda:
        torch.cuda.synchronize()
        out["peak"] = torch.cuda.max_memory_allocated()
        out["steady"] = torch.cuda.memory_allocated()  # weights + optimizer (gradients freed by zero_grad)
    else:
        out["weights"] = sum(p.numel() * p.element_size() for p in model.parameters())
        out["optimizer"] = sum(v.numel() * v.element_size() for st in opt.state.values()
                               for k, v in st.items() if k != "step")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    ap.add_argument("--hidden", type=int, default=None, help="default: 2048 on cuda, 256 on cpu")
    ap.add_argument("--layers", type=int, default=None, help="default: 16 on cuda, 4 on cpu")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=None, help="default: 1024 on cuda, 128 on cpu")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    import torch

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu")
    torch.manual_seed(0)
    hidden, layers = args.hidden or (2048 if cuda else 256), args.layers or (16 if cuda else 4)
    seq = args.seq or (1024 if cuda else 128)
    cfg = config(hidden, layers, args.vocab if cuda else 4096)
    shape = memory.ModelShape.from_config(cfg)
    adapters = ["full", "lora", "qlora"] if cuda else ["full", "lora"]
    runs = [(a, ck, b) for a in adapters for ck in (False, True) for b in ((1, 4) if cuda else (2,))]
    print(f"model: Llama from config, {shape.parameters() / 1e9:.3f} B params (hidden {hidden}, {layers} layers, "
          f"vocab {cfg['vocab_size']}), seq {seq}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if cuda else ""))
    results: dict[tuple, list[dict]] = {r: [] for r in runs}
    with tempfile.TemporaryDirectory() as d:
        from transformers import AutoModelForCausalLM, LlamaConfig

        folder = Path(d) / "model"
        with torch.device("cpu"):
            AutoModelForCausalLM.from_config(LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
                                             ).to(torch.bfloat16).save_pretrained(str(folder))
        for rep in range(args.repeats):
            for run in (runs if rep % 2 == 0 else list(reversed(runs))):
                a, ck, b = run
                s = spec(a, ck, b, seq, 1 if cuda else 0)
                model = build(folder, cfg, s, args.device)
                results[run].append(measure(model, cfg, s, args.device, args.steps))
                del model
                if cuda:
                    torch.cuda.empty_cache()
    ratios = []
    for (a, ck, b), ms in results.items():
        s = spec(a, ck, b, seq, 1 if cuda else 0)
        est = memory.estimate(s, shape, cuda=cuda)
        tag = f"{a:5s} ckpt={'y' if ck else 'n'} batch {b}"
        if cuda:
            predicted = est.gpu_total - est.gpu.get("runtime", 0)
            peaks = [m["peak"] for m in ms]
            peak = statistics.median(peaks)
            ratios.append(predicted / peak)
            print(f"{tag}: peak est {predicted / MiB:8.0f} MiB, measured {peak / MiB:8.0f} MiB "
                  f"[{min(peaks) / MiB:.0f}-{max(peaks) / MiB:.0f}] ratio {predicted / peak:.2f}; weights est "
                  f"{est.gpu['weights'] / MiB:.0f} / measured {ms[0]['weights'] / MiB:.0f} MiB; weights+optimizer "
                  f"est {(est.gpu['weights'] + est.gpu['optimizer']) / MiB:.0f} / measured {ms[0]['steady'] / MiB:.0f} MiB")
        else:
            m = ms[0]
            acts_est = est.gpu["activations"] + est.gpu["logits"] - b * seq * cfg["vocab_size"] * 4
            if ck:
                acts_est -= est.layer_activations  # the recomputed layer is not seen by the hooks
            ratios.append(acts_est / m["saved"])
            print(f"{tag}: weights {est.gpu['weights']}/{m['weights']} B, gradients {est.gpu['gradients']}/"
                  f"{m['gradients']} B, optimizer {est.gpu['optimizer']}/{m['optimizer']} B (est/measured); "
                  f"saved activations est {acts_est / MiB:.2f} MiB, measured {m['saved'] / MiB:.2f} MiB, "
                  f"ratio {acts_est / m['saved']:.2f}")
    what = "peak" if cuda else "activation"
    print(f"{what} estimate / measured: median {statistics.median(ratios):.2f}, range "
          f"{min(ratios):.2f}-{max(ratios):.2f} over {len(ratios)} configurations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
