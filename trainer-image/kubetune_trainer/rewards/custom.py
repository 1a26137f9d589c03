"""Your own reward function: `name: "module:function"` shipped with `source` (a .py file or a folder URI).

The source is fetched with the job's storage settings and imported only inside the reward sandbox (sandbox.py):
a separate process without the trainer's credentials or env, with CPU, memory and wall-clock limits. Neither
the operator nor the trainer process ever imports it. Whatever goes wrong while loading it (the URI, a syntax
error, an import error in the module, a missing or non-callable function) is a `ConfigError` naming
`spec.training.<stage>.rewards[i]`, so the job fails at once with a message that says what to fix.

- A file: `source: s3://bucket/rewards/my_rewards.py`, `name: my_rewards:score`; the module part must be the
  file's name without `.py`.
- A folder: `source: s3://bucket/rewards/`, `name: my_pkg.scoring:score`; the folder goes on the sandbox's
  `sys.path`, so the module can import its siblings (a package with `__init__.py`, helper modules).

The function receives what TRL passes (`completions`, `prompts`, `completion_ids`, the extra dataset columns,
`trainer_state` as a dict of its numbers, `log_metric`, `log_extra`) filtered to the parameters it declares,
unless it takes `**kwargs`; `params` from the manifest are added as keyword arguments (strings). It returns one
float (or None: "not applicable") per completion.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import ConfigError, TrainerError
from .sandbox import RemoteError, Sandbox, SandboxError

_IDENT_PART = r"[A-Za-z_][A-Za-z0-9_]*"
# Arguments TRL always passes; a custom function may declare any of them without a dataset column behind it.
TRL_ARGUMENTS = ("completions", "prompts", "completion_ids", "trainer_state", "log_extra", "log_metric",
                 "environments")


def parse_name(name: str, field: str) -> tuple[str, str]:
    import re

    if name.count(":") != 1:
        raise ConfigError(f"custom reward name {name!r} must look like 'module:function' (or name a built-in)",
                          field=f"{field}.name")
    module, func = name.split(":")
    if not re.fullmatch(rf"{_IDENT_PART}(\.{_IDENT_PART})*", module) or not re.fullmatch(_IDENT_PART, func):
        raise ConfigError(f"custom reward name {name!r}: module and function must be Python identifiers "
                          "(e.g. my_rewards:score or my_pkg.scoring:score)", field=f"{field}.name")
    return module, func


@dataclass
class SandboxedFunction:
    """A custom reward loaded in the sandbox: its handle there and what its signature declares."""

    name: str
    module: str
    function: str
    handle: int
    var_kw: bool
    named: set[str]
    required: set[str]
    sandbox: Sandbox


def load_function(name: str, source: Optional[str], fetch: Optional[Callable[[str], Path]], field: str,
                  sandbox: Sandbox) -> SandboxedFunction:
    """Fetch the source and import `module:function` in the sandbox; ConfigError(field) on any failure."""
    module_name, func_name = parse_name(name, field)
    if not source:
        raise ConfigError(f"custom reward {name!r} needs source (a .py file or folder URI holding {module_name})",
                          field=f"{field}.source")
    if fetch is None:
        raise ConfigError("custom rewards need a way to fetch their source; none was configured", field=field)
    try:
        path = Path(fetch(source))
    except TrainerError as exc:
        raise ConfigError(f"cannot fetch {source}: {exc.message}", field=f"{field}.source") from None
    except Exception as exc:  # noqa: BLE001 - any fetch failure means the URI cannot be used
        raise ConfigError(f"cannot fetch {source}: {type(exc).__name__}: {exc}", field=f"{field}.source") from None

    if path.is_file():
        if path.suffix != ".py":
            raise ConfigError(f"{source} is not a .py file (a custom reward source is a .py file or a folder)",
                              field=f"{field}.source")
        if path.stem != module_name:
            raise ConfigError(f"the module part of the name must be the file's name: {path.stem}:<function> for "
                              f"{source} (got {module_name})", field=f"{field}.name")
    elif not path.is_dir():
        raise ConfigError(f"{source} is neither a file nor a folder", field=f"{field}.source")

    try:
        handle, sig = sandbox.load(path, module_name, func_name)
    except RemoteError as exc:
        raise _load_error(exc, name, module_name, func_name, source, path, field) from None
    except SandboxError as exc:
        raise ConfigError(f"importing {source} in the reward sandbox failed: {exc}", field=f"{field}.source") from None
    return SandboxedFunction(name=name, module=module_name, function=func_name, handle=handle,
                             var_kw=bool(sig.get("var_kw")), named=set(sig.get("named") or ()),
                             required=set(sig.get("required") or ()), sandbox=sandbox)


def _load_error(exc: RemoteError, name: str, module: str, func: str, source: str, path: Path,
                field: str) -> ConfigError:
    answer = exc.answer
    kind = answer.get("kind")
    if kind == "no_function":
        public = answer.get("public") or "no public callables"
        return ConfigError(f"module {module} (from {source}) has no function {func!r}; it defines {public}",
                           field=f"{field}.name")
    if kind == "not_callable":
        return ConfigError(f"{name} is a {exc.type}, not a function", field=f"{field}.name")
    if kind == "async":
        return ConfigError(f"{name} is async; reward functions must be plain (synchronous) functions",
                           field=f"{field}.name")
    if kind == "no_module":
        found = sorted(p.name for p in path.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists())
        return ConfigError(f"no module {module} in {source} (it holds: {found or 'no Python modules'})",
                           field=f"{field}.name")
    what = source if path.is_file() else f"{module} from {source}"
    tail = _tail(exc.traceback)
    return ConfigError(f"importing {what} failed: {exc.message}{tail}", field=f"{field}.source")


def _tail(traceback: str, lines: int = 6) -> str:
    """The last lines of a traceback, for a condition message (the termination message holds 4 KiB in all)."""
    kept = [ln for ln in traceback.strip().splitlines() if ln.strip()][-lines:]
    return ("\n" + "\n".join(kept))[:1200] if kept else ""
