"""Does the training stack work? CPT -> SFT -> DPO -> GRPO (LoRA, merged between stages) on a tiny model built
locally, each stage judged on its own held-out metric before and after it, with the forgetting check at every
stage boundary. One run prints one table and writes it as JSON.

    OMP_NUM_THREADS=1 .venv/bin/python bench/training_stack.py                 # seed 0: a few minutes on 2 idle cores
    OMP_NUM_THREADS=1 .venv/bin/python bench/training_stack.py --seed 1        # another data + training seed
    OMP_NUM_THREADS=1 .venv/bin/python bench/training_stack.py --keep /tmp/stack   # keep data and outputs there

The stages run through the product's own path: `kubetune run examples/stack/<stage>.yaml --output OUT`, one
FineTuneJob per stage, chained by the manifests themselves (`model.source:
file://${KUBETUNE_OUTPUT}/default/stack-<previous>/latest/merged`, resolved through the previous job's runs.json).
The data is bench/stack_data.py's synthetic domain (counting word problems; seeded); the metrics are
bench/stack_eval.py's functions, applied to each stage's input model (the previous stage's merged model, or the
tiny base for CPT) and its output (its merged model), on held-out problems no training file contains:

| stage | its own held-out metric | better |
|---|---|---|
| cpt | perplexity of held-out domain text | lower |
| sft | completion loss (NLL per token) of held-out questions' answers | lower |
| dpo | implicit-reward accuracy on held-out pairs, reference = the merged SFT model (ties count 1/2) | higher |
| grpo | mean reward (numeric_match + 0.2 x sentence format) of 8 samples per held-out prompt, T 0.7, fixed seed | higher |

Forgetting: perplexity of held-out general text (the base's pre-training distribution) before and after each
stage, as a relative change. Every model is also measured on every metric (JSON `matrix`), so a stage that
undoes an earlier one shows there; the JSON also keeps what each job's own manifest.json reported.
Results: bench/results/training_stack[-seed<N>].json; docs/training-stack.md shows a run of each of seeds 0 and 1.
Wall time: ~2 400 s on 2 cores shared with a dozen other jobs (load average 15-21); most of it is waiting for a
core - the CPU time of a whole run is a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(p) for p in (REPO / "operator", REPO / "trainer-image", REPO / "bench") if str(p) not in sys.path]

STAGES = ["cpt", "sft", "dpo", "grpo"]
MANIFESTS = REPO / "examples" / "stack"
NAMESPACE = "default"

# (metric key in the matrix, label, higher is better)
HEADLINE = {"cpt": ("domain_ppl", "domain perplexity (held-out text)", False),
            "sft": ("sft_loss", "SFT completion loss (held-out)", False),
            "dpo": ("dpo_reward_accuracy", "DPO reward accuracy (held-out pairs)", True),
            "grpo": ("grpo_mean_reward", "GRPO mean reward (held-out prompts)", True)}


def grpo_block() -> dict:
    """The grpo job's settings, read from its manifest: the evaluation samples as training does (temperature,
    completion length) and scores exactly what training rewards."""
    import yaml

    return yaml.safe_load((MANIFESTS / "grpo.yaml").read_text())["spec"]["training"]["grpo"]


def dpo_beta() -> float:
    import yaml

    return float(yaml.safe_load((MANIFESTS / "dpo.yaml").read_text())["spec"]["training"]["dpo"]["beta"])


def measure(model_dir: Path, data: dict, dpo_reference: Path | None) -> dict:
    """Every held-out metric of one model folder."""
    import stack_eval as E

    model, tok = E.load(model_dir)
    out = {"reference_ppl": E.perplexity(model, tok, [r["text"] for r in data["reference"]]),
           "domain_ppl": E.perplexity(model, tok, [r["text"] for r in data["cpt_held_out"]]),
           "sft_loss": E.completion_loss(model, tok, data["sft_held_out"]),
           "dpo_preference_accuracy": E.preference_accuracy(model, tok, data["dpo_held_out"])}
    if dpo_reference is not None:
        ref = model if dpo_reference == model_dir else E.load(dpo_reference)[0]
        r = E.reward_accuracy(model, ref, tok, data["dpo_held_out"], beta=dpo_beta())
        out["dpo_reward_accuracy"], out["dpo_reward_margin"] = r["accuracy"], r["margin"]
    grpo = grpo_block()
    g = E.mean_reward(model, tok, data["grpo_held_out"], grpo["rewards"], temperature=grpo["temperature"],
                      max_new_tokens=grpo["maxCompletionLength"])
    out.update({"grpo_mean_reward": g["mean_reward"], "grpo_accuracy": g["numeric_match_mean"],
                "grpo_format": g["regex_match_mean"], "grpo_greedy_accuracy": g["greedy_accuracy"],
                "grpo_examples": g["examples"]})
    return out


def latest_run(output: Path, stage: str) -> Path:
    """The job's newest run folder, as its runs.json names it (what `.../latest/...` URIs resolve to)."""
    job_dir = output / NAMESPACE / f"stack-{stage}"
    return job_dir / "runs" / json.loads((job_dir / "runs.json").read_text())["latest"]


def run_stage(stage: str, output: Path) -> dict:
    """`kubetune run examples/stack/<stage>.yaml --output OUT` (the CLI's own entry point, in this process)."""
    from kubetune_trainer import cli

    t0 = time.time()
    code = cli.main(["run", str(MANIFESTS / f"{stage}.yaml"), "--output", str(output)])
    if code != 0:
        raise SystemExit(f"stage {stage}: kubetune run exited {code}")
    run = latest_run(output, stage)
    manifest = json.loads((run / "manifest.json").read_text())
    model = run / "merged" if (run / "merged").is_dir() else run / "adapter"  # a full stage's adapter/ is the model
    return {"seconds": time.time() - t0, "run": str(run), "merged": str(model),
            "job_metrics": manifest.get("metrics", {}), "job_forgetting": manifest.get("forgetting")}


def table(result: dict) -> str:
    m = result["matrix"]
    lines = ["| stage | metric | before | after | forgetting: reference PPL before -> after |",
             "|---|---|---|---|---|"]
    models = ["base"] + STAGES
    for i, stage in enumerate(STAGES):
        key, label, _ = HEADLINE[stage]
        before, after = m[models[i]], m[models[i + 1]]
        b = before.get(key)
        b_txt = f"{b:.3f}" + (" (policy = reference)" if stage == "dpo" else "")
        rb, ra = before["reference_ppl"], after["reference_ppl"]
        lines.append(f"| {stage} | {label} | {b_txt} | {after[key]:.3f} | {rb:.3f} -> {ra:.3f} "
                     f"({100 * (ra / rb - 1):+.1f} %) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    for k, v in {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                 "KUBETUNE_METRICS_FINAL_SCRAPE_TIMEOUT": "0"}.items():
        os.environ.setdefault(k, v)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0, help="data and training seed")
    ap.add_argument("--keep", type=Path, help="folder for data and outputs (default: a temporary one, removed)")
    ap.add_argument("--json", type=Path, help="where to write the result (default bench/results/training_stack"
                                              "[-seed<N>].json)")
    args = ap.parse_args(argv)

    import stack_data

    root = args.keep or Path(tempfile.mkdtemp(prefix="kubetune-stack-"))
    root.mkdir(parents=True, exist_ok=True)
    paths = stack_data.write(root / "data", seed=args.seed)
    data = {name: stack_data.read(p) for name, p in paths.items()}
    os.environ["KUBETUNE_STACK_DATA"] = str(root / "data")
    os.environ["KUBETUNE_STACK_SEED"] = str(args.seed)
    output = root / "out"
    started = time.time()

    base = stack_data.base_model()
    os.environ["KUBETUNE_STACK_BASE"] = str(base)
    result = {"seed": args.seed, "stages": {}, "matrix": {"base": measure(base, data, None)}}
    for stage in STAGES:
        print(f"== {stage}", file=sys.stderr, flush=True)
        r = result["stages"][stage] = run_stage(stage, output)
        # the DPO reference is the model DPO started from: the merged SFT model
        dpo_ref = Path(result["stages"]["sft"]["merged"]) if "sft" in result["stages"] else None
        result["matrix"][stage] = measure(Path(r["merged"]), data, dpo_ref)
    result["seconds"] = time.time() - started
    result["table"] = table(result)

    dest = args.json or REPO / "bench" / "results" / f"training_stack{'' if args.seed == 0 else f'-seed{args.seed}'}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)

    print(f"\ntraining stack, seed {args.seed}: {result['seconds']:.0f} s "
          "(" + ", ".join(f"{s} {result['stages'][s]['seconds']:.0f} s" for s in STAGES) + ")")
    print(result["table"])
    print(f"(JSON: {dest})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
