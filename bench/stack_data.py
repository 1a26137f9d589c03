"""The synthetic domain of the training-stack demonstration (bench/training_stack.py): counting word problems,
generated deterministically from a seed, one file per stage plus the held-out sets each stage is judged on.

    python bench/stack_data.py /tmp/stack-data            # writes the files below, prints their paths
    python bench/stack_data.py /tmp/stack-data --seed 1
    python bench/stack_data.py --base                     # the demonstration's base model folder (built once)

The domain: "mia has 3 pears and gets 4 more , so mia has 7 pears ." Every stage has something of its own to
learn from it, and nothing in it is in the tiny base model's pre-training (general stories and "What is a plus
b?" questions, kubetune_trainer.tiny):
- cpt (text): narratives in the domain's wording -> the domain's perplexity falls;
- sft (prompt_completion): the question form, answered in one of two styles, half and half: terse (" 7") or a
  sentence (" mia has 7 pears .") -> the completion loss falls;
- dpo (preference): the same questions, chosen = the sentence, rejected = the terse answer (both correct: a
  matter of taste, what preference data carries) -> the policy prefers the sentence;
- grpo (prompt_only + `answer`): the questions with the number as the verifiable answer -> the built-in
  `numeric_match` (+ a small `regex_match` reward for the sentence format) rises.
- reference (text): general stories from the base's pre-training distribution, the forgetting check.

Held out: the problems are (name, object, a, b) instances; a seeded 20 % of them never appear in any training
file, and every held-out set is drawn from those only. The sums themselves (a + b, a and b in 0..9) do appear
in training under other names and objects: held out means unseen problems, not unseen arithmetic.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

NAMES = ["mia", "tom", "ana", "leo", "zoe", "sam", "eva", "max"]
OBJECTS = ["pears", "coins", "shells", "cards", "stamps", "beads"]
VERBS = ["gets", "finds", "buys"]
HELD_OUT_FRACTION = 0.2
REPLAY = 0.25
# The answer format the dpo stage prefers - a full sentence, the number after the name - and grpo's regex_match
# reward checks (the same pattern in examples/stack/pipeline.yaml's grpo stage).
SENTENCE = r"^\s*[a-z]+ has \d+ [a-z]+ \.\s*$"

# rows per training file and per held-out set
TRAIN_ROWS = {"cpt": 2000, "sft": 2000, "dpo": 1000, "grpo": 1000}
HELD_OUT_ROWS = {"cpt": 128, "sft": 128, "dpo": 128, "grpo": 64, "reference": 128}


def split_problems(seed: int = 0) -> tuple[list[tuple], list[tuple]]:
    """(train, held_out) lists of (name, object, a, b) problem instances, disjoint, from the seed."""
    problems = [(n, o, a, b) for n in NAMES for o in OBJECTS for a in range(10) for b in range(10)]
    random.Random(seed).shuffle(problems)
    k = int(len(problems) * HELD_OUT_FRACTION)
    return problems[k:], problems[:k]


def narrative(p: tuple, verb: str) -> str:
    name, obj, a, b = p
    return f"{name} has {a} {obj} and {verb} {b} more , so {name} has {a + b} {obj} ."


def question(p: tuple) -> str:
    name, obj, a, b = p
    return f"{name} has {a} {obj} and gets {b} more . how many {obj} does {name} have ?"


def terse_answer(p: tuple) -> str:
    return f" {p[2] + p[3]}"


def sentence_answer(p: tuple) -> str:
    name, obj, a, b = p
    return f" {name} has {a + b} {obj} ."


def cpt_row(rng: random.Random, problems: list[tuple]) -> dict:
    """Domain narratives; a REPLAY share of the rows is general text instead (the usual guard of continued
    pre-training against forgetting what the base knew)."""
    if rng.random() < REPLAY:
        return reference_row(rng)
    return {"text": " ".join(narrative(rng.choice(problems), rng.choice(VERBS)) for _ in range(2))}


def cpt_held_out_row(rng: random.Random, problems: list[tuple]) -> dict:
    return {"text": " ".join(narrative(rng.choice(problems), rng.choice(VERBS)) for _ in range(2))}


def sft_row(rng: random.Random, problems: list[tuple]) -> dict:
    p = rng.choice(problems)
    return {"prompt": question(p), "completion": terse_answer(p) if rng.random() < 0.5 else sentence_answer(p)}


def dpo_row(rng: random.Random, problems: list[tuple]) -> dict:
    p = rng.choice(problems)
    return {"prompt": question(p), "chosen": sentence_answer(p), "rejected": terse_answer(p)}


def grpo_row(rng: random.Random, problems: list[tuple]) -> dict:
    p = rng.choice(problems)
    return {"prompt": question(p), "answer": str(p[2] + p[3])}


def reference_row(rng: random.Random) -> dict:
    from kubetune_trainer import tiny

    return {"text": " ".join(tiny.general_sentence(rng) for _ in range(2))}


# The tiny base of the demonstration (kubetune_trainer.tiny.build_model arguments): larger than the tests' default
# (hidden 64, 2 layers), which plateaued far above this domain's entropy; vocabulary trained with the domain's words.
BASE_MODEL = {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_size": 256, "vocab_size": 768}


def tokenizer_texts(n: int = 1000) -> list[str]:
    """Domain sentences for the base's tokenizer (its vocabulary only: the base is not trained on them), from
    a seed of their own: a real model's tokenizer has most words of the text it meets."""
    rng = random.Random("tokenizer")
    problems = [(nm, o, a, b) for nm in NAMES for o in OBJECTS for a in range(10) for b in range(10)]
    lines = []
    for _ in range(n):
        p = rng.choice(problems)
        lines.append(f"{narrative(p, rng.choice(VERBS))} {question(p)}{sentence_answer(p)}")
    return lines


def base_model() -> Path:
    """The demonstration's base model folder, built once (a few seconds) and cached like the tests' tiny model."""
    from kubetune_trainer import tiny

    return tiny.cached_model(**BASE_MODEL, extra_texts=tokenizer_texts())


ROW = {"cpt": cpt_row, "sft": sft_row, "dpo": dpo_row, "grpo": grpo_row}


def generate(seed: int = 0, train_rows: dict | None = None, held_out_rows: dict | None = None) -> dict[str, list]:
    """Every set as lists of rows: '<stage>' (training) and '<stage>_held_out' for cpt/sft/dpo/grpo, plus
    'reference' (held-out general text). Deterministic in seed; held-out rows use held-out problems only."""
    train_rows = {**TRAIN_ROWS, **(train_rows or {})}
    held_out_rows = {**HELD_OUT_ROWS, **(held_out_rows or {})}
    train, held = split_problems(seed)
    out: dict[str, list] = {}
    for stage, make in ROW.items():
        # one generator per set, so changing one set's size leaves the others identical
        rng = random.Random(f"{seed}/{stage}/train")
        out[stage] = [make(rng, train) for _ in range(train_rows[stage])]
        rng = random.Random(f"{seed}/{stage}/held-out")
        if stage == "cpt":  # the domain alone: no replay rows in the domain's perplexity
            out[f"{stage}_held_out"] = [cpt_held_out_row(rng, held) for _ in range(held_out_rows[stage])]
        elif stage == "grpo":  # distinct prompts: a mean over questions, not over repeats of a few
            out[f"{stage}_held_out"] = [make(random.Random(0), [p]) for p in held[:held_out_rows[stage]]]
        else:
            out[f"{stage}_held_out"] = [make(rng, held) for _ in range(held_out_rows[stage])]
    rng = random.Random(f"{seed}/reference")
    out["reference"] = [reference_row(rng) for _ in range(held_out_rows["reference"])]
    return out


def write(dest: str | Path, seed: int = 0, **sizes) -> dict[str, Path]:
    """generate() as one .jsonl per set under dest; returns set name -> path."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in generate(seed, **sizes).items():
        path = dest / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths[name] = path
    return paths


def read(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dest", nargs="?", help="folder for the data files")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base", action="store_true", help="build (once; cached) the base model and print its folder")
    args = ap.parse_args(argv)
    if args.base:
        print(base_model())
        return 0
    if not args.dest:
        ap.error("give a folder for the data (or --base)")
    for name, path in write(args.dest, args.seed).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    REPO = Path(__file__).resolve().parents[1]
    sys.path[:0] = [str(REPO / "trainer-image"), str(REPO / "operator")]
    sys.exit(main())
