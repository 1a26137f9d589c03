"""Does RL learn? GRPO and RLOO on a verifiable task (addition with numeric answers), run by kubetune's runner
on the tiny pre-trained Llama, measured on held-out questions before and after.

    OMP_NUM_THREADS=1 .venv/bin/python bench/rl_learning.py                  # grpo and rloo, a few minutes
    OMP_NUM_THREADS=1 .venv/bin/python bench/rl_learning.py --stages grpo --rl-steps 80
    OMP_NUM_THREADS=1 .venv/bin/python bench/rl_learning.py --stages grpo rloo rloo-rm ppo --rl-steps 80   # docs/rl.md

The recipe (what it takes for a ~150k-parameter model to learn from a 0/1 reward in CPU minutes):
1. Task: "What is a plus b? Answer:" -> the number a+b, for a, b in 0..9. 30 of the 100 (a, b) pairs are
   unseen: neither the warm-up nor RL ever sees them.
2. SFT warm-up (stage sft, full fine-tuning, prompt_completion, 100 steps of 16): the pre-trained base has seen the
   sums in another wording but never answers after "Answer:" nor emits EOS; the warm-up teaches the format and
   to stop (the completion ends in EOS). Without it every sampled completion runs to the length cap and the
   last number in it is noise: that is why the examples' settings did not learn (issue 13).
3. RL from the warm-up model (full fine-tuning, lr 3e-4, beta 0.04, 64 completions per step = 8 prompts x 8 samples,
   temperature 0.7, maxCompletionLength 8): reward = numeric_match (1 if the last number equals the answer)
   + 0.2 x a format reward (regex_match `^\\s*\\d+\\s*$`: the completion is just the number, i.e. it stopped).
Measured before and after RL on two question sets, sampled at the training temperature with a fixed seed (16
samples per question): the eval set (every question of the training distribution: the 70 training pairs; a
100-question task has no other held-out questions of the same distribution) and the 30 unseen pairs (does
what RL taught transfer?). Figures: mean reward (the RL objective), sampled accuracy, greedy accuracy (one
answer per question) and the share of completions that ended in EOS.

rloo-rm and ppo optimise a reward model instead (stage reward, trained from the warm-up model on right-vs-wrong
sums of the training pairs), with the same evaluation: does the reward model's score carry the task?

Learning figures are read from the runner's logs (TRL's `reward`, `kl`, `rewards/<name>/mean`) and printed per
quarter of the run. Results: bench/results/rl_learning.json; docs/rl.md shows a run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(p) for p in (REPO / "operator", REPO / "trainer-image") if str(p) not in sys.path]

HELD_OUT = 30
FORMAT = r"^\s*\d+\s*$"
REWARDS = [{"name": "numeric_match", "weight": 1.0},
           {"name": "regex_match", "weight": 0.2, "params": {"pattern": FORMAT}}]
TEMPERATURE = 0.7


# ------------------------------------------------------------------------------------------------ the task
def split_pairs(held_out: int = HELD_OUT, seed: int = 0) -> tuple[list, list]:
    pairs = [(a, b) for a in range(10) for b in range(10)]
    random.Random(seed).shuffle(pairs)
    return pairs[:held_out], pairs[held_out:]


def prompt(a: int, b: int) -> str:
    return f"What is {a} plus {b}? Answer:"


def write_task_data(dest: Path, train_pairs: list, n: int = 2000, seed: int = 1) -> dict[str, Path]:
    """prompt_completion rows for the warm-up, prompt_only rows (with `answer`) for RL and preference pairs
    (the right sum over a wrong one) for the reward model of rloo-rm/ppo, all from the training pairs only."""
    dest.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sft, rl, pref = dest / "warmup.jsonl", dest / "rl.jsonl", dest / "preference.jsonl"
    with sft.open("w") as f_sft, rl.open("w") as f_rl, pref.open("w") as f_pref:
        for _ in range(n):
            a, b = rng.choice(train_pairs)
            f_sft.write(json.dumps({"prompt": prompt(a, b), "completion": f" {a + b}"}) + "\n")
            a, b = rng.choice(train_pairs)
            f_rl.write(json.dumps({"prompt": prompt(a, b), "answer": str(a + b)}) + "\n")
            a, b = rng.choice(train_pairs)
            wrong = rng.choice([x for x in range(19) if x != a + b])
            f_pref.write(json.dumps({"prompt": prompt(a, b), "chosen": f" {a + b}", "rejected": f" {wrong}"}) + "\n")
    return {"sft": sft, "rl": rl, "preference": pref}


def reward_of(completion: str, answer: str) -> tuple[float, bool]:
    """(numeric_match + 0.2 x format, correct): the same built-ins the RL job uses."""
    from kubetune_trainer.rewards import builtin

    n = builtin.last_number(completion)
    correct = n is not None and n == float(answer)
    return float(correct) + 0.2 * bool(re.search(FORMAT, completion)), correct


def evaluate(model_path: Path, pairs: list, *, samples: int = 16, temperature: float = TEMPERATURE,
             max_new_tokens: int = 8, seed: int = 0) -> dict:
    """Held-out figures for the model saved at model_path (a full model folder)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    prompts, answers = [prompt(a, b) for a, b in pairs], [str(a + b) for a, b in pairs]
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    n_in = enc["input_ids"].shape[1]
    with torch.no_grad():
        greedy = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
        torch.manual_seed(seed)
        sampled = model.generate(**enc, do_sample=True, top_k=0, top_p=1.0, temperature=temperature,
                                 max_new_tokens=max_new_tokens, num_return_sequences=samples,
                                 pad_token_id=tok.pad_token_id)
    g = [reward_of(c, a) for c, a in zip(tok.batch_decode(greedy[:, n_in:], skip_special_tokens=True), answers)]
    s_text = tok.batch_decode(sampled[:, n_in:], skip_special_tokens=True)
    s = [reward_of(c, a) for c, a in zip(s_text, [a for a in answers for _ in range(samples)])]
    stopped = (sampled[:, n_in:] == tok.eos_token_id).any(dim=1).float().mean().item()
    return {"mean_reward": statistics.mean(r for r, _ in s), "sampled_accuracy": statistics.mean(c for _, c in s),
            "greedy_accuracy": statistics.mean(c for _, c in g), "stopped": stopped}


# ------------------------------------------------------------------------------------------------ jobs
def make_job(stage: str, model: Path, data: Path, out: Path, *, steps: int, lr: float, batch: int,
             stage_block: dict | None = None, name: str | None = None):
    from kubetune_api.finetunejob import parse_job

    training = {"maxSteps": steps, "batchSize": batch, "maxLength": 32, "learningRate": lr,
                "logEverySteps": max(1, steps // 20), "evalEverySteps": 100000, "checkpointEverySteps": 100000,
                "warmupRatio": 0.0, "lrScheduler": "constant"}
    if stage_block is not None:
        training[stage] = stage_block
    fmt = {"sft": "prompt_completion", "reward": "preference"}.get(stage, "prompt_only")
    return parse_job({"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob",
                      "metadata": {"name": name or f"rl-{stage}", "namespace": "bench"},
                      "spec": {"stage": stage, "model": {"source": f"file://{model}"},
                               "dataset": {"format": fmt, "train": [{"uri": f"file://{data}"}], "evalFraction": 0.0},
                               "adapter": {"type": "full"}, "training": training, "resources": {"gpus": 0},
                               "output": {"uri": f"file://{out}"}}})


def run_job(job, work: Path) -> tuple[Path, list[dict]]:
    """runner.run the job; (the trained model's folder, the logged entries)."""
    from transformers import TrainerCallback

    from kubetune_trainer import config, runner

    class Logs(TrainerCallback):
        entries: list[dict] = []

        def on_log(self, args, state, control, logs=None, **kw):
            if logs:
                self.entries.append({"step": state.global_step, **logs})

    logs = Logs()
    logs.entries = []
    settings = config.RunSettings(work_dir=work, metrics_host="127.0.0.1", metrics_port=0)
    report = runner.run(job, settings, extra_callbacks=[logs], console_logs=False)
    if report.state != "succeeded":
        raise RuntimeError(f"{job.metadata.name}: {report.reason}: {report.message}")
    return Path(report.artifacts.adapter_uri[len("file://"):]), logs.entries


def warm_up(base: Path, data: Path, root: Path, steps: int = 100) -> Path:
    model, _ = run_job(make_job("sft", base, data, root / "out", steps=steps, lr=1e-3, batch=16, name="warmup"),
                       root / "work-warmup")
    return model


def rl_block(beta: float) -> dict:
    return {"numGenerations": 8, "maxCompletionLength": 8, "temperature": TEMPERATURE, "beta": beta,
            "rewards": REWARDS}


def train_reward_model(warm: Path, data: Path, root: Path, steps: int = 150) -> tuple[Path, list[dict]]:
    """A reward model (stage reward, full) from the warm-up model on right-vs-wrong sum pairs."""
    return run_job(make_job("reward", warm, data, root / "out", steps=steps, lr=1e-3, batch=16, name="rl-reward"),
                   root / "work-reward")


def train_rl(stage: str, warm: Path, data: Path, root: Path, *, steps: int, lr: float = 3e-4,
             beta: float = 0.04, reward_model: Path | None = None) -> tuple[Path, list[dict]]:
    """stage grpo or rloo: the verifiable rewards; rloo-rm: RLOO on the reward model's score alone; ppo: PPO on
    the reward model's score (one completion per prompt, 16 prompts per rollout)."""
    if stage == "ppo":
        block = {"rewardModel": f"file://{reward_model}", "maxCompletionLength": 8, "temperature": TEMPERATURE,
                 "klCoef": beta}
        job = make_job("ppo", warm, data, root / "out", steps=steps, lr=lr, batch=16, stage_block=block,
                       name="rl-ppo")
    elif stage == "rloo-rm":
        block = {"numGenerations": 8, "maxCompletionLength": 8, "temperature": TEMPERATURE, "beta": beta,
                 "rewardModel": f"file://{reward_model}"}
        job = make_job("rloo", warm, data, root / "out", steps=steps, lr=lr, batch=64, stage_block=block,
                       name="rl-rloo-rm")
    else:
        job = make_job(stage, warm, data, root / "out", steps=steps, lr=lr, batch=64,
                       stage_block=rl_block(beta), name=f"rl-{stage}")
    return run_job(job, root / f"work-{stage}")


def by_quarter(entries: list[dict], key: str) -> list[float]:
    vals = [e[key] for e in entries if key in e]
    if len(vals) < 4:
        return vals
    q = len(vals) / 4
    return [statistics.mean(vals[round(i * q):round((i + 1) * q)]) for i in range(4)]


def main(argv=None) -> int:
    for k, v in {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                 "KUBETUNE_METRICS_FINAL_SCRAPE_TIMEOUT": "0"}.items():
        os.environ.setdefault(k, v)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", nargs="+", choices=["grpo", "rloo", "rloo-rm", "ppo"], default=["grpo", "rloo"])
    ap.add_argument("--ppo-lr", type=float, default=1e-4)
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--rl-steps", type=int, default=160)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--beta", type=float, default=0.04)
    args = ap.parse_args(argv)

    from kubetune_trainer import tiny

    root = Path(tempfile.mkdtemp(prefix="kubetune-rl-"))
    held, train = split_pairs()
    data = write_task_data(root / "data", train)
    t0 = time.time()
    warm = warm_up(tiny.cached_model(), data["sft"], root, args.warmup_steps)
    result = {"settings": vars(args), "warmup_s": time.time() - t0,
              "before": {"eval": evaluate(warm, train), "unseen": evaluate(warm, held)}}
    rm = None
    if {"ppo", "rloo-rm"} & set(args.stages):
        rm, rm_logs = train_reward_model(warm, data["preference"], root)
        result["reward_model"] = {"accuracy_by_quarter": by_quarter(rm_logs, "accuracy"),
                                  "margin_by_quarter": by_quarter(rm_logs, "margin")}
    for stage in args.stages:
        t0 = time.time()
        model, logs = train_rl(stage, warm, data["rl"], root / stage, steps=args.rl_steps,
                               lr=args.ppo_lr if stage == "ppo" else args.lr, beta=args.beta, reward_model=rm)
        if stage == "ppo":  # our PPO logs its own names
            logs = [{**e, "reward": e["objective/scores"], "kl": e["objective/kl"]} if "objective/scores" in e
                    else e for e in logs]
        result[stage] = {"seconds": time.time() - t0, "eval": evaluate(model, train), "unseen": evaluate(model, held),
                         "reward_by_quarter": by_quarter(logs, "reward"),
                         "accuracy_by_quarter": by_quarter(logs, "rewards/numeric_match/mean"),
                         "kl_by_quarter": by_quarter(logs, "kl"),
                         "clipped_ratio_by_quarter": by_quarter(logs, "completions/clipped_ratio")}
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "rl_learning.json").write_text(json.dumps(result, indent=2))

    print(f"SFT warm-up {args.warmup_steps} steps ({result['warmup_s']:.0f} s); RL {args.rl_steps} steps, lr {args.lr}, "
          f"beta {args.beta}")
    print("| model | eval: mean reward | eval: sampled acc. | eval: greedy acc. | unseen pairs: mean reward "
          "| unseen: sampled acc. | unseen: greedy acc. | ended in EOS | train reward by quarter | KL by quarter "
          "| seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    q = lambda xs: " / ".join(f"{x:.2f}" for x in xs) or "-"  # noqa: E731
    for name, r in [("warm-up (before RL)", result["before"])] + [(s, result[s]) for s in args.stages]:
        e, u = r["eval"], r["unseen"]
        print(f"| {name} | {e['mean_reward']:.3f} | {e['sampled_accuracy']:.3f} | {e['greedy_accuracy']:.3f} "
              f"| {u['mean_reward']:.3f} | {u['sampled_accuracy']:.3f} | {u['greedy_accuracy']:.3f} | {e['stopped']:.2f} "
              f"| {q(r.get('reward_by_quarter', []))} | {q(r.get('kl_by_quarter', []))} | {r.get('seconds', result['warmup_s']):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
