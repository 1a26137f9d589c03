"""Does the training stack work? CPT -> SFT -> DPO -> GRPO on a tiny model built locally, run as ONE
FineTunePipeline (examples/stack/pipeline.yaml) whose gates judge each stage before the next starts; then every
stage's output model is measured on its own held-out metric, before and after it, with the forgetting check at
every stage boundary. One run prints one table (and the gates' verdicts) and writes it as JSON.

    OMP_NUM_THREADS=1 .venv/bin/python bench/training_stack.py                 # seed 0: a few minutes on 2 idle cores
    OMP_NUM_THREADS=1 .venv/bin/python bench/training_stack.py --seed 1        # another data + training seed
    OMP_NUM_THREADS=1 .venv/bin/python bench/training_stack.py --keep /tmp/stack   # keep data and outputs there

The stages run through the product's own path: `kubetune run examples/stack/pipeline.yaml --output OUT` (the
CLI's entry point, in this process): the local FineTunePipeline runner trains stack-cpt, stack-sft, stack-dpo,
stack-grpo in order, hands each stage's model to the next (cpt's full weights; sft's and dpo's merged models) and
judges every stage's gate with the operator's code on the figures the stage reported. Each stage's model is
then found from the pipeline's state file (<OUT>/default/stack/pipeline.json: each stage's artifacts).
The data is bench/stack_data.py's synthetic domain (counting word problems; seeded); the metrics are
bench/stack_eval.py's functions, applied to each stage's input model (the previous stage's hand-over, or the
tiny base for CPT) and its output (its merged model; cpt's whole model), on held-out problems no training file
contains:

| stage | its own held-out metric | better |
|---|---|---|
| cpt | perplexity of held-out domain text | lower |
| sft | completion loss (NLL per token) of held-out questions' answers | lower |
| dpo | implicit-reward accuracy on held-out pairs, reference = the merged SFT model (ties count 1/2) | higher |
| grpo | mean reward (numeric_match + 0.2 x sentence format) of 8 samples per held-out prompt, T 0.7, fixed seed | higher |

Forgetting: perplexity of held-out general text (the base's pre-training distribution) before and after each
stage, as a relative change. Every model is also measured on every metric (JSON `matrix`), so a stage that
undoes an earlier one shows there; the JSON also keeps each stage's gate verdict and what its manifest.json
reported. A failed gate (or stage) stops the pipeline: the bench says so, prints what it measured of the stages
that ran, and exits with the pipeline's exit code (3: a gate failed).
Results: bench/results/training_stack[-seed<N>].json; docs/training-stack.md shows a run of seeds 0 and 1.
Wall time: ~100 s on 2 nearly idle cores (seed 0; the pipeline ~90 s of it, grpo the longest stage); the figures
are deterministic for a given torch build.
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
PIPELINE = REPO / "examples" / "stack" / "pipeline.yaml"
NAMESPACE = "default"

# (metric key in the matrix, label, higher is better)
HEADLINE = {"cpt": ("domain_ppl", "domain perplexity (held-out text)", False),
            "sft": ("sft_loss", "SFT completion loss (held-out)", False),
            "dpo": ("dpo_reward_accuracy", "DPO reward accuracy (held-out pairs)", True),
            "grpo": ("grpo_mean_reward", "GRPO mean reward (held-out prompts)", True)}


def stage_jobs() -> dict[str, dict]:
    """Each stage's job block, read from the pipeline manifest (the bench evaluates with the job's settings)."""
    import yaml

    spec = yaml.safe_load(PIPELINE.read_text())["spec"]
    return {s["name"]: s["job"] for s in spec["stages"]}


def grpo_block() -> dict:
    """The grpo stage's settings: the evaluation samples as training does (temperature, completion length) and
    scores exactly what training rewards."""
    return stage_jobs()["grpo"]["training"]["grpo"]


def dpo_beta() -> float:
    return float(stage_jobs()["dpo"]["training"]["dpo"]["beta"])


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


def _local(uri: str | None) -> Path | None:
    return Path(uri[len("file://"):]) if uri and uri.startswith("file://") else None


def pipeline_stages(output: Path) -> list[dict]:
    """What the pipeline run recorded per stage (state, run id, artifacts, progress, forgetting, gate), in
    order, from its state file; the stages after a failed stage or gate are absent."""
    path = output / NAMESPACE / "stack" / "pipeline.json"
    return json.loads(path.read_text())["stages"] if path.is_file() else []


def stage_record(rec: dict) -> dict:
    """One stage's model folder (its merged model; a full stage's adapter/ is the whole model) and its
    manifest.json figures."""
    arts = rec.get("artifacts") or {}
    model = _local(arts.get("mergedModelUri")) or _local(arts.get("adapterUri"))
    manifest_path = _local(arts.get("manifestUri"))
    manifest = json.loads(manifest_path.read_text()) if manifest_path and manifest_path.is_file() else {}
    return {"state": rec.get("state"), "run": rec.get("runId"), "model": str(model) if model else None,
            "model_source": rec.get("modelSource"), "gate": rec.get("gate") or {},
            "seconds": manifest.get("wallSeconds"), "job_metrics": manifest.get("metrics", {}),
            "job_forgetting": manifest.get("forgetting"), "message": rec.get("message")}


def table(result: dict) -> str:
    m = result["matrix"]
    lines = ["| stage | metric | before | after | forgetting: reference PPL before -> after |",
             "|---|---|---|---|---|"]
    models = ["base"] + STAGES
    for i, stage in enumerate(STAGES):
        if stage not in m:
            break
        key, label, _ = HEADLINE[stage]
        before, after = m[models[i]], m[models[i + 1]]
        b = before.get(key)
        b_txt = "-" if b is None else f"{b:.3f}" + (" (policy = reference)" if stage == "dpo" else "")
        rb, ra = before["reference_ppl"], after["reference_ppl"]
        lines.append(f"| {stage} | {label} | {b_txt} | {after[key]:.3f} | {rb:.3f} -> {ra:.3f} "
                     f"({100 * (ra / rb - 1):+.1f} %) |")
    return "\n".join(lines)


def gate_table(result: dict) -> str:
    """Each stage's gate as the pipeline judged it: every check's value (what the stage reported) against its
    threshold."""
    lines = ["| stage | gate | checks (value vs threshold) |", "|---|---|---|"]
    for stage in STAGES:
        s = result["stages"].get(stage)
        if s is None:
            lines.append(f"| {stage} | not run | - |")
            continue
        gate = s["gate"]
        checks = "; ".join(
            f"{c['metric']} {'not reported' if c.get('value') is None else format(c['value'], '.4g')} "
            f"{c['comparison']} {format(c['threshold'], '.4g')}: {'passed' if c['passed'] else 'FAILED'}"
            for c in gate.get("checks", []) if c.get("threshold") is not None)
        lines.append(f"| {stage} | {gate.get('state', s['state'])} | {checks or s.get('message') or '-'} |")
    return "\n".join(lines)


def verdict(result: dict) -> str:
    """One line: did the whole pipeline pass, or where did it stop and why."""
    code, stages = result["pipeline_exit_code"], result["stages"]
    stopped = next((st for st, s in stages.items() if s["state"] != "succeeded"
                    or s["gate"].get("state") != "Passed"), None)
    if code == 0 and stopped is None and len(stages) == len(STAGES):
        return f"pipeline succeeded: all {len(STAGES)} stages passed their gates"
    why = (stages[stopped]["gate"].get("message") or stages[stopped]["message"] or stages[stopped]["state"]) \
        if stopped else "no stage recorded (see the log above)"
    missing = ", ".join(s for s in STAGES if s not in stages) or "none"
    return f"PIPELINE STOPPED (kubetune run exit {code}) at stage {stopped or '-'}: {why}; stages not run: {missing}"


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
    from kubetune_trainer import cli

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
    print("== kubetune run examples/stack/pipeline.yaml", file=sys.stderr, flush=True)
    t0 = time.time()
    code = cli.main(["run", str(PIPELINE), "--output", str(output)])
    result = {"seed": args.seed, "pipeline_exit_code": code, "pipeline_seconds": time.time() - t0, "stages": {},
              "matrix": {"base": measure(base, data, None)}}
    for rec in pipeline_stages(output):
        stage = rec["name"]
        s = result["stages"][stage] = stage_record(rec)
        if s["state"] != "succeeded" or not s["model"]:
            break  # a failed stage left no model to measure
        print(f"== measuring {stage}", file=sys.stderr, flush=True)
        # the DPO reference is the model DPO started from: the merged SFT model
        dpo_ref = Path(result["stages"]["sft"]["model"]) if "sft" in result["stages"] else None
        result["matrix"][stage] = measure(Path(s["model"]), data, dpo_ref)
    result["seconds"] = time.time() - started
    result["table"] = table(result)
    result["gates"] = gate_table(result)
    result["verdict"] = verdict(result)
    dest = args.json or REPO / "bench" / "results" / f"training_stack{'' if args.seed == 0 else f'-seed{args.seed}'}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)

    secs = ", ".join(f"{st} {s['seconds']:.0f} s" for st, s in result["stages"].items() if s.get("seconds"))
    print(f"\ntraining stack pipeline, seed {args.seed}: {result['seconds']:.0f} s (pipeline "
          f"{result['pipeline_seconds']:.0f} s: {secs}; the rest is measuring)")
    print(result["table"])
    print("\ngates (judged by the pipeline on what each stage reported):")
    print(result["gates"])
    print(f"\n{result['verdict']}")
    print(f"(JSON: {dest})")
    return code


if __name__ == "__main__":
    sys.exit(main())
