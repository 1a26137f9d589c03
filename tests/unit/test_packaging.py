"""The two images cannot be built here (no container engine), so their Dockerfiles are checked against
pyproject.toml, the single place where dependency versions live:

- a `pip install` in a Dockerfile installs only this project with its extra (`.[operator]`, `.[trainer]`),
  never a package name, version, requirements file or URL;
- the `operator` extra, including everything it pulls in, contains none of the training stack (torch & co.);
- both images run a Python that satisfies requires-python and equals the one the test suite runs on;
- both run as a numeric non-root USER, with the entry points the operator and the chart rely on;
- the versions pinned in pyproject are the ones installed in the team venv (what the tests exercised).

    .venv/bin/python -m pytest tests/unit/test_packaging.py -q
"""
from __future__ import annotations

import importlib.metadata as md
import json
import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from kubetune_api import constants as C

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
OPERATOR_DOCKERFILE = REPO / "Dockerfile"
TRAINER_DOCKERFILE = REPO / "trainer-image" / "Dockerfile"
# The training stack: none of it may reach the operator image (size, CVE surface, start-up time).
TRAINING_STACK = {canonicalize_name(n) for n in (
    "torch", "transformers", "peft", "trl", "accelerate", "datasets", "deepspeed", "bitsandbytes",
    "galore-torch", "triton", "safetensors", "tokenizers", "huggingface-hub", "numpy", "matplotlib",
)}


# ---------------------------------------------------------------------------------------------- parsing
def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """[(INSTRUCTION, arguments)] with comments dropped and backslash continuations joined."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # comment lines inside a continued instruction are ignored by BuildKit
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        instr, _, args = buf.strip().partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    if buf.strip():
        instr, _, args = buf.strip().partition(" ")
        out.append((instr.upper(), args.strip()))
    return out


def instructions(path: Path, name: str) -> list[str]:
    return [a for i, a in parse_dockerfile(path.read_text()) if i == name]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"use the exec (JSON) form so signals reach Python: {args}"
    return value


_PIP_OPTS_WITH_VALUE = {"-i", "--index-url", "--extra-index-url", "-f", "--find-links", "--target", "-t",
                        "--prefix", "--root", "--trusted-host", "--platform", "--python-version"}


def pip_installs(path: Path) -> list[tuple[dict[str, str], list[str], list[str]]]:
    """Every `pip install` in RUN lines: (env assignments before it, options, requirement arguments)."""
    found = []
    for run in instructions(path, "RUN"):
        for cmd in re.split(r"&&|\|\||;|\|", run):
            words = shlex.split(cmd)
            env = {}
            while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
                k, _, v = words.pop(0).partition("=")
                env[k] = v
            if words[:1] == ["env"]:
                words.pop(0)
                while words and "=" in words[0]:
                    k, _, v = words.pop(0).partition("=")
                    env[k] = v
            # pip / pip3 / pythonX -m pip
            if len(words) >= 3 and re.match(r"^python[\d.]*$", Path(words[0]).name) and words[1:3] == ["-m", "pip"]:
                words = ["pip"] + words[3:]
            if not words or not re.match(r"^pip[\d.]*$", Path(words[0]).name) or words[1:2] != ["install"]:
                continue
            opts, reqs, rest = [], [], words[2:]
            while rest:
                w = rest.pop(0)
                if w.startswith("-"):
                    opts.append(w)
                    if w in _PIP_OPTS_WITH_VALUE or w in ("-r", "--requirement", "-c", "--constraint", "-e", "--editable"):
                        opts.append(rest.pop(0) if rest else "")
                else:
                    reqs.append(w)
            found.append((env, opts, reqs))
    return found


def extra_of(req: str) -> str | None:
    m = re.fullmatch(r"\.\[([A-Za-z0-9_-]+)\]", req)
    return m.group(1) if m else None


def closure(requirements: list[str], extras: tuple[str, ...] = ()) -> dict[str, str]:
    """Installed distributions reachable from `requirements` (name -> version), markers evaluated for this
    interpreter. Needs them installed, which the team venv is (docs/CONTRIBUTING-team.md)."""
    env = default_environment()
    seen: dict[str, str] = {}
    todo = [(Requirement(r), "") for r in requirements]
    while todo:
        req, extra = todo.pop()
        if req.marker and not req.marker.evaluate({**env, "extra": extra}):
            continue
        name = canonicalize_name(req.name)
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            pytest.skip(f"{req.name} is not installed in this environment; cannot walk the dependency tree")
        if name in seen:
            continue
        seen[name] = dist.version
        for sub in dist.requires or []:
            sub_req = Requirement(sub)
            if sub_req.marker is None or any(sub_req.marker.evaluate({**env, "extra": e}) for e in ("", *req.extras)):
                todo.append((sub_req, next((e for e in req.extras if sub_req.marker and
                                            sub_req.marker.evaluate({**env, "extra": e})), "")))
    return seen


def image_python(path: Path) -> str:
    """major.minor of the Python an image runs: FROM python:X.Y-... or ARG PYTHON_VERSION=X.Y."""
    args = dict(a.split("=", 1) for a in instructions(path, "ARG") if "=" in a)
    if "PYTHON_VERSION" in args:
        return args["PYTHON_VERSION"]
    for base in instructions(path, "FROM"):
        m = re.match(r"(?:docker\.io/)?(?:library/)?python:(\d+\.\d+)", base)
        if m:
            return m.group(1)
    raise AssertionError(f"{path}: cannot tell which Python the image runs")


# ---------------------------------------------------------------------------------------------- tests
DOCKERFILES = {"operator": OPERATOR_DOCKERFILE, "trainer": TRAINER_DOCKERFILE}


@pytest.mark.parametrize("extra,path", DOCKERFILES.items(), ids=list(DOCKERFILES))
def test_dockerfile_installs_only_the_projects_extra(extra: str, path: Path):
    installs = pip_installs(path)
    assert installs, f"{path}: no `pip install` found"
    for env, opts, reqs in installs:
        assert reqs == [f".[{extra}]"], (
            f"{path}: `pip install {' '.join(reqs)}`: install only \".[{extra}]\"; versions belong in pyproject.toml")
        forbidden = {"-r", "--requirement", "-c", "--constraint", "-e", "--editable", "-U", "--upgrade"} & set(opts)
        assert not forbidden, f"{path}: pip options {forbidden} bypass the pins in pyproject.toml"
        assert "--no-cache-dir" in opts, f"{path}: add --no-cache-dir (keeps the wheel cache out of the layer)"
    assert extra in PYPROJECT["project"]["optional-dependencies"]


def test_pip_install_parser_catches_drift():
    """The parser must see through the usual spellings, or the test above could not fail."""
    sample = Path(__file__).with_name("_tmp_Dockerfile_sample")
    try:
        sample.write_text('RUN apt-get update && \\\n    python3.11 -m pip install --no-cache-dir torch==2.5.0 \\\n'
                          '      ".[operator]"\nRUN DS_BUILD_OPS=0 pip install -r requirements.txt\n')
        got = pip_installs(sample)
    finally:
        sample.unlink()
    assert got[0][2] == ["torch==2.5.0", ".[operator]"]
    assert got[1][0] == {"DS_BUILD_OPS": "0"} and "-r" in got[1][1]


def leaked_training_stack(reqs: list[str]) -> list[str]:
    transitive = closure(reqs)
    return sorted(set(transitive) & TRAINING_STACK) + sorted(n for n in transitive if n.startswith("nvidia-"))


def test_operator_extra_has_no_training_stack():
    reqs = PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["operator"]
    direct = {canonicalize_name(Requirement(r).name) for r in reqs}
    assert not direct & TRAINING_STACK, f"operator extra names {direct & TRAINING_STACK}"
    leaked = leaked_training_stack(reqs)
    assert not leaked, f"the operator image would pull in {leaked} (via its dependencies)"
    assert {"kopf", "prometheus-client"} <= set(closure(reqs))
    # the operator speaks JSON over aiohttp (kube.py, credentials.py); the kubernetes client costs ~10 MB of RSS
    assert "kubernetes" not in set(closure(reqs)), "the operator image would install the kubernetes client"


def test_client_extra_has_no_training_stack():
    """`pip install 'kubetune[client]'` on a laptop: follow and plot, without torch & co."""
    reqs = PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["client"]
    leaked = set(leaked_training_stack(reqs)) - {"matplotlib", "numpy"}  # `kubetune plot` draws with these
    assert not leaked, f"the client install would pull in {sorted(leaked)} (via its dependencies)"
    assert {"kubernetes", "rich", "matplotlib", "boto3"} <= set(closure(reqs))
    assert PYPROJECT["project"]["scripts"]["kubetune"] == "kubetune_cli.app:main"


def test_every_package_folder_is_listed():
    """setuptools adds only the packages listed: a subpackage missing here is missing from the images."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    for pkg, folder in PYPROJECT["tool"]["setuptools"]["package-dir"].items():
        for init in (REPO / folder).rglob("__init__.py"):
            name = ".".join([pkg, *init.parent.relative_to(REPO / folder).parts])
            assert name in listed, f"add {name!r} to [tool.setuptools] packages in pyproject.toml"


def test_transitive_leak_is_detected():
    """peft does not name torch in the operator extra's terms, but depends on it: the walk must find it."""
    assert "torch" in leaked_training_stack(["peft"])


def test_operator_extra_is_exactly_pinned():
    """The operator image must be reproducible: every operator dependency is pinned with ==."""
    for r in PYPROJECT["project"]["optional-dependencies"]["operator"]:
        spec = list(Requirement(r).specifier)
        assert len(spec) == 1 and spec[0].operator == "==", f"pin {r!r} with == in pyproject.toml"


@pytest.mark.parametrize("extra", ["operator", "client", "trainer"])
def test_pins_match_the_environment_the_tests_ran_in(extra: str):
    """An image installs pyproject's pins; the tests ran against the venv. If they differ, the images ship
    versions nobody tested."""
    mismatched = []
    for r in PYPROJECT["project"]["optional-dependencies"][extra]:
        req = Requirement(r)
        try:
            installed = md.version(req.name)
        except md.PackageNotFoundError:
            pytest.skip(f"{req.name} not installed here")
        if not req.specifier.contains(installed, prereleases=True):
            mismatched.append(f"{req} (venv has {installed})")
    assert not mismatched, f"pyproject pins differ from the tested venv: {mismatched}"


@pytest.mark.parametrize("path", DOCKERFILES.values(), ids=list(DOCKERFILES))
def test_image_python_matches_requires_python(path: Path):
    version = image_python(path)
    requires = SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert requires.contains(f"{version}.0"), f"{path}: Python {version} violates requires-python {requires}"
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert version == here, f"{path}: image runs Python {version}, the test suite runs on {here}"


def test_both_images_run_the_same_python():
    assert image_python(OPERATOR_DOCKERFILE) == image_python(TRAINER_DOCKERFILE)


@pytest.mark.parametrize("path,uid", [(OPERATOR_DOCKERFILE, 65532), (TRAINER_DOCKERFILE, 1000)],
                         ids=list(DOCKERFILES))
def test_runs_as_numeric_non_root_user(path: Path, uid: int):
    parsed = parse_dockerfile(path.read_text())
    users = [(i, a) for i, (ins, a) in enumerate(parsed) if ins == "USER"]
    assert users, f"{path}: no USER instruction (would run as root)"
    last_index, last = users[-1]
    user, _, group = last.partition(":")
    # numeric: the kubelet can only enforce runAsNonRoot for a numeric USER
    assert user.isdigit() and int(user) == uid and int(user) != 0, f"{path}: USER {last}"
    assert not group or (group.isdigit() and int(group) != 0)
    # nothing may run as root after the switch (a later `USER root` would have been the last USER)
    runs_after = [a for ins, a in parsed[last_index:] if ins == "RUN"]
    assert not any("pip install" in a for a in runs_after), "install before dropping privileges"


def test_operator_image_entrypoint():
    entry = exec_form(instructions(OPERATOR_DOCKERFILE, "ENTRYPOINT")[-1])
    assert entry == ["python", "-m", "kubetune_operator"]
    assert instructions(OPERATOR_DOCKERFILE, "FROM")[0].startswith("python:3.11-slim")
    main = REPO / "operator" / "kubetune_operator" / "__main__.py"
    if not main.exists():
        pytest.skip("operator/kubetune_operator/__main__.py not written yet: cannot check the entry module")


def test_trainer_image_entrypoint_and_layout():
    entry = exec_form(instructions(TRAINER_DOCKERFILE, "ENTRYPOINT")[-1])
    cmd = exec_form(instructions(TRAINER_DOCKERFILE, "CMD")[-1])
    assert entry == ["python", "-m", "kubetune_trainer"]
    assert cmd == ["--config", f"{C.CONFIG_MOUNT_DIR}/{C.CONFIG_FILE_NAME}"]
    assert instructions(TRAINER_DOCKERFILE, "WORKDIR")[-1] == "/var/lib/kubetune"
    base = instructions(TRAINER_DOCKERFILE, "FROM")[0]
    assert re.match(r"nvidia/cuda:12\.\d+(\.\d+)?-cudnn-runtime-ubuntu\d\d\.04$", base), base
    installs = pip_installs(TRAINER_DOCKERFILE)
    assert all(env.get("DS_BUILD_OPS") == "0" for env, _, _ in installs), \
        "set DS_BUILD_OPS=0 on the trainer install (DeepSpeed must not compile ops at build time)"
    # the `python` on PATH must be the venv's Python (the entry point says `python`, not `python3.11`)
    envs = " ".join(instructions(TRAINER_DOCKERFILE, "ENV"))
    assert re.search(r"PATH=/opt/kubetune/bin:", envs) and "-m venv $VIRTUAL_ENV" in " ".join(
        instructions(TRAINER_DOCKERFILE, "RUN"))


@pytest.mark.parametrize("path", DOCKERFILES.values(), ids=list(DOCKERFILES))
def test_dockerfile_copies_every_package_pyproject_declares(path: Path):
    """setuptools builds all packages listed in pyproject; a package folder missing from the build context
    fails the image build (and one added to pyproject must be added here)."""
    copied = [a.split()[0] for a in instructions(path, "COPY") if not a.startswith("--from")]
    for pkg, folder in PYPROJECT["tool"]["setuptools"]["package-dir"].items():
        assert any(folder == c.rstrip("/") or folder.startswith(c.rstrip("/") + "/") for c in copied), \
            f"{path}: COPY {folder} (package {pkg})"
    assert "pyproject.toml" in copied


def test_trainer_command_matches_what_the_operator_renders():
    """The operator's Job sets the trainer container's command explicitly (the local node agent runs only
    `command`); it must be the image's ENTRYPOINT + CMD, so the same pod spec means the same thing everywhere.
    Multi-process jobs run torchrun with the same module and config."""
    entry = exec_form(instructions(TRAINER_DOCKERFILE, "ENTRYPOINT")[-1])
    cmd = exec_form(instructions(TRAINER_DOCKERFILE, "CMD")[-1])
    single = _rendered_trainer_pod("stage-sft.yaml")
    (c,) = single["containers"]
    assert c["command"] == entry + cmd, f"operator renders {c['command']}, the image runs {entry + cmd}"
    multi = _rendered_trainer_pod("multinode-deepspeed.yaml")
    command = multi["containers"][0]["command"]
    assert command[:3] == ["python", "-m", "kubetune_trainer.launch"] and command[-4:] == entry[1:] + cmd, command


def test_trainer_pod_matches_the_image_user_and_workdir():
    """The operator's pod security context and working dir agree with trainer-image/Dockerfile."""
    pod = _rendered_trainer_pod("stage-sft.yaml")
    uid = int(instructions(TRAINER_DOCKERFILE, "USER")[-1].split(":")[0])
    assert pod["securityContext"]["runAsUser"] == uid
    (c,) = pod["containers"]
    assert c["workingDir"] == instructions(TRAINER_DOCKERFILE, "WORKDIR")[-1]
    # a read-only root filesystem needs every path the image writes to (ENV *_HOME, *_DIR) on a volume
    writable = [m["mountPath"] for m in c.get("volumeMounts", []) if not m.get("readOnly")]
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(instructions(TRAINER_DOCKERFILE, "ENV"))))
    for var in ("HOME", "KUBETUNE_WORK_DIR", "HF_HOME", "TORCH_EXTENSIONS_DIR"):
        assert any(env[var] == w or env[var].startswith(w.rstrip("/") + "/") for w in writable), \
            f"{var}={env[var]} is not on a writable volume in the operator's pod ({writable})"


def _rendered_trainer_pod(example: str) -> dict:
    """The trainer pod spec from the operator's Job renderer for one of examples/."""
    import importlib

    import yaml

    try:
        render = importlib.import_module("kubetune_operator.render")
    except ModuleNotFoundError:
        pytest.skip("kubetune_operator.render not written yet: cannot compare with the trainer image")
    if not hasattr(render, "render_job"):
        pytest.skip("kubetune_operator.render has no render_job(job, body) -> Job/JobSet dict: align this test "
                    "with the operator's renderer")
    from kubetune_api.finetunejob import parse_job

    body = yaml.safe_load((REPO / "examples" / example).read_text())
    body["metadata"].update(namespace="default", uid="00000000-0000-0000-0000-000000000000", generation=1)
    job = render.render_job(parse_job(body), body)
    if job["kind"] == "JobSet":  # multi-node: the pods of the JobSet's one replicatedJob
        job = job["spec"]["replicatedJobs"][0]["template"]
    return job["spec"]["template"]["spec"]
