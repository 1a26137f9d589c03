"""The layers stay where they are: the operator, the API package and the client never import the training
stack (torch, transformers, trl, peft, deepspeed), and the trainer never imports the operator. Checked
statically (every import statement, lazy ones included) and at runtime (in a fresh interpreter, which
modules actually loaded). The client reaches into the trainer only through the torch-free modules named in
CLIENT_MAY_IMPORT (and `kubetune run`'s hand-over, which first checks that the trainer is installed)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "trl", "peft", "deepspeed", "accelerate", "bitsandbytes", "datasets")
PACKAGES = {
    "kubetune_api": REPO / "operator" / "kubetune_api",
    "kubetune_operator": REPO / "operator" / "kubetune_operator",
    "kubetune_cli": REPO / "operator" / "kubetune_cli",
    "kubetune_trainer": REPO / "trainer-image" / "kubetune_trainer",
}
# Trainer modules the client uses for `kubetune plot` (fetch from the store, draw the PNG) and the hand-over
# of `kubetune run`/`tiny`; the first three must stay torch-free themselves (checked below).
CLIENT_MAY_IMPORT = {"kubetune_trainer.storage", "kubetune_trainer.errors", "kubetune_trainer.monitoring.plot",
                     "kubetune_trainer.cli"}
TORCH_FREE_TRAINER_PARTS = [PACKAGES["kubetune_trainer"] / p for p in ("storage", "errors.py", "monitoring/plot.py")]


def _module_parts(path: Path) -> list[str]:
    for pkg, root in PACKAGES.items():
        if root in path.parents:
            return [pkg, *path.relative_to(root).with_suffix("").parts]
    raise AssertionError(f"{path} is in no package")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute name) of every import in a file, function-level and relative ones included;
    `from X import y` gives X.y (y may be a submodule)."""
    package = _module_parts(path)[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return out


def _files(*roots: Path) -> list[Path]:
    return sorted(f for r in roots for f in ([r] if r.is_file() else r.rglob("*.py")))


def _top(mod: str) -> str:
    return mod.split(".")[0]


def _violations(files: list[Path], forbidden) -> list[str]:
    return [f"{f.relative_to(REPO)}:{line}: imports {mod}" for f in files for line, mod in _imports(f)
            if forbidden(mod)]


def test_import_parser_sees_lazy_and_relative_imports():
    """The static check would be worthless if it missed function-level or relative imports."""
    found = {m for _, m in _imports(PACKAGES["kubetune_cli"] / "app.py")}
    assert "kubetune_trainer.cli.cmd_run" in found  # inside cmd_run
    assert "kubetune_cli.follow.follow" in found  # `from .follow import follow` inside cmd_follow
    assert "kubetune_trainer.storage" in {m for _, m in _imports(PACKAGES["kubetune_cli"] / "plot.py")}
    assert "kubetune_api.common.Model" in {m for _, m in _imports(PACKAGES["kubetune_api"] / "report.py")}


def test_operator_api_and_client_never_import_the_training_stack():
    files = _files(PACKAGES["kubetune_api"], PACKAGES["kubetune_operator"], PACKAGES["kubetune_cli"],
                   *TORCH_FREE_TRAINER_PARTS)
    assert not _violations(files, lambda m: _top(m) in HEAVY)


def test_operator_and_api_never_import_the_trainer_or_the_client():
    files = _files(PACKAGES["kubetune_api"], PACKAGES["kubetune_operator"])
    assert not _violations(files, lambda m: _top(m) in ("kubetune_trainer", "kubetune_cli"))
    assert not _violations(_files(PACKAGES["kubetune_api"]), lambda m: _top(m) == "kubetune_operator")


def test_trainer_never_imports_the_operator():
    assert not _violations(_files(PACKAGES["kubetune_trainer"]), lambda m: _top(m) == "kubetune_operator")


def test_client_uses_only_the_torch_free_trainer_modules():
    def outside(mod: str) -> bool:
        return _top(mod) == "kubetune_trainer" and not any(mod == a or mod.startswith(a + ".") for a in CLIENT_MAY_IMPORT)

    assert not _violations(_files(PACKAGES["kubetune_cli"]), outside)
    assert not _violations(_files(PACKAGES["kubetune_cli"]), lambda m: _top(m) == "kubetune_operator")


def _loaded_after(code: str) -> list[str]:
    probe = code + f"\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(HEAVY)!r}))))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def test_importing_every_operator_api_and_client_module_loads_no_training_stack():
    modules = [f"{pkg}.{'.'.join(f.relative_to(root).with_suffix('').parts)}".removesuffix(".__init__")
               for pkg in ("kubetune_api", "kubetune_operator", "kubetune_cli")
               for root in [PACKAGES[pkg]] for f in _files(root) if f.name != "__main__.py"]
    assert len(modules) > 20
    assert _loaded_after("import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)) == []


def test_client_commands_load_no_training_stack(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"event":"train","step":1,"loss":2.0}\n{"event":"eval","step":1,"eval_loss":2.1}\n')
    code = ("from kubetune_cli import app\n"
            "try:\n    app.main(['follow', '--help'])\nexcept SystemExit:\n    pass\n"
            f"assert app.main(['plot', {str(metrics)!r}, '-o', {str(tmp_path / 'c.png')!r}]) == 0\n"
            f"assert app.main(['plot', 'file://{tmp_path}', '-o', {str(tmp_path / 'd.png')!r}]) == 0\n")
    assert _loaded_after(code) == []
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"


def test_run_without_the_trainer_says_how_to_install_it(monkeypatch, capsys):
    from kubetune_cli import app

    monkeypatch.setattr(app.importlib.util, "find_spec", lambda name, *a: None)
    assert app.main(["run"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'kubetune[trainer]'" in err and len(err.strip().splitlines()) == 1
    assert app.main(["tiny", "data", "/tmp/x"]) == 2
