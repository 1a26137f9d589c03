"""The reward sandbox: one long-lived worker process that runs user reward code and model-generated programs
away from the trainer's credentials, with CPU, memory, process and wall-clock limits.

    box = Sandbox(SandboxLimits(cpu_seconds=30, wall_seconds=60))
    handle = box.load(path=Path("my_rewards.py"), module="my_rewards", function="score")   # -> signature
    values, metrics = box.call(handle, {"completions": [...], "answer": [...]})
    passed = box.run_programs([{"code": "...", "tests": ["assert f(1) == 2"]}])            # code_execution
    box.close()

What the worker gets (see sandbox_worker.py for how it locks itself down, and docs/rewards.md for what this
does and does not isolate on a real pod):
- an environment rebuilt from an allowlist (PATH, locale, TZ): no AWS_*, HF_TOKEN, KUBETUNE_*, proxy settings;
- a fresh scratch folder as cwd, HOME and TMPDIR, the only place meant to be written;
- RLIMIT_AS (memory), RLIMIT_NPROC (processes), RLIMIT_FSIZE, RLIMIT_NOFILE, no core dumps, and a CPU-time
  limit per call (RLIMIT_CPU); a wall-clock limit per call enforced here by killing its process group;
- the ServiceAccount token folders hidden behind an empty tmpfs where the kernel lets it unshare a mount
  namespace; as root, uid 65534 instead of root.
A trainer that is its pod's only process also marks itself non-dumpable (PR_SET_DUMPABLE 0), so code running
under the same uid cannot read the trainer's /proc/<pid>/environ (its S3 keys) or memory.

Answers come back as JSON, never pickle. A worker that dies (a limit hit: SIGXCPU, SIGKILL) or overruns its wall
clock is killed with everything it started and replaced on the next call; its functions are loaded again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger("kubetune.rewards.sandbox")

WORKER = Path(__file__).with_name("sandbox_worker.py")
# The only variables the worker inherits: enough for Python, subprocesses and text handling. Everything else
# (AWS_*, HF_TOKEN, KUBETUNE_*, *_PROXY, PYTHONPATH, LD_PRELOAD, ...) stays with the trainer.
ENV_ALLOWLIST = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")
# Folders that hold credentials on a Kubernetes node's containers. The trainer pod mounts no ServiceAccount token
# (automountServiceAccountToken: false), but a runtime that adds one, or a web-identity token (IRSA, workload
# identity), puts it here.
SECRET_PATHS = ("/var/run/secrets", "/run/secrets")
_READY_TIMEOUT = 60.0


class SandboxError(Exception):
    """The sandbox could not run a call. `transient`: worth retrying (a limit hit, a timeout, a crash)."""

    transient = True


class SandboxTimeout(SandboxError):
    pass


class SandboxCrashed(SandboxError):
    pass


class RemoteError(SandboxError):
    """The code in the sandbox raised: its type, message and traceback tail, as the worker reported them."""

    def __init__(self, answer: dict):
        self.answer = answer
        self.type = str(answer.get("type", "Exception"))
        self.message = str(answer.get("message", ""))
        self.traceback = str(answer.get("traceback", ""))
        self.transient = bool(answer.get("transient", False))
        super().__init__(f"{self.type}: {self.message}")


@dataclass
class SandboxLimits:
    """Limits of one worker. Defaults suit reward functions that do text processing and light numpy work."""

    cpu_seconds: float = 30.0        # CPU time per call
    wall_seconds: float = 60.0       # wall clock per call (reward calls sit on the training step's critical path)
    memory_bytes: int = 2 << 30      # RLIMIT_AS of the worker (address space: counts mapped libraries too)
    file_bytes: int = 256 << 20      # largest file it may write
    open_files: int = 256
    nproc_extra: int = 32            # processes/threads it may add to what its uid runs already


@dataclass
class ProgramLimits:
    """Limits of one model-generated program (code_execution)."""

    cpu_seconds: float = 5.0
    wall_seconds: float = 10.0       # the whole program: its code, then every test
    test_seconds: float = 3.0        # each test (and the code's top level) separately
    memory_bytes: int = 512 << 20
    nproc: int = 4                   # processes the program may start (a fork bomb stops here)
    # programs run at once: half the CPUs (the trainer waits for them), 2..8
    parallel: int = field(default_factory=lambda: max(2, min(8, (os.cpu_count() or 2) // 2)))


_dumpable_off = False


def protect_trainer_process() -> None:
    """PR_SET_DUMPABLE 0 on this (trainer) process: another process of the same uid - the sandbox in a non-root
    pod - can then not read its /proc/<pid>/environ (the S3 keys), mem or fds. Core dumps go too, which a
    process holding credentials should not write anyway.

    Only when this is the pod's only trainer process: with several (torchrun), NCCL and PyTorch share GPU memory
    between them with pidfd_getfd (cuMem/NVLS handles), which a non-dumpable peer refuses. There the sandbox
    keeps every other limit but can read the trainers' environment through /proc; docs/rewards.md says so."""
    global _dumpable_off
    if _dumpable_off or not sys.platform.startswith("linux"):
        return
    _dumpable_off = True
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    if local > 1:
        log.warning("reward sandbox: %d trainer processes share this pod, so they stay dumpable (NCCL shares GPU "
                    "memory through pidfd_getfd); code in the sandbox can read their environment via /proc", local)
        return
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        log.warning("reward sandbox: started by torchrun, whose agent process holds the same environment and stays "
                    "dumpable; code in the sandbox can read it via /proc")
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE
        log.warning("sandbox: prctl(PR_SET_DUMPABLE, 0) failed: %s", os.strerror(ctypes.get_errno()))


def sandbox_env(scratch: Path) -> dict[str, str]:
    env = {k: os.environ[k] for k in ENV_ALLOWLIST if k in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.update({"HOME": str(scratch), "TMPDIR": str(scratch), "PYTHONDONTWRITEBYTECODE": "1",
                "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    return env


def hidden_paths(extra: tuple[str, ...] = ()) -> list[str]:
    paths = list(SECRET_PATHS) + list(extra)
    token_file = os.environ.get("AWS_WEB_IDENTITY_TOKEN_FILE")
    if token_file:
        paths.append(str(Path(token_file).parent))
    seen, out = set(), []
    for p in paths:
        real = os.path.realpath(p)
        if os.path.exists(real) and real not in seen:
            seen.add(real)
            out.append(real)
    return out


class _Held:
    """What a Sandbox must release: referenced by its finalizer, so it cannot hold the Sandbox itself."""

    def __init__(self) -> None:
        self.proc: Optional[subprocess.Popen] = None
        self.scratch: Optional[Path] = None


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the worker and everything it started
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    for stream in (proc.stdin, proc.stdout):
        try:
            if stream is not None:
                stream.close()
        except OSError:
            pass


def _release(held: _Held) -> None:
    if held.proc is not None:
        _kill_group(held.proc)
        held.proc = None
    if held.scratch is not None:
        shutil.rmtree(held.scratch, ignore_errors=True)
        held.scratch = None


class Sandbox:
    def __init__(self, limits: Optional[SandboxLimits] = None, *, scratch_root: Optional[Path] = None,
                 hide: tuple[str, ...] = ()):
        self.limits = limits or SandboxLimits()
        self._scratch_root = scratch_root
        self._hide = tuple(hide)
        self._held = _Held()
        # (load request, the source as shipped, digest of the copy): replayed in order after a restart, so handles
        # stay valid
        self._loads: list[tuple[dict, Path, str]] = []
        self._lock = threading.Lock()
        self.info: dict = {}
        self.restarts = 0
        self._sources = 0
        self._closed = False
        # Stops the worker and removes the scratch folder when the Sandbox is collected (a finished trainer's
        # rewards) or at interpreter exit, whichever comes first.
        self._finalizer = weakref.finalize(self, _release, self._held)

    @property
    def _proc(self) -> Optional[subprocess.Popen]:
        return self._held.proc

    @_proc.setter
    def _proc(self, proc: Optional[subprocess.Popen]) -> None:
        self._held.proc = proc

    @property
    def _scratch(self) -> Optional[Path]:
        return self._held.scratch

    @_scratch.setter
    def _scratch(self, path: Optional[Path]) -> None:
        self._held.scratch = path

    # ------------------------------------------------------------------ lifecycle
    @property
    def scratch(self) -> Path:
        if self._scratch is None:
            root = self._scratch_root
            if root is not None:
                Path(root).mkdir(parents=True, exist_ok=True)
            self._scratch = Path(tempfile.mkdtemp(prefix="kubetune-sandbox-", dir=root))
        return self._scratch

    def _start(self) -> None:
        protect_trainer_process()
        scratch = self.scratch
        config = {"scratch": str(scratch), "hide_paths": hidden_paths(self._hide),
                  "limits": {"memory_bytes": self.limits.memory_bytes, "file_bytes": self.limits.file_bytes,
                             "open_files": self.limits.open_files, "nproc_extra": self.limits.nproc_extra}}
        # No preexec_fn: the worker limits itself, so this (large, threaded) process is spawned from, not forked.
        self._proc = subprocess.Popen(
            [sys.executable, "-I", str(WORKER), json.dumps(config)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env=sandbox_env(scratch), cwd=str(scratch), start_new_session=True, close_fds=True)
        ready = self._read(_READY_TIMEOUT)
        if not ready.get("ready"):
            raise SandboxCrashed(f"the reward sandbox did not start: {ready}")
        if not self.info:
            log.info("reward sandbox: pid %s, %s, scratch %s, hidden %s%s", ready.get("pid"), ready.get("identity"),
                     scratch, ready.get("hidden") or "nothing",
                     f" ({ready['hide_problem']})" if ready.get("hide_problem") else "")
        self.info = ready
        for req, original, digest in self._loads:
            target = Path(req["path"])
            if _digest(target) != digest:
                # Something in the sandbox (a generated program, the reward itself) changed the copy: the function
                # is loaded again from what the job shipped, not from what the sandbox left behind.
                log.warning("reward sandbox: %s was modified inside the sandbox; copying it again", original)
                _copy_source(original, target)
            answer = self._send(req, _READY_TIMEOUT)
            if not answer.get("ok"):
                raise RemoteError(answer)

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            _kill_group(proc)

    def close(self) -> None:
        with self._lock:
            self._finalizer()
            self._closed = True

    # ------------------------------------------------------------------ protocol
    def _read(self, timeout: float) -> dict:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        fd = proc.stdout.fileno()
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                self._kill()
                self.restarts += 1
                raise SandboxTimeout(f"no answer within the {timeout:g} s wall-clock limit (the sandbox was killed)")
            r, _, _ = select.select([fd], [], [], left)
            if not r:
                continue
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                code = proc.wait()
                self._kill()
                self.restarts += 1
                raise SandboxCrashed(f"the sandbox process died ({_describe_exit(code)})")
            line += chunk
        return json.loads(line)

    def _send(self, req: dict, timeout: float) -> dict:
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write((json.dumps(req, default=_jsonable) + "\n").encode())
            self._proc.stdin.flush()
        except BrokenPipeError:
            code = self._proc.wait()
            self._kill()
            self.restarts += 1
            raise SandboxCrashed(f"the sandbox process died ({_describe_exit(code)})") from None
        return self._read(timeout)

    def request(self, req: dict, timeout: Optional[float] = None) -> dict:
        with self._lock:
            if self._closed:
                raise SandboxCrashed("the sandbox is closed")
            if self._proc is None or self._proc.poll() is not None:
                self._kill()
                self._start()
            answer = self._send(req, self.limits.wall_seconds if timeout is None else timeout)
        if not answer.get("ok"):
            raise RemoteError(answer)
        return answer

    # ------------------------------------------------------------------ operations
    def load(self, path: Path, module: str, function: str) -> tuple[int, dict]:
        """Copy the source into the sandbox and import `module:function` there. Returns (handle, signature)."""
        path = Path(path)
        dest = self.scratch / ".sources" / str(self._sources)
        self._sources += 1
        target = dest / ("src" if path.is_dir() else path.name)
        _copy_source(path, target)
        req = {"op": "load", "path": str(target), "module": module, "function": function,
               "cpu_seconds": self.limits.cpu_seconds}
        digest = _digest(target)
        answer = self.request(req, timeout=max(self.limits.wall_seconds, _READY_TIMEOUT))
        self._loads.append((req, path, digest))
        return int(answer["handle"]), answer.get("signature") or {}

    def call(self, handle: int, kwargs: dict, *, log_metric: bool = False, log_extra: bool = False
             ) -> tuple[Any, list]:
        answer = self.request({"op": "call", "handle": handle, "kwargs": kwargs, "log_metric": log_metric,
                               "log_extra": log_extra, "cpu_seconds": self.limits.cpu_seconds})
        return answer["value"], answer.get("metrics") or []

    def run_programs(self, programs: list[dict], limits: Optional[ProgramLimits] = None) -> list[list[bool]]:
        """Each program ({"code", "tests": [str]}) in a fresh process -> per test, whether it passed."""
        limits = limits or ProgramLimits()
        n = max(1, len(programs))
        # Programs run `parallel` at a time, each bounded by its wall clock: the batch's budget follows.
        budget = limits.wall_seconds * -(-n // max(1, limits.parallel)) + 30.0
        answer = self.request({"op": "run_programs", "programs": programs, "limits": asdict(limits)}, timeout=budget)
        return answer["results"]


def _copy_source(path: Path, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        shutil.copy2(path, target)
    # Readable by the sandbox (which runs as uid 65534 when the trainer is root), writable by nobody else.
    for p in [target.parent, target, *(target.rglob("*") if target.is_dir() else [])]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if p.is_file() and "__pycache__" not in p.parts:
            h.update(str(p.relative_to(path) if path.is_dir() else p.name).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = {"SIGXCPU": "CPU-time limit", "SIGKILL": "killed: memory or wall-clock limit",
                "SIGSEGV": "segmentation fault"}.get(name)
        return f"{name}{f': {hint}' if hint else ''}"
    return f"exit code {code}"


def _jsonable(value: Any) -> Any:
    """Dataset columns and TRL arguments the worker may receive: arrays and tensors become lists; a TrainerState
    becomes its public numbers; anything else its repr."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "global_step"):
        return {k: v for k, v in vars(value).items() if isinstance(v, (int, float, str, bool)) or v is None}
    if isinstance(value, (set, tuple)):
        return list(value)
    return repr(value)
