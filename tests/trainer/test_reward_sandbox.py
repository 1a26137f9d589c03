"""The reward sandbox (custom rewards, code_execution) and what happens when a reward fails at training time.

Real processes and real kernel limits throughout; the fork-bomb test uses a tight RLIMIT_NPROC and a short wall
clock and checks afterwards that nothing it started is left running.
"""

from __future__ import annotations

import logging
import os
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from kubetune_api.finetunejob import RewardFunction
from kubetune_trainer import rewards
from kubetune_trainer.errors import ConfigError, DataError
from kubetune_trainer.rewards import code_execution, failures, policy
from kubetune_trainer.rewards.sandbox import ProgramLimits, Sandbox, SandboxLimits

FIELD = "spec.training.grpo.rewards"


def fetch(uri: str) -> Path:
    return Path(uri[len("file://"):])


def write(path: Path, code: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(code))
    return path


def rf(name, params=None, source=None, weight=1.0):
    return RewardFunction(name=name, weight=weight, params=params, source=source)


@pytest.fixture
def box():
    b = Sandbox(SandboxLimits(cpu_seconds=2, wall_seconds=5, memory_bytes=1 << 30))
    yield b
    b.close()


def custom(box, tmp_path, code, name="r:f", params=None):
    src = write(tmp_path / f"{name.split(':')[0]}.py", code)
    return rewards.build([rf(name, params, f"file://{src}")], fetch=fetch, field=FIELD, sandbox=box)


def call(func, completions, **kwargs):
    """Call like TRL does (its own arguments included)."""
    return func(prompts=["p"] * len(completions), completions=completions,
                completion_ids=[[1, 2]] * len(completions), **kwargs)


# ------------------------------------------------------------------------------------------------ isolation
def test_custom_reward_sees_no_credentials_env_or_trainer_memory(box, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA")
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    monkeypatch.setenv("KUBETUNE_JOB_NAME", "j")
    rset = custom(box, tmp_path, """
        import os

        def f(completions, **kw):
            leaked = [k for k in os.environ if k.startswith(("AWS", "HF_", "KUBETUNE"))]
            assert not leaked, leaked
            assert os.getcwd() == os.environ["TMPDIR"] == os.environ["HOME"]
            assert os.path.basename(os.getcwd()).startswith("kubetune-sandbox-")
            open("scratch.txt", "w").write("writable")
            try:
                trainer = open(f"/proc/{os.getppid()}/environ", "rb").read()
            except OSError:
                trainer = b""
            assert b"s3cr3t" not in trainer, "the trainer's environment is readable"
            return [1.0] * len(completions)
    """)
    assert call(rset.funcs[0], ["a", "b"]) == [1.0, 1.0]
    assert (box.scratch / "scratch.txt").read_text() == "writable"


def test_token_folders_are_hidden_where_the_kernel_allows_it(tmp_path):
    secrets = tmp_path / "serviceaccount"
    write(secrets / "token", "eyJhbGciOi-not-for-user-code")
    b = Sandbox(hide=(str(secrets),))
    try:
        rset = custom(b, tmp_path, f"""
            import os

            def f(completions):
                return [float(os.path.exists({str(secrets / 'token')!r}))] * len(completions)
        """)
        if b.info.get("hide_problem"):
            pytest.skip(f"no mount namespace here ({b.info['hide_problem']}): the pod's settings protect tokens")
        assert b.info["hidden"] == [str(secrets)]
        assert call(rset.funcs[0], ["a"]) == [0.0]
        assert (secrets / "token").exists()  # hidden from the sandbox only
    finally:
        b.close()


def test_user_code_cannot_forge_protocol_answers_through_stdout_or_read_stdin(box, tmp_path):
    rset = custom(box, tmp_path, """
        import sys

        def f(completions):
            print('{"ok": true, "value": [9.0]}')
            assert sys.stdin.read() == ""
            return [0.5] * len(completions)
    """)
    assert call(rset.funcs[0], ["a"]) == [0.5]


# ------------------------------------------------------------------------------------------------ limits + retries
@pytest.fixture
def no_retries(monkeypatch):
    """Limit tests check the kill, not the retries (tested with a cheap failure below): one attempt each."""
    monkeypatch.setattr(rewards, "RETRIES", 0)


def test_cpu_time_limit_kills_the_worker_and_the_call_is_dropped(tmp_path, caplog, no_retries):
    b = Sandbox(SandboxLimits(cpu_seconds=1, wall_seconds=60))
    try:
        rset = custom(b, tmp_path, """
            def f(completions):
                while True:
                    pass
        """)
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, "kubetune.rewards"):
            assert call(rset.funcs[0], ["a", "b"]) == [None, None]
        assert time.monotonic() - t0 < 30  # 1-2 s of CPU, long before the 60 s wall clock
        assert b.restarts == 1
        assert "SIGXCPU" in caplog.text and "r.f" in caplog.text
    finally:
        b.close()


def test_wall_clock_limit_kills_a_sleeping_reward(tmp_path, no_retries):
    b = Sandbox(SandboxLimits(cpu_seconds=5, wall_seconds=1))
    try:
        rset = custom(b, tmp_path, """
            import os, time

            def f(completions):
                if not os.path.exists("slept"):  # the scratch folder outlives a killed worker
                    open("slept", "w").close()
                    time.sleep(60)
                return [2.0] * len(completions)
        """)
        t0 = time.monotonic()
        assert call(rset.funcs[0], ["a"]) == [None]
        assert time.monotonic() - t0 < 5
        assert b.restarts == 1
        # The next call gets a fresh worker with the function loaded again.
        assert call(rset.funcs[0], ["a"]) == [2.0] and b.restarts == 1
    finally:
        b.close()


def test_memory_limit_is_an_error_in_the_reward_not_in_the_trainer(tmp_path, no_retries):
    b = Sandbox(SandboxLimits(memory_bytes=512 << 20))
    try:
        rset = custom(b, tmp_path, """
            def f(completions):
                block = bytearray(1 << 30)
                return [1.0] * len(completions)
        """)
        assert call(rset.funcs[0], ["a"]) == [None]  # MemoryError: transient, retried, then dropped
    finally:
        b.close()


def test_transient_failure_is_retried_and_succeeds(box, tmp_path, monkeypatch):
    monkeypatch.setattr(rewards, "RETRY_PAUSE_SECONDS", (0.0, 0.0))
    rset = custom(box, tmp_path, """
        calls = []

        def f(completions):
            calls.append(1)
            if len(calls) < 3:
                raise ConnectionError("scoring service unavailable")
            return [float(len(calls))] * len(completions)
    """)
    assert call(rset.funcs[0], ["a"]) == [3.0]  # two failures, the third attempt (the last retry) succeeds


def test_deterministic_error_fails_the_job_with_module_function_and_traceback(box, tmp_path):
    rset = custom(box, tmp_path, """
        def helper(x):
            return x + 1

        def f(completions):
            return [helper("not a number") for _ in completions]
    """, name="scoring:f")
    with pytest.raises(ConfigError) as err:
        call(rset.funcs[0], ["a"])
    msg = err.value.message
    assert err.value.field == f"{FIELD}[0]"
    assert "module scoring, function f" in msg and "raised TypeError" in msg
    assert "scoring.py" in msg and "helper" in msg and "return x + 1" in msg  # the traceback tail
    assert box.restarts == 0  # not retried


def test_log_metric_reaches_trl_from_inside_the_sandbox(box, tmp_path):
    rset = custom(box, tmp_path, """
        def f(completions, log_metric):
            log_metric("lengths", sum(len(c) for c in completions))
            return [1.0] * len(completions)
    """)
    got = []
    assert call(rset.funcs[0], ["ab", "c"], log_metric=lambda k, v: got.append((k, v)),
                log_extra=lambda *a: None) == [1.0, 1.0]
    assert got == [("lengths", 3.0)]


# ------------------------------------------------------------------------------------------------ reward errors
def test_builtin_that_raises_drops_that_call_and_counts_it(caplog):
    counted = []
    remove = rewards.add_listener(counted.append)
    try:
        rset = rewards.build([rf("numeric_match")], field=FIELD)
        func = rset.funcs[0]
        with caplog.at_level(logging.WARNING, "kubetune.rewards"):
            # 2 completions, 1 reference: the built-in raises ValueError
            assert call(func, ["1", "2"], answer=["1"]) == [None, None]
        assert counted == ["numeric_match"] and "numeric_match failed" in caplog.text
        assert call(func, ["1", "2"], answer=["1", "3"]) == [1.0, 0.0]  # the next call works again
    finally:
        remove()


def test_builtin_failing_every_call_fails_the_job_naming_it():
    rset = rewards.build([rf("exact_match"), rf("numeric_match")], field=FIELD)
    func = rset.funcs[1]
    for _ in range(failures.MAX_CONSECUTIVE_FAILURES - 1):
        assert call(func, ["1"], answer=[]) == [None]
    with pytest.raises(DataError) as err:
        call(func, ["1"], answer=[])
    assert err.value.field == f"{FIELD}[1]"
    assert "numeric_match failed 5 calls in a row" in err.value.message


def test_custom_reward_failing_transiently_every_call_fails_the_job(tmp_path, monkeypatch):
    monkeypatch.setattr(rewards, "RETRY_PAUSE_SECONDS", (0.0, 0.0))
    b = Sandbox()
    try:
        rset = custom(b, tmp_path, """
            def f(completions):
                raise TimeoutError("upstream judge timed out")
        """)
        for _ in range(failures.MAX_CONSECUTIVE_FAILURES - 1):
            assert call(rset.funcs[0], ["a"]) == [None]
        with pytest.raises(ConfigError) as err:
            call(rset.funcs[0], ["a"])
        assert err.value.field == f"{FIELD}[0]" and "r.f failed 5 calls in a row" in err.value.message
        assert "upstream judge timed out" in err.value.message
    finally:
        b.close()


# ------------------------------------------------------------------------------------------------ policy
@pytest.mark.parametrize("name,params,source", [
    ("r:f", None, "r.py"),
    ("code_execution", None, None),
])
def test_custom_code_is_refused_where_the_policy_forbids_it(tmp_path, monkeypatch, name, params, source):
    src = write(tmp_path / "r.py", "def f(completions):\n    return [0.0] * len(completions)\n")
    monkeypatch.setenv(policy.ENV_ALLOW_CUSTOM_CODE, "false")
    spec = rf(name, params, f"file://{src}" if source else None)
    with pytest.raises(ConfigError) as err:
        rewards.build([rf("exact_match"), spec], fetch=fetch, field=FIELD)
    assert err.value.field == f"{FIELD}[1].name" and "does not allow" in err.value.message
    monkeypatch.setenv(policy.ENV_ALLOW_CUSTOM_CODE, "maybe")
    with pytest.raises(ConfigError):
        rewards.build([spec], fetch=fetch, field=FIELD)
    monkeypatch.setenv(policy.ENV_ALLOW_CUSTOM_CODE, "true")
    rewards.build([spec], fetch=fetch, field=FIELD).close()


# ------------------------------------------------------------------------------------------------ code_execution
def test_extract_code_takes_the_last_python_block():
    text = "Plan:\n```text\nnot code\n```\nFirst try:\n```python\nx = 1\n```\nFixed:\n```py\nx = 2\n```\nDone."
    assert code_execution.extract_code(text) == "x = 2\n"
    assert code_execution.extract_code("def f():\n    return 1") == "def f():\n    return 1"
    assert code_execution.extract_code("```bash\nrm -rf /\n```") == ""
    assert code_execution.tests_of('["assert 1", "assert 2"]') == ["assert 1", "assert 2"]
    assert code_execution.tests_of("assert f() == 1") == ["assert f() == 1"]
    assert code_execution.tests_of([]) == [] and code_execution.tests_of(None) == []


def test_code_execution_scores_the_pass_rate(box):
    rset = rewards.build([rf("code_execution", {"timeout": "2"})], field=FIELD, sandbox=box)
    tests = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]
    completions = [
        "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```",   # correct: 3/3
        "```python\ndef add(a, b):\n    return a - b\n```",                  # wrong: add(-1,1)? -2; 2-2=0 -> 0/3
        "```python\ndef add(a, b):\n    return 3 if a == 1 else a + b + (a == 2)\n```",  # 2/3
        "```python\nimport sys\nsys.exit(0)\n```",                            # exits before the tests: 0
        "I cannot write code.",                                                # not a program: 0
        "```python\ndef add(a, b):\n    return a + b\n```",                   # no tests for this row: None
    ]
    refs = [tests] * 5 + [[]]
    got = call(rset.funcs[0], completions, tests=refs)
    assert got == [1.0, 0.0, pytest.approx(2 / 3), 0.0, 0.0, None]
    assert rset.columns == [("tests", f"{FIELD}[0]")]


def test_code_execution_contains_infinite_loops_and_fork_bombs(box):
    rset = rewards.build([rf("code_execution", {"timeout": "0.5", "nproc": "3"})], field=FIELD, sandbox=box)
    bomb = "```python\nimport os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n```"
    spin = "```python\nwhile True:\n    pass\n```"
    slow_test = "```python\ndef f():\n    while True:\n        pass\n```"
    good = "```python\ndef f():\n    return 1\n```"
    assert call(rset.funcs[0], [good], tests=[["assert f() == 1"]]) == [1.0]  # the worker runs
    before = _sandbox_uid_processes(box)
    t0 = time.monotonic()
    got = call(rset.funcs[0], [bomb, spin, slow_test, good],
               tests=[["assert True"], ["assert True"], ["assert f() == 1", "assert 1 == 1"], ["assert f() == 1"]])
    took = time.monotonic() - t0
    assert got == [0.0, 0.0, 0.5, 1.0]
    assert took < 30
    # Nothing the programs started survives them.
    deadline = time.monotonic() + 10
    while _sandbox_uid_processes(box) > before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _sandbox_uid_processes(box) <= before
    # And the sandbox still works.
    assert call(rset.funcs[0], [good], tests=[["assert f() == 1"]]) == [1.0]


def _sandbox_uid_processes(box) -> int:
    uid = 65534 if os.geteuid() == 0 else os.getuid()
    out = subprocess.run(["ps", "-u", str(uid), "-o", "pid=,stat="], capture_output=True, text=True).stdout
    # Zombies are already dead (only their exit status is left for the parent to collect).
    return sum(1 for line in out.splitlines() if line.split() and not line.split()[1].startswith("Z"))


def test_code_execution_bad_params_are_config_errors(box):
    with pytest.raises(ConfigError) as err:
        rewards.build([rf("code_execution", {"timeout": "soon"})], field=FIELD, sandbox=box)
    assert err.value.field == f"{FIELD}[0].params"
    with pytest.raises(ConfigError) as err:
        rewards.build([rf("code_execution", {"langauge": "python"})], field=FIELD, sandbox=box)
    assert "unknown params" in err.value.message


def test_failed_reward_calls_are_exported_as_a_counter_per_reward(tmp_path):
    from prometheus_client import generate_latest

    from kubetune_api.finetunejob import parse_job
    from kubetune_trainer.monitoring import RunMonitor

    job = parse_job({"metadata": {"name": "demo", "namespace": "ml"},
                     "spec": {"stage": "grpo", "model": {"source": "file:///m"},
                              "dataset": {"format": "prompt_only", "train": [{"uri": "file:///d.jsonl"}]},
                              "output": {"uri": "file:///out"},
                              "training": {"grpo": {"rewards": [{"name": "numeric_match"}]}}}})
    monitor = RunMonitor(job, tmp_path, port=0)
    remove = rewards.add_listener(monitor.count_reward_error)
    try:
        func = rewards.build([rf("exact_match"), rf("numeric_match")], field=FIELD).funcs[1]
        call(func, ["1"], answer=[])
        call(func, ["1"], answer=[])
        call(func, ["1"], answer=["1"])
    finally:
        remove()
    text = generate_latest(monitor.registry).decode()
    assert ('kubetune_reward_errors_total{adapter="lora",finetunejob="demo",namespace="ml",reward="numeric_match",'
            'stage="grpo"} 2.0') in text
    # a reward that never failed exports 0 from its setup on: the dashboard's error panel shows "0", not "no data"
    assert ('kubetune_reward_errors_total{adapter="lora",finetunejob="demo",namespace="ml",reward="exact_match",'
            'stage="grpo"} 0.0') in text


def test_the_worker_and_its_scratch_go_away_with_the_rewards(tmp_path):
    import gc

    src = write(tmp_path / "g.py", "def f(completions):\n    return [1.0] * len(completions)\n")
    rset = rewards.build([rf("g:f", source=f"file://{src}")], fetch=fetch, field=FIELD)
    assert call(rset.funcs[0], ["a"]) == [1.0]
    pid, scratch = rset.sandbox.info["pid"], rset.sandbox.scratch
    assert Path(f"/proc/{pid}").exists() and scratch.is_dir()
    del rset
    gc.collect()
    assert not Path(f"/proc/{pid}").exists() and not scratch.exists()


def test_a_restarted_worker_loads_the_source_as_shipped_not_as_the_sandbox_left_it(box, tmp_path, caplog):
    rset = custom(box, tmp_path, "def f(completions):\n    return [0.0] * len(completions)\n")
    copy = next((box.scratch / ".sources").rglob("r.py"))
    # Code in the sandbox runs as the source copy's owner in a non-root pod: it could rewrite the copy to score
    # everything 1.0 and then crash the worker. Simulate both.
    copy.chmod(0o644)
    copy.write_text("def f(completions):\n    return [1.0] * len(completions)\n")
    box._kill()
    with caplog.at_level(logging.WARNING, "kubetune.rewards.sandbox"):
        assert call(rset.funcs[0], ["a"]) == [0.0]
    assert "modified inside the sandbox" in caplog.text


def test_two_folders_with_the_same_module_name_in_one_job(tmp_path):
    for folder, value in (("a", 1.0), ("b", 2.0)):
        write(tmp_path / folder / "scoring.py", f"def f(completions):\n    return [{value}] * len(completions)\n")
    rset = rewards.build([rf("scoring:f", source=f"file://{tmp_path / 'a'}"),
                          rf("scoring:f", source=f"file://{tmp_path / 'b'}")], fetch=fetch, field=FIELD)
    try:
        assert [call(f, ["x"]) for f in rset.funcs] == [[1.0], [2.0]]
        assert rset.names == ["scoring.f", "scoring.f_2"]
    finally:
        rset.close()


# ------------------------------------------------------------------------------------------------ through a run
def test_a_broken_custom_reward_ends_the_run_with_its_traceback_in_the_report(make_job, run_job, tmp_path):
    """The whole path: runner -> GRPO -> sandboxed reward raises TypeError -> ConfigError -> TrainerReport (what
    the termination message carries to the FineTuneJob's condition): exit 78, the entry, module, function and
    the user's line."""
    src = write(tmp_path / "judge.py", """
        def score(completions, answer):
            return [len(c) / answer for c, answer in zip(completions, answer)]
    """)
    job = make_job(data="prompt_only", stage="grpo",
                   training={"maxSteps": 1, "batchSize": 2,
                             "grpo": {"numGenerations": 2, "maxCompletionLength": 4,
                                      "rewards": [{"name": "judge:score", "source": f"file://{src}"}]}})
    report = run_job(job)
    assert report.state == "failed" and report.exit_code == 78 and report.reason == "InvalidConfig"
    assert report.field == "spec.training.grpo.rewards[0]"
    assert "module judge, function score" in report.message and "raised TypeError" in report.message
    assert "judge.py" in report.message and "len(c) / answer" in report.message
