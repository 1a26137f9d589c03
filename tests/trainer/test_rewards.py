"""Reward functions for the RL stages: every built-in, parameter parsing, weights and names, column checks,
custom `module:function` loading (file and folder sources) with its errors, the call-time guards on user code,
and the reward-model scorer (same text and tokens as RewardTrainer trained on).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/trainer/test_rewards.py -q
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from kubetune_api.finetunejob import RewardFunction
from kubetune_trainer import rewards, tiny
from kubetune_trainer.errors import ConfigError, DataError
from kubetune_trainer.rewards import builtin

FIELD = "spec.training.grpo.rewards"


def rf(name: str, weight: float = 1.0, params: dict | None = None, source: str | None = None) -> RewardFunction:
    return RewardFunction(name=name, weight=weight, params=params, source=source)


def one(name: str, params: dict | None = None):
    return rewards.build([rf(name, params=params)], field=FIELD).funcs[0]


def trl_call(func, completions, **columns):
    """How TRL's GRPO/RLOO trainers call a reward function (keyword arguments only)."""
    return func(prompts=["p"] * len(completions), completions=completions,
                completion_ids=[[1] * 3 for _ in completions], trainer_state=object(),
                log_extra=lambda *a: None, log_metric=lambda *a: None, **columns)


def chat(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


# ------------------------------------------------------------------------------------------------ text helpers
def test_completion_text_handles_plain_and_conversational_completions():
    assert builtin.completion_text(" 7") == " 7"
    assert builtin.completion_text(chat("7")) == "7"
    assert builtin.completion_text({"role": "assistant", "content": "x"}) == "x"
    assert builtin.completion_text([{"role": "assistant", "content": [{"type": "text", "text": "a"},
                                                                     {"type": "text", "text": "b"}]}]) == "ab"
    assert builtin.completion_text(None) == ""


def test_answer_span_prefers_the_last_answer_tag_then_hashes_then_everything():
    assert builtin.answer_span("<answer>1</answer> then <answer> 2 </answer>") == " 2 "
    assert builtin.answer_span("work... #### 42") == " 42"
    assert builtin.answer_span(" 7") == " 7"


def test_last_number_parses_signs_decimals_and_thousands_separators():
    assert builtin.last_number("3 plus 4 is 7.") == 7.0
    assert builtin.last_number("it costs 1,234.5 dollars") == 1234.5
    assert builtin.last_number("from -3 to -2.5") == -2.5
    assert builtin.last_number("1,2,3") == 3.0  # a list, not a thousands-separated number
    assert builtin.last_number("no digits") is None


# ------------------------------------------------------------------------------------------------ built-ins
def test_exact_match_compares_the_answer_span_trimmed():
    f = one("exact_match")
    got = trl_call(f, [" 7", "<think>x</think><answer>7</answer>", " 7.", "#### 7", chat(" 7 "), " 8"],
                   answer=["7", "7", "7", "7", "7", "7"])
    assert got == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0]


def test_exact_match_reads_the_column_named_in_params():
    f = one("exact_match", {"column": "solution"})
    assert trl_call(f, [" yes"], solution=["yes"]) == [1.0]
    with pytest.raises(KeyError, match="solution"):
        builtin.build_builtin("exact_match", {"column": "solution"}).func(completions=[" yes"], answer=["yes"])
    # handed to TRL, the same failure drops that call's scores instead of ending the run (test_reward_sandbox.py)
    assert f(completions=[" yes"], answer=["yes"]) == [None]


def test_normalized_match_ignores_case_punctuation_and_spacing():
    f = one("normalized_match")
    got = trl_call(f, ["  The  Eiffel tower!", "Paris.", "Rome"], answer=["the eiffel Tower", "paris", "Paris"])
    assert got == [1.0, 1.0, 0.0]


def test_numeric_match_takes_the_last_number_with_tolerance():
    exact = one("numeric_match")
    assert trl_call(exact, [" 3 plus 4 is 7.", "7 or 8", "<answer>1,000</answer>", "none"],
                    answer=["7", "7", "1000", "7"]) == [1.0, 0.0, 1.0, 0.0]
    loose = one("numeric_match", {"tolerance": "0.05"})
    assert trl_call(loose, ["3.14", "3.2"], answer=[3.1416, "pi is 3.1416"]) == [1.0, 0.0]
    # A reference without a number scores 0 instead of failing the run.
    assert trl_call(exact, ["7"], answer=["seven"]) == [0.0]


def test_regex_match_with_flags():
    f = one("regex_match", {"pattern": "^answer:", "flags": "im"})
    assert trl_call(f, ["ANSWER: 3", "x\nanswer: 4", "no"]) == [1.0, 1.0, 0.0]


def test_think_answer_format_requires_the_whole_layout():
    f = one("think_answer_format")
    good = "<think>3 and 4 make 7</think>\n<answer>7</answer>"
    bad = ["<answer>7</answer>", "<think>x</think>", "pre <think>x</think><answer>7</answer>",
           "<think>x</think><answer>7</answer> trailing"]
    assert trl_call(f, [good, chat(good)] + bad) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_length_penalty_counts_tokens_or_characters_beyond_the_target():
    tokens = one("length_penalty", {"target": "2", "scale": "0.5"})
    assert tokens(completions=["a", "b"], completion_ids=[[1, 2], [1, 2, 3, 4, 5]]) == [0.0, -1.5]
    chars = one("length_penalty", {"target": "3", "scale": "1", "unit": "chars"})
    assert trl_call(chars, ["abc", "abcdef"]) == [0.0, -3.0]
    # Without token ids (a call outside TRL) words stand in for tokens.
    assert tokens(completions=["one two three four"]) == [-1.0]


@pytest.mark.parametrize("name,params,problem", [
    ("regex_match", None, "params.pattern is required"),
    ("regex_match", {"pattern": "(unclosed"}, "not a valid regular expression"),
    ("regex_match", {"pattern": "x", "flags": "q"}, "params.flags"),
    ("numeric_match", {"tolerance": "abc"}, "params.tolerance must be a number"),
    ("numeric_match", {"tolerance": "-1"}, ">= 0"),
    ("length_penalty", {"unit": "bytes"}, "params.unit must be one of tokens, chars"),
    ("exact_match", {"colum": "answer"}, "unknown params ['colum'] for exact_match (accepted: column)"),
    ("think_answer_format", {"strict": "true"}, "accepted: none"),
])
def test_bad_params_fail_before_training_naming_the_reward(name, params, problem):
    with pytest.raises(ConfigError) as err:
        rewards.build([rf("exact_match"), rf(name, params=params)], field=FIELD)
    assert err.value.field == f"{FIELD}[1].params"
    assert problem in err.value.message


def test_unknown_builtin_and_misplaced_source_are_config_errors():
    with pytest.raises(ConfigError) as err:
        rewards.build([rf("exakt_match")], field=FIELD)
    assert err.value.field == f"{FIELD}[0].name" and "exact_match" in err.value.message
    with pytest.raises(ConfigError) as err:
        rewards.build([rf("exact_match", source="file:///x.py")], field=FIELD)
    assert err.value.field == f"{FIELD}[0].source"


def test_weights_follow_the_spec_and_repeated_names_stay_distinct():
    rset = rewards.build([rf("regex_match", 1.0, {"pattern": "a"}), rf("regex_match", -0.5, {"pattern": "b"}),
                          rf("exact_match", 2.0)], field=FIELD)
    assert rset.weights == [1.0, -0.5, 2.0]
    # TRL logs rewards/<__name__>/mean: two regex rewards must not share a series.
    assert [f.__name__ for f in rset.funcs] == ["regex_match", "regex_match_2", "exact_match"]
    assert trl_call(rset.funcs[1], ["b", "a"]) == [1.0, 0.0]


def test_check_columns_names_the_reward_and_the_missing_column():
    rset = rewards.build([rf("regex_match", params={"pattern": "x"}), rf("numeric_match", params={"column": "gold"})],
                         field=FIELD)
    rewards.check_columns(rset, ["prompt", "gold"])
    with pytest.raises(DataError) as err:
        rewards.check_columns(rset, ["prompt", "answer"])
    assert err.value.field == "spec.dataset"
    assert f"{FIELD}[1]" in err.value.message and "'gold'" in err.value.message


# ------------------------------------------------------------------------------------------------ custom
def write(path: Path, code: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(code))
    return path


def fetch(uri: str) -> Path:
    if not uri.startswith("file://"):
        raise ConfigError(f"unsupported {uri}")
    p = Path(uri[len("file://"):])
    if not p.exists():
        raise ConfigError(f"no such file: {uri}")
    return p


def build_custom(name: str, source: str, params: dict | None = None, index: int = 0):
    specs = [rf("exact_match")] * index + [rf(name, 0.5, params, source)]
    return rewards.build(specs, fetch=fetch, field=FIELD)


def test_custom_reward_from_a_file_gets_only_what_it_declares_plus_params(tmp_path):
    src = write(tmp_path / "my_rewards.py", """
        def has_word(completions, answer, word="seven"):
            return [1.0 if word in c or a in c else 0.0 for c, a in zip(completions, answer)]
    """)
    rset = build_custom("my_rewards:has_word", f"file://{src}", {"word": "eight"})
    f = rset.funcs[0]
    assert f.__name__ == "my_rewards.has_word" and rset.weights == [0.5]
    # TRL passes prompts, completion_ids, trainer_state ... too: the function never sees them.
    assert trl_call(f, ["it is eight", "7", "nope"], answer=["1", "7", "2"]) == [1.0, 1.0, 0.0]
    assert rset.columns == [("answer", f"{FIELD}[0]")]  # `word` has a param, `answer` must come from the data


def test_custom_reward_from_a_folder_can_import_its_siblings(tmp_path):
    write(tmp_path / "pkg" / "scoring" / "__init__.py", "")
    write(tmp_path / "pkg" / "scoring" / "helpers.py", "BONUS = 2.0\n")
    write(tmp_path / "pkg" / "scoring" / "main.py", """
        from .helpers import BONUS

        def score(completions, **kwargs):
            assert "difficulty" in kwargs and "trainer_state" in kwargs
            return [BONUS * d for d in kwargs["difficulty"]]
    """)
    f = build_custom("scoring.main:score", f"file://{tmp_path / 'pkg'}").funcs[0]
    assert trl_call(f, ["a", "b"], difficulty=[1, 3]) == [2.0, 6.0]


@pytest.mark.parametrize("files,name,field_suffix,problem", [
    ({"r.py": "def f(completions):\n    return [1.0]\n"}, "r:g", "name", "has no function 'g'; it defines ['f']"),
    ({"r.py": "def f(completions)\n    return []\n"}, "r:f", "source", "SyntaxError"),
    ({"r.py": "import not_a_real_module_xyz\n"}, "r:f", "source", "ModuleNotFoundError"),
    ({"r.py": "raise RuntimeError('boom at import')\n"}, "r:f", "source", "boom at import"),
    ({"r.py": "f = 3\n"}, "r:f", "name", "not a function"),
    ({"r.py": "async def f(completions):\n    return []\n"}, "r:f", "name", "async"),
    ({"r.py": "def f(prompts):\n    return []\n"}, "r:f", "name", "must take a `completions` argument"),
    ({"other.py": "def f(completions):\n    return []\n"}, "r:f", "name", "no module r in"),
])
def test_custom_reward_load_errors_name_the_reward_entry(tmp_path, files, name, field_suffix, problem):
    for fname, code in files.items():
        write(tmp_path / "src" / fname, code)
    src = tmp_path / "src" / "r.py" if "r.py" in files and len(files) == 1 else tmp_path / "src"
    with pytest.raises(ConfigError) as err:
        build_custom(name, f"file://{src}", index=2)
    assert err.value.field == f"{FIELD}[2].{field_suffix}"
    assert problem in err.value.message


def test_custom_reward_source_problems(tmp_path):
    src = write(tmp_path / "rew.py", "def f(completions):\n    return [0.0] * len(completions)\n")
    with pytest.raises(ConfigError) as err:
        build_custom("rew:f", f"file://{tmp_path / 'missing.py'}")
    assert err.value.field == f"{FIELD}[0].source" and "missing.py" in err.value.message
    with pytest.raises(ConfigError) as err:
        build_custom("other_name:f", f"file://{src}")
    assert err.value.field == f"{FIELD}[0].name" and "rew:<function>" in err.value.message
    with pytest.raises(ConfigError) as err:
        rewards.build([rf("rew:f")], fetch=fetch, field=FIELD)
    assert err.value.field == f"{FIELD}[0].source"
    with pytest.raises(ConfigError) as err:
        build_custom("rew:f:g", f"file://{src}")
    assert err.value.field == f"{FIELD}[0].name"
    with pytest.raises(ConfigError) as err:
        build_custom("rew:f", f"file://{src}", {"unused": "1"})
    assert err.value.field == f"{FIELD}[0].params"


def test_two_sources_with_the_same_module_name_do_not_collide(tmp_path):
    code = "def f(completions):\n    return [{}] * len(completions)\n"
    a = write(tmp_path / "a" / "rewards_mod.py", code.format(1.0))
    b = write(tmp_path / "b" / "rewards_mod.py", code.format(2.0))
    fa = build_custom("rewards_mod:f", f"file://{a}").funcs[0]
    fb = build_custom("rewards_mod:f", f"file://{b}").funcs[0]
    assert fa(completions=["x"]) == [1.0] and fb(completions=["x"]) == [2.0]
    assert "rewards_mod" not in sys.modules
    # Folders: the second folder's module must win over the one already imported from the first.
    write(tmp_path / "c" / "shared_name.py", code.format(3.0))
    write(tmp_path / "d" / "shared_name.py", code.format(4.0))
    fc = build_custom("shared_name:f", f"file://{tmp_path / 'c'}").funcs[0]
    fd = build_custom("shared_name:f", f"file://{tmp_path / 'd'}").funcs[0]
    assert fc(completions=["x"]) == [3.0] and fd(completions=["x"]) == [4.0]


@pytest.mark.parametrize("body,problem", [
    ("raise ValueError('bad row')", "raised ValueError: bad row"),
    ("return [1.0]", "returned 1 values for 2 completions"),
    ("return ['high', 'low']", "returned 'high'"),
    ("return 3.0", "returned float"),
])
def test_custom_reward_failures_at_call_time_are_config_errors(tmp_path, body, problem):
    src = write(tmp_path / "cr.py", f"def f(completions, **kw):\n    {body}\n")
    f = build_custom("cr:f", f"file://{src}", index=1).funcs[1]
    with pytest.raises(ConfigError) as err:
        trl_call(f, ["a", "b"])
    assert err.value.field == f"{FIELD}[1]" and problem in err.value.message


def test_custom_reward_may_return_none_for_not_applicable(tmp_path):
    src = write(tmp_path / "cn.py", "def f(completions):\n    return [None, 2]\n")
    f = build_custom("cn:f", f"file://{src}").funcs[0]
    assert trl_call(f, ["a", "b"]) == [None, 2.0]


def test_docs_example_reward_file_loads_and_scores(tmp_path):
    """The example in docs/rewards.md is real code: extract it and run it through the loader."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "rewards.md").read_text()
    code = doc.split("```python\n# my_rewards.py\n", 1)[1].split("```", 1)[0]
    src = write(tmp_path / "my_rewards.py", code)
    rset = rewards.build([rf("my_rewards:concise_correct", params={"max_words": "4"}, source=f"file://{src}")],
                         fetch=fetch, field=FIELD)
    got = trl_call(rset.funcs[0], [" 7", " the answer is 7 because 3 plus 4 is 7", " 8"], answer=["7", "7", "7"])
    assert got[0] == 1.0 and 0.0 < got[1] < 1.0 and got[2] == 0.0


# ------------------------------------------------------------------------------------------------ reward model
@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    pytest.importorskip("torch")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kubetune_trainer import tiny

    path = tiny.build_reward_model(tmp_path_factory.mktemp("rm"), tiny.cached_model())
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1), AutoTokenizer.from_pretrained(path)


def test_scorer_text_matches_what_reward_trainer_trains_on(reward_model, tmp_path):
    """RewardTrainer trains on tokenizer(prompt + chosen + eos): the scorer must feed the same ids."""
    from tests.trainer import stage_helpers as H

    model, tok = reward_model
    scorer = rewards.RewardModelScorer(model, tok)
    assert scorer.texts(["Q?"], [" A."]) == ["Q? A." + tok.eos_token]
    assert scorer.texts(["Q?"], [" A." + tok.eos_token]) == ["Q? A." + tok.eos_token]  # EOS not doubled
    _, ctx, trainer = H.build("reward", "lora", tmp_path, n_train=4)
    row = ctx.train_dataset[0]
    trained_on = trainer.train_dataset[0]["chosen_ids"]
    text = scorer.texts([row["prompt"]], [row["chosen"]])[0]
    assert tok(text, add_special_tokens=True)["input_ids"] == trained_on


def test_scorer_scores_like_the_model_and_handles_chat(reward_model):
    import torch

    model, tok = reward_model
    scorer = rewards.RewardModelScorer(model, tok, batch_size=2)
    prompts, comps = ["What is 1 plus 2?", "What is 3 plus 3?", "x"], [" 1 plus 2 is 3.", " banana.", " y"]
    got = scorer(prompts=prompts, completions=comps)
    for p, c, g in zip(prompts, comps, got):
        enc = tok(p + c + tok.eos_token, return_tensors="pt")
        with torch.no_grad():
            assert g == pytest.approx(model(**enc).logits[0, 0].item(), abs=1e-5)
    user = [{"role": "user", "content": "hi"}]
    conv = scorer.texts([user], [chat("hello")])[0]
    assert conv == tok.apply_chat_template(user + chat("hello"), tokenize=False)
    assert len(scorer(prompts=[user], completions=[chat("hello")])) == 1


def test_scorer_refuses_a_model_with_more_than_one_label(reward_model):
    from transformers import AutoModelForSequenceClassification

    from kubetune_trainer import tiny

    model = AutoModelForSequenceClassification.from_pretrained(tiny.cached_model(), num_labels=2)
    with pytest.raises(ValueError, match="num_labels=1"):
        rewards.RewardModelScorer(model, reward_model[1])


def test_reward_model_loads_from_a_lora_reward_jobs_adapter_output(tmp_path):
    """A LoRA reward job's adapter/ is applied to the base its manifest.json names, and scores as trained."""
    import json

    import torch

    from tests.trainer import stage_helpers as H

    _, ctx, trainer = H.build("reward", "lora", tmp_path / "run", n_train=8, training={"maxSteps": 2})
    trainer.train()
    job_out = tmp_path / "out" / "ml" / "rm-job"
    trainer.save_model(str(job_out / "adapter"))
    ctx.tokenizer.save_pretrained(str(job_out / "adapter"))
    field = "spec.training.ppo.rewardModel"
    load = H.model_loader(ctx.job)
    with pytest.raises(ConfigError) as err:  # no manifest.json next to it: nothing says which base it needs
        rewards.load_reward_model(f"file://{job_out}/adapter", fetch=H.local_path, load_model=load, field=field)
    assert err.value.field == field and "manifest.json" in err.value.message and "merged/" in err.value.message
    (job_out / "manifest.json").write_text(json.dumps({"baseModel": {"source": f"file://{tiny.cached_model()}"}}))

    scorer = rewards.load_reward_model(f"file://{job_out}/adapter", fetch=H.local_path, load_model=load,
                                       field=field)
    prompts, comps = ["What is 1 plus 2?", "What is 5 plus 5?"], [" 1 plus 2 is 3.", " banana banana."]
    texts = scorer.texts(prompts, comps)
    trained = trainer.accelerator.unwrap_model(trainer.model).eval()
    with torch.no_grad():
        expected = [trained(**ctx.tokenizer(t, return_tensors="pt")).logits[0, 0].item() for t in texts]
    assert scorer(prompts=prompts, completions=comps) == pytest.approx(expected, abs=1e-4)

    with pytest.raises(ConfigError) as err:
        rewards.load_reward_model(f"file://{tmp_path}/nothing-here", fetch=H.local_path, load_model=load, field=field)
    assert err.value.field == field


def test_every_example_manifests_builtin_rewards_build():
    """Reward names and params in examples/ must be ones the trainer accepts (a typo'd param would only fail
    inside the pod)."""
    import yaml as _yaml

    from kubetune_api.finetunejob import parse_job
    from kubetune_trainer import rewards as _rewards

    checked = 0
    for path in sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml")):
        for doc in _yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "FineTuneJob":
                continue
            spec = parse_job(doc).spec
            for block in (spec.training.grpo, spec.training.rloo):
                specs = [r for r in ((block.rewards if block else None) or []) if ":" not in r.name]
                if specs:
                    _rewards.build(specs)
                    checked += len(specs)
    assert checked >= 2
