"""Your own reward function: `name: "module:function"` shipped with `source` (a .py file or a folder URI).

The source is fetched with the job's storage settings and imported inside the trainer process only (the
operator never imports it). Whatever goes wrong while loading it (the URI, a syntax error, an import error in
the module, a missing or non-callable function) is a `ConfigError` naming `spec.training.<stage>.rewards[i]`,
so the job fails at once with a message that says what to fix instead of retrying.

- A file: `source: s3://bucket/rewards/my_rewards.py`, `name: my_rewards:score`; the module part must be the
  file's name without `.py`.
- A folder: `source: s3://bucket/rewards/`, `name: my_pkg.scoring:score`; the folder goes on `sys.path`, so
  the module can import its siblings (a package with `__init__.py`, helper modules).

The function receives what TRL passes (`completions`, `prompts`, `completion_ids`, the extra dataset columns,
`trainer_state`, ...) filtered to the parameters it declares, unless it takes `**kwargs`; `params` from the
manifest are added as keyword arguments (strings). It returns one float (or None: "not applicable") per
completion.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import ConfigError, TrainerError

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


def load_function(name: str, source: Optional[str], fetch: Optional[Callable[[str], Path]], field: str) -> Callable:
    """Import `module:function` from the fetched source; ConfigError(field) on any failure."""
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

    module = _import(module_name, path, source, field)
    func = getattr(module, func_name, None)
    if func is None:
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ConfigError(f"module {module_name} (from {source}) has no function {func_name!r}; it defines "
                          f"{public or 'no public callables'}", field=f"{field}.name")
    if not callable(func):
        raise ConfigError(f"{name} is a {type(func).__name__}, not a function", field=f"{field}.name")
    if inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(getattr(func, "__call__", None)):
        raise ConfigError(f"{name} is async; reward functions must be plain (synchronous) functions",
                          field=f"{field}.name")
    return func


def _import(module_name: str, path: Path, source: str, field: str):
    if path.is_file():
        if path.suffix != ".py":
            raise ConfigError(f"{source} is not a .py file (a custom reward source is a .py file or a folder)",
                              field=f"{field}.source")
        if path.stem != module_name:
            raise ConfigError(f"the module part of the name must be the file's name: {path.stem}:<function> for "
                              f"{source} (got {module_name})", field=f"{field}.name")
        # A unique module name: two jobs' files called rewards.py must not share a sys.modules entry.
        unique = f"kubetune_custom_reward_{module_name}_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(unique, path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - user code: every failure is a config problem to report
            raise ConfigError(f"importing {source} failed: {_describe(exc)}", field=f"{field}.source") from None
        sys.modules[unique] = module
        return module
    if not path.is_dir():
        raise ConfigError(f"{source} is neither a file nor a folder", field=f"{field}.source")
    folder = str(path.resolve())
    if folder not in sys.path:
        sys.path.insert(0, folder)
    # A module of the same name imported earlier from another place (another job's folder in the same process,
    # or an installed package) would shadow this source through sys.modules: drop it so this folder's wins.
    top = module_name.split(".", 1)[0]
    for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
        origin = getattr(sys.modules[name], "__file__", None) or ""
        if not str(Path(origin).resolve()).startswith(folder + "/"):
            del sys.modules[name]
    importlib.invalidate_caches()
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            found = sorted(p.name for p in path.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists())
            raise ConfigError(f"no module {module_name} in {source} (it holds: {found or 'no Python modules'})",
                              field=f"{field}.name") from None
        raise ConfigError(f"importing {module_name} from {source} failed: {_describe(exc)}",
                          field=f"{field}.source") from None
    except Exception as exc:  # noqa: BLE001 - user code
        raise ConfigError(f"importing {module_name} from {source} failed: {_describe(exc)}",
                          field=f"{field}.source") from None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SyntaxError):
        return f"SyntaxError: {exc.msg} ({Path(exc.filename or '?').name}, line {exc.lineno})"
    return f"{type(exc).__name__}: {exc}"[:500]


def declared_arguments(func: Callable) -> tuple[bool, set[str], set[str]]:
    """(accepts **kwargs, every named parameter, the named parameters without a default)."""
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):  # builtins without a signature: pass everything
        return True, set(), set()
    var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    named = {n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    required = {n for n, p in sig.parameters.items()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty}
    return var_kw, named, required


def call_filtered(func: Callable, var_kw: bool, named: set[str], kwargs: dict[str, Any]) -> Any:
    return func(**(kwargs if var_kw else {k: v for k, v in kwargs.items() if k in named}))
