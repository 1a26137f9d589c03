"""Load a FineTuneJob manifest into the typed API model, and the run-level settings the pod's env carries.

The operator mounts the resolved FineTuneJob at /etc/kubetune/job.yaml; `kubetune run job.yaml` reads a file a
person wrote. Either way a mistake must come back as a `ConfigError` that names the manifest field in the
spelling the person typed (camelCase, e.g. `spec.training.learningRate`), not as a pydantic traceback.

A local manifest never went through the API server, so it is parsed the way the API server would: duplicate
keys, alias bombs and recursive aliases are refused with the line named, apiVersion and kind are checked.
`preflight` checks what only the machine that runs the job can know (output folder writable, a process group
for DeepSpeed, GPUs for nccl) before anything is downloaded.

Import-light on purpose (no torch): `kubetune --help` and the CLI's argument handling go through here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from kubetune_api.constants import API_VERSION, KIND
from kubetune_api.finetunejob import FineTuneJob, parse_job, validate_spec

from .errors import ConfigError


@dataclass
class RunSettings:
    """Where this run works and reports; everything here comes from the pod's env (or the CLI), never the spec."""

    work_dir: Path = field(default_factory=lambda: Path("kubetune-work"))
    metrics_host: str | None = None
    metrics_port: int | None = None
    termination_log: Path | None = None
    job_name: str | None = None
    namespace: str | None = None
    run_id: str | None = None  # KUBETUNE_RUN_ID: the operator sets the FineTuneJob's uid, the CLI a fresh id

    cache_root: Path | None = None  # KUBETUNE_CACHE_DIR: a volume that outlives the pod (spec.resources.cacheClaim)

    @property
    def cache_dir(self) -> Path:
        """Downloads (s3:// models and data) land here: KUBETUNE_CACHE_DIR when the operator mounted a cache
        volume (a retried pod then reuses them), else inside the work dir (the pod's emptyDir)."""
        return self.cache_root or self.work_dir / "cache"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "RunSettings":
        env = os.environ if env is None else env
        port = env.get("KUBETUNE_METRICS_PORT")
        try:
            port_num = int(port) if port not in (None, "") else None
        except ValueError:
            raise ConfigError(f"not a port number: {port!r}", field="env KUBETUNE_METRICS_PORT") from None
        term = env.get("KUBETUNE_TERMINATION_LOG")
        values: dict[str, Any] = {
            "work_dir": Path(env.get("KUBETUNE_WORK_DIR") or "kubetune-work"),
            "metrics_host": env.get("KUBETUNE_METRICS_HOST") or None,
            "metrics_port": port_num,
            "termination_log": Path(term) if term else None,
            "job_name": env.get("KUBETUNE_JOB_NAME") or None,
            "namespace": env.get("KUBETUNE_NAMESPACE") or None,
            "run_id": env.get("KUBETUNE_RUN_ID") or None,
            "cache_root": Path(env["KUBETUNE_CACHE_DIR"]) if env.get("KUBETUNE_CACHE_DIR") else None,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["work_dir"] = Path(values["work_dir"]).resolve()
        return cls(**values)


def _loc(loc: tuple) -> str:
    """('spec', 'training', 'learningRate') -> spec.training.learningRate; list indexes as [i]."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(manifest)"


def _field_error(problems: list[tuple[str, str]]) -> ConfigError:
    """One ConfigError for several (field, problem) pairs: `field` is the first one, and str(error) reads
    "spec.a.b: problem; spec.c: other problem"."""
    (first, msg), rest = problems[0], problems[1:]
    return ConfigError("; ".join([msg] + [f"{f}: {m}" for f, m in rest]), field=first)


def _pydantic_problems(exc) -> list[tuple[str, str]]:
    problems = []
    for err in exc.errors(include_url=False):
        path = _loc(tuple(err.get("loc", ())))
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field (check the spelling; fields are camelCase)"
        elif err.get("type") != "missing" and "input" in err:
            msg += f" (got {repr(err['input'])[:80]})"
        problems.append((path, msg))
    return problems or [("(manifest)", str(exc))]


def job_from_dict(obj: Any, source: str = "manifest") -> FineTuneJob:
    """Parse one manifest dict; pydantic errors become ConfigError naming the camelCase field path."""
    from pydantic import ValidationError

    if not isinstance(obj, dict):
        raise ConfigError(f"{source}: expected a FineTuneJob mapping, got {type(obj).__name__}")
    kind = obj.get("kind")
    if kind not in (None, KIND):
        raise ConfigError(f"{source}: kind is {kind!r}, expected {KIND}", field="kind")
    api_version = obj.get("apiVersion")
    if kind is not None and api_version != API_VERSION:
        # the API server would answer "no matches for kind FineTuneJob in version ..."
        raise ConfigError(f"{source}: apiVersion is {api_version!r}, expected {API_VERSION}", field="apiVersion")
    if "spec" not in obj:
        raise ConfigError(f"{source}: a FineTuneJob needs a spec", field="spec")
    try:
        return parse_job(obj)
    except ValidationError as exc:
        raise _field_error(_pydantic_problems(exc)) from None


# At most this many nodes after expanding aliases: a FineTuneJob has a few hundred; a "billion laughs" document
# (a few lines of nested aliases) expands to hundreds of millions and would exhaust memory.
MAX_EXPANDED_NODES = 100_000
MAX_MANIFEST_BYTES = 3 * 1024 * 1024  # the API server's request size limit


class _YamlProblem(Exception):
    def __init__(self, node, message: str):
        super().__init__(message)
        self.line = node.start_mark.line + 1
        self.message = message


def _strict_loader():
    """A yaml SafeLoader that refuses what the API server refuses or would choke on: duplicate mapping keys
    (YAML says keys are unique; PyYAML silently keeps the last one) and documents whose aliases expand past
    MAX_EXPANDED_NODES or refer to themselves."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def compose_document(self):
            node = super().compose_document()
            _check_expansion(node)
            return node

        def construct_mapping(self, node, deep=False):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # PyYAML reports unhashable keys itself
                if key in seen:
                    raise _YamlProblem(key_node, f"duplicate key {key!r} (first at line {seen[key]}); the API "
                                                 "server refuses duplicate fields")
                seen[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep=deep)

    return StrictLoader


def _check_expansion(root) -> None:
    import yaml

    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise _YamlProblem(node, "a YAML alias refers to the node that contains it (recursive alias)")
        active.add(key)
        if isinstance(node, yaml.MappingNode):
            n = 1 + sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            n = 1 + sum(size(v) for v in node.value)
        else:
            n = 1
        active.discard(key)
        if n > MAX_EXPANDED_NODES:
            raise _YamlProblem(node, f"YAML aliases expand this document to more than {MAX_EXPANDED_NODES} nodes "
                                     "(an alias bomb?); write the values out")
        sizes[key] = n
        return n

    if root is not None:
        size(root)


def parse_yaml(text: str, source: str = "manifest") -> list:
    """Every document of a YAML (or JSON) text, parsed strictly (see _strict_loader)."""
    import yaml

    if len(text.encode()) > MAX_MANIFEST_BYTES:
        raise ConfigError(f"{source} is {len(text.encode())} bytes; the API server accepts at most "
                          f"{MAX_MANIFEST_BYTES}", field=source)
    try:
        return [d for d in yaml.load_all(text, Loader=_strict_loader()) if d is not None]  # noqa: S506 - safe
    except _YamlProblem as exc:
        raise ConfigError(exc.message, field=f"{source} line {exc.line}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        if mark is None:
            raise ConfigError(f"not valid YAML: {problem}", field=source) from None
        raise ConfigError(f"not valid YAML: {problem}", field=f"{source} line {mark.line + 1}") from None


def load_job_text(text: str, source: str = "manifest") -> FineTuneJob:
    """A YAML (or JSON) string, possibly several documents: the FineTuneJob among them is used."""
    docs = parse_yaml(text, source)
    jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == KIND]
    if not jobs:
        # A bare spec-only mapping (no kind) is accepted too: handy for hand-written local files.
        jobs = [d for d in docs if isinstance(d, dict) and "kind" not in d and "spec" in d]
    if not jobs:
        kinds = [d.get("kind") for d in docs if isinstance(d, dict)]
        raise ConfigError(f"{source} holds no {KIND} (found kinds: {kinds or 'none'})")
    if len(jobs) > 1:
        raise ConfigError(f"{source} holds {len(jobs)} {KIND} documents; give the trainer exactly one")
    return job_from_dict(jobs[0], source)


def load_job(path: str | Path) -> FineTuneJob:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the job manifest {p}: {exc.strerror or exc}") from None
    return load_job_text(text, str(p))


def apply_settings(job: FineTuneJob, settings: RunSettings) -> FineTuneJob:
    """The pod's env names the job authoritatively (the operator sets it); the manifest's metadata is the
    fallback for local runs."""
    meta = job.metadata.model_copy(update={
        k: v for k, v in (("name", settings.job_name), ("namespace", settings.namespace)) if v
    })
    return job.model_copy(update={"metadata": meta})


def validate_job(job: FineTuneJob) -> None:
    """The cross-field checks CEL cannot express (kubetune_api.finetunejob.validate_spec), as one ConfigError.

    A manifest run locally never went through the apiserver, so its CEL rules are repeated here in the form
    the trainer can check: the stage/format pairing is the one that matters most at run time."""
    problems = validate_spec(job.spec)
    if job.spec.dataset.eval and job.spec.dataset.eval_fraction is not None:
        problems.append("spec.dataset.evalFraction: set either dataset.eval or dataset.evalFraction, not both")
    if problems:
        pairs = [tuple(p.split(": ", 1)) if ": " in p else ("spec", p) for p in problems]
        raise _field_error(pairs)


# ------------------------------------------------------------------------------------------------ preflight
def output_dir(uri: str) -> Path | None:
    """The local folder an output URI writes to (file:// and, in a pod, pvc:// under KUBETUNE_PVC_ROOT)."""
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    if uri.startswith("pvc://") and os.environ.get("KUBETUNE_PVC_ROOT"):
        return Path(os.environ["KUBETUNE_PVC_ROOT"]) / uri[len("pvc://"):]
    return None


def check_writable(folder: Path, field: str) -> None:
    """Create `folder` and write a probe file in it; ConfigError naming `field` if either fails."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".kubetune-write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"cannot write to {folder}: {exc.strerror or exc}", field=field) from None


def local_output(arg: str) -> Path:
    """`kubetune run --output X`: a folder, or a file:///abs/dir URI (the spec.output.uri spelling)."""
    if arg.startswith("file://"):
        arg = arg[len("file://"):]
    elif "://" in arg:
        raise ConfigError(f"--output takes a local folder or file:///abs/dir, got {arg!r} (set spec.output.uri "
                          "in the manifest for s3:// or pvc://)", field="--output")
    return Path(arg).expanduser().resolve()


def preflight(job: FineTuneJob, settings: RunSettings) -> None:
    """What only this machine can tell, checked before anything is downloaded: the output folder can be
    written, DeepSpeed has a process group to join (torchrun), nccl has GPUs."""
    spec = job.spec
    out = output_dir(spec.output.uri)
    if out is not None:
        check_writable(out, "spec.output.uri")
    d = spec.distributed
    launched = "LOCAL_RANK" in os.environ  # torchrun (and the operator's launcher) set it for every worker
    if d is not None and d.deepspeed is not None and not launched:
        raise ConfigError("DeepSpeed needs a process group: run the trainer under torchrun (`torchrun "
                          "--nproc-per-node 1 -m kubetune_trainer --config job.yaml`) or remove "
                          "spec.distributed.deepspeed for a plain local run", field="spec.distributed.deepspeed")
    if d is not None and d.backend == "nccl":
        from . import distributed

        if not distributed.has_cuda():
            raise ConfigError("nccl needs NVIDIA GPUs and this machine has none: use backend gloo (or auto)",
                              field="spec.distributed.backend")
