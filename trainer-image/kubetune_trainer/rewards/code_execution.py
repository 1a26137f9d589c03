"""The `code_execution` built-in: run the model's generated program against the row's test cases, score the pass
rate. Reasoning RL on code with a verifiable reward.

    rewards:
      - name: code_execution
        params: {column: tests, timeout: "3"}
    # a row: {"prompt": "Write add(a, b) ...", "tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]}

The program is the last fenced code block of the completion (```python, ```py or untagged), or the whole
completion when it has none. Every program runs in a fresh process started by the reward sandbox's worker (no
credentials, no trainer env, scratch folder only; see sandbox.py) with its own limits: CPU time, memory,
processes (a fork bomb stops at `nproc`) and a wall clock after which its whole process group is killed. The
code runs first, then each test separately with its own timeout; the score is passed / total. A program that
does not finish, crashes, or exits before the tests report (sys.exit(0) at the top) passes nothing: results
count only when they come with a per-run secret the program is not given.

The column holds a list of test snippets (each one test; typically `assert f(x) == y`) or one string (one
test). A row with no tests returns None ("does not apply"). Allowed only where custom code is (policy.py).
"""

from __future__ import annotations

import json
import re
from typing import Any

from .builtin import BuiltinReward, RewardParamError, _column, _float, _references, completion_text
from .sandbox import ProgramLimits, Sandbox

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = ("", "python", "py", "python3")
PARAMS = ("column", "timeout", "memory_mb", "nproc")


def extract_code(text: str) -> str:
    """The last fenced Python (or untagged) block; the whole text when there is no fence."""
    blocks = [(tag.lower(), body) for tag, body in _FENCE.findall(text)]
    python = [body for tag, body in blocks if tag in _PYTHON_TAGS]
    if python:
        return python[-1]
    return text if not blocks else ""


def tests_of(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("["):
            try:  # a JSON list stored as a string column
                parsed = json.loads(stripped)
                if isinstance(parsed, list):
                    return [str(t) for t in parsed if str(t).strip()]
            except ValueError:
                pass
        return [value] if stripped else []
    return [str(t) for t in value if str(t).strip()]


def build(params: dict, sandbox: Sandbox) -> BuiltinReward:
    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise RewardParamError(f"unknown params {unknown} for code_execution (accepted: {', '.join(PARAMS)})")
    column = _column({"column": params.get("column", "tests")})
    test_seconds = _float(params, "timeout", 3.0, minimum=0.1)
    memory_mb = _float(params, "memory_mb", 512.0, minimum=64.0)
    nproc = int(_float(params, "nproc", 4.0, minimum=1.0))
    limits = ProgramLimits(cpu_seconds=max(1.0, 2 * test_seconds), test_seconds=test_seconds,
                           wall_seconds=max(2.0, 4 * test_seconds), memory_bytes=int(memory_mb) << 20, nproc=nproc)

    def code_execution(completions, **kwargs) -> list:
        refs = _references(kwargs, column, len(completions), "code_execution")
        programs, index = [], []
        for i, (c, r) in enumerate(zip(completions, refs)):
            tests = tests_of(r)
            if tests:
                index.append(i)
                programs.append({"code": extract_code(completion_text(c)), "tests": tests})
        scores: list = [None] * len(completions)
        if programs:
            for i, passed in zip(index, sandbox.run_programs(programs, limits)):
                scores[i] = sum(passed) / len(passed)
        return scores

    return BuiltinReward("code_execution", code_execution, (column,))
