"""The reward sandbox's worker process: runs user reward code and model-generated programs, isolated from the trainer.

Started by `rewards.sandbox.Sandbox` (never imported by the trainer: it is run by path with `python -I`, so it
uses the standard library only and cannot pick up the trainer's modules or env by accident):

    python -I sandbox_worker.py '<json config>'     # speaks JSON lines on stdin/stdout

It first locks itself down (in this order, because each step needs the privileges the next one drops):
1. hides the configured secret paths (the ServiceAccount token folder, a web-identity token) behind an empty
   read-only tmpfs in a private mount namespace - only possible where the process may unshare (root, or user
   namespaces allowed); otherwise it reports why and the pod's own settings are what protects them;
2. sets resource limits: address space (RLIMIT_AS), processes (RLIMIT_NPROC), file size, open files, no core
   dumps; the CPU-time limit is set per request;
3. when started as root, becomes uid/gid 65534 (nobody) so that RLIMIT_NPROC applies (the kernel exempts root)
   and root-only files are out of reach. If the interpreter itself is only readable by root (a Python under
   /root, as on a developer machine) it keeps CAP_DAC_READ_SEARCH and nothing else, so Python can still load.

Then it serves requests, one JSON object per line; every answer is JSON (never pickle: the trainer must not
unpickle what user code produced):
- {"op": "load", "path", "module", "function"} -> {"ok": true, "handle", "signature": {...}}
- {"op": "call", "handle", "kwargs", "cpu_seconds"} -> {"ok": true, "value": [...], "metrics": [...]}
- {"op": "run_programs", "programs": [{"code", "tests"}], "limits"} -> {"ok": true, "results": [[pass, ...], ...]}
- failures: {"ok": false, "type", "message", "traceback", "transient"}.
User code's own print() goes to stderr (the protocol owns the real stdout).
"""

import ctypes
import ctypes.util
import importlib
import importlib.util
import inspect
import json
import os
import resource
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback

# Exceptions worth retrying: the same call may succeed a moment later (a flaky service, a slow disk, a limit
# hit by an unlucky input). Everything else is a bug in the reward code, and retrying it only wastes a step.
TRANSIENT = (TimeoutError, ConnectionError, OSError, MemoryError)
_TB_LINES = 12

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
PR_SET_KEEPCAPS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, PR_SET_NO_NEW_PRIVS = 8, 47, 2, 38
CAP_DAC_READ_SEARCH = 2
NOBODY = 65534


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def hide_paths(paths):
    """Overmount each existing path with an empty read-only tmpfs (folders) or /dev/null (files) in a private
    mount namespace. Returns (hidden paths, reason when not possible)."""
    paths = [p for p in paths if p and os.path.exists(p)]
    if not paths:
        return [], None
    libc = _libc()
    if libc.unshare(CLONE_NEWNS) != 0:
        return [], f"unshare(CLONE_NEWNS): {os.strerror(ctypes.get_errno())}"
    # Private first, so nothing mounted below can propagate back to the trainer's (or the host's) namespace.
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return [], f"cannot make the sandbox's mounts private: {os.strerror(ctypes.get_errno())}"
    hidden, problems = [], []
    for p in paths:
        if os.path.isdir(p):
            rc = libc.mount(b"tmpfs", p.encode(), b"tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                            b"size=4k,mode=0555")
        else:
            rc = libc.mount(b"/dev/null", p.encode(), None, MS_BIND, None)
        if rc != 0:
            problems.append(f"{p}: {os.strerror(ctypes.get_errno())}")
        else:
            hidden.append(p)
    return hidden, ("cannot hide " + "; ".join(problems)) if problems else None


def _readable_by_others(path):
    """Whether a non-root, non-owner uid can reach `path` (o+x on every folder above it, o+r on it)."""
    path = os.path.realpath(path)
    parts = path.split(os.sep)
    for i in range(1, len(parts)):
        folder = os.sep.join(parts[:i]) or os.sep
        if not os.stat(folder).st_mode & 0o001:
            return False
    return bool(os.stat(path).st_mode & 0o004)


def _keep_read_caps_only(libc):
    # Capability sets: effective = permitted = inheritable = {CAP_DAC_READ_SEARCH}, and ambient so that the
    # programs this worker starts can load the same interpreter. Drops CAP_SYS_ADMIN/CAP_SYS_RESOURCE (which
    # would exempt us from RLIMIT_NPROC), CAP_SYS_PTRACE (reading the trainer's /proc/<pid>/environ), etc.
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    bit = 1 << CAP_DAC_READ_SEARCH
    header = Header(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (Data * 2)(Data(bit, bit, bit), Data(0, 0, 0))
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")
    if libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_DAC_READ_SEARCH, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_CAP_AMBIENT_RAISE")


def drop_root(scratch):
    """As root: become nobody (see the module docstring). Returns a description of what was done."""
    if os.geteuid() != 0:
        return f"uid {os.geteuid()} (not root: kept)"
    libc = _libc()
    need_read = not all(_readable_by_others(p) for p in [sys.executable, *[q for q in sys.path if os.path.exists(q)]])
    os.chown(scratch, NOBODY, NOBODY)
    if need_read:
        libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0)
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)
    if need_read:
        _keep_read_caps_only(libc)
        return f"uid {NOBODY} with CAP_DAC_READ_SEARCH only (the interpreter is not readable by other users)"
    return f"uid {NOBODY}"


def set_limits(limits):
    def lim(which, value):
        if value:
            soft, hard = resource.getrlimit(which)
            value = int(value) if hard == resource.RLIM_INFINITY else min(int(value), hard)
            resource.setrlimit(which, (value, value))

    lim(resource.RLIMIT_AS, limits.get("memory_bytes"))
    lim(resource.RLIMIT_FSIZE, limits.get("file_bytes"))
    lim(resource.RLIMIT_NOFILE, limits.get("open_files"))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def uid_tasks(uid):
    """Processes + threads of `uid` now: RLIMIT_NPROC counts all of them, the trainer's threads included when
    the sandbox shares its uid (a non-root pod), so a limit must be set relative to this."""
    n = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                status = f.read()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields.get("Uid", "-1 ").split()[0]) == uid:
            n += int(fields.get("Threads", "1").strip() or 1)
    return n


def set_nproc(extra):
    """Soft RLIMIT_NPROC = this uid's tasks now + `extra`. Re-set before every request because the trainer (same
    uid in a non-root pod) starts threads and data-loader processes later; the hard limit stays, so deliberate
    code could raise its own soft limit: the wall-clock kill of the process group is the backstop there."""
    if extra:
        soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
        n = uid_tasks(os.getuid()) + int(extra)
        resource.setrlimit(resource.RLIMIT_NPROC, (n if hard == resource.RLIM_INFINITY else min(n, hard), hard))


# ------------------------------------------------------------------------------------------------ requests
def _error(exc, transient=None):
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    tail = "".join(tb).strip().splitlines()[-_TB_LINES:]
    return {"ok": False, "type": type(exc).__name__, "message": str(exc)[:2000], "traceback": "\n".join(tail),
            "transient": isinstance(exc, TRANSIENT) if transient is None else transient}


class Worker:
    def __init__(self, scratch, out):
        self.scratch = scratch
        self.out = out
        self.funcs = {}

    def load(self, req):
        path, module_name, func_name = req["path"], req["module"], req["function"]
        _cpu_limit(req.get("cpu_seconds"))  # the module's top level is user code too
        try:
            if os.path.isfile(path):
                unique = f"kubetune_sandboxed_{module_name}_{len(self.funcs)}"
                spec = importlib.util.spec_from_file_location(unique, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[unique] = module
                spec.loader.exec_module(module)
            else:
                if path not in sys.path:
                    sys.path.insert(0, path)
                # The same module name imported earlier from another folder (a second custom reward of the job)
                # would shadow this one through sys.modules: drop it so this folder's wins.
                top = module_name.split(".", 1)[0]
                for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
                    origin = os.path.realpath(getattr(sys.modules[name], "__file__", None) or "")
                    if not origin.startswith(os.path.realpath(path) + os.sep):
                        del sys.modules[name]
                importlib.invalidate_caches()
                module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            missing = bool(exc.name) and module_name.startswith(exc.name) and not os.path.isfile(path)
            return {**_error(exc, transient=False), "kind": "no_module" if missing else "import",
                    "message": _describe(exc)}
        except BaseException as exc:  # noqa: BLE001 - user code: every failure is a config problem to report
            return {**_error(exc, transient=False), "kind": "import", "message": _describe(exc)}
        func = getattr(module, func_name, None)
        if func is None:
            public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            return {"ok": False, "kind": "no_function", "public": public, "type": "AttributeError", "message": "",
                    "transient": False}
        if not callable(func):
            return {"ok": False, "kind": "not_callable", "type": type(func).__name__, "message": "",
                    "transient": False}
        if inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(getattr(func, "__call__", None)):
            return {"ok": False, "kind": "async", "type": "TypeError", "message": "", "transient": False}
        handle = len(self.funcs)
        self.funcs[handle] = func
        return {"ok": True, "handle": handle, "signature": _signature(func)}

    def call(self, req):
        func = self.funcs[req["handle"]]
        kwargs = dict(req["kwargs"])
        metrics = []
        if req.get("log_metric"):
            kwargs["log_metric"] = lambda name, value: metrics.append(["metric", str(name), float(value)])
        if req.get("log_extra"):
            kwargs["log_extra"] = lambda column, values: metrics.append(["extra", str(column), list(values)])
        _cpu_limit(req.get("cpu_seconds"))
        out = func(**kwargs)
        try:
            value = list(out)
        except TypeError:
            value = out  # the trainer reports the wrong shape with the function's name
        json.dumps(value)  # not JSON-able (e.g. a tensor): a TypeError the trainer reports as such
        return {"ok": True, "value": value, "metrics": metrics}

    def run_programs(self, req):
        limits = dict(req["limits"])
        parallel = max(1, int(limits.get("parallel", 1)))
        # Each program may start at most `nproc` processes of its own (it is one itself), on top of what this uid
        # runs already (the trainer's threads in a non-root pod): a fork bomb stops there.
        if limits.get("nproc"):
            limits["nproc_abs"] = uid_tasks(os.getuid()) + parallel * int(limits["nproc"])
            set_nproc(parallel * int(limits["nproc"]) + 8)
        results = [None] * len(req["programs"])
        pending = list(enumerate(req["programs"]))
        running = []
        while pending or running:
            while pending and len(running) < parallel:
                i, prog = pending.pop(0)
                running.append((i, len(prog["tests"]), _start_program(prog, limits, self.scratch)))
            still = []
            for i, n, run in running:
                done = _poll_program(run, n, limits)
                if done is None:
                    still.append((i, n, run))
                else:
                    results[i] = done
            running = still
            if running:
                time.sleep(0.01)
        return {"ok": True, "results": results}


def _describe(exc):
    if isinstance(exc, SyntaxError):
        return f"SyntaxError: {exc.msg} ({os.path.basename(exc.filename or '?')}, line {exc.lineno})"
    return f"{type(exc).__name__}: {exc}"[:500]


def _signature(func):
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):  # builtins without a signature: pass everything
        return {"var_kw": True, "named": [], "required": []}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {"var_kw": any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()),
            "named": [n for n, p in sig.parameters.items() if p.kind in kinds],
            "required": [n for n, p in sig.parameters.items() if p.kind in kinds and p.default is p.empty]}


def _cpu_limit(seconds):
    if not seconds:
        return
    used = resource.getrusage(resource.RUSAGE_SELF)
    total = used.ru_utime + used.ru_stime
    limit = int(total + float(seconds)) + 1
    # Lowering the hard limit each call keeps user code from raising its own soft limit past this call's share.
    resource.setrlimit(resource.RLIMIT_CPU, (limit, limit + 1))


# The runner that executes one model-generated program and its tests, in a fresh process. It prints
# `<nonce> <json pass list>` on its last line: code that exits early (sys.exit(0), os._exit(0)) or prints fake
# results without knowing the nonce scores 0 instead of passing every test.
_RUNNER = r"""
import json, os, signal, sys
nonce = sys.stdin.readline().strip()
payload = json.loads(sys.stdin.readline())
test_timeout = payload["test_timeout"]
out = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
def _alarm(signum, frame):
    raise TimeoutError("test timed out")
signal.signal(signal.SIGALRM, _alarm)
ns = {"__name__": "__main__"}
passed = []
try:
    signal.setitimer(signal.ITIMER_REAL, test_timeout)
    exec(compile(payload["code"], "<completion>", "exec"), ns)
    signal.setitimer(signal.ITIMER_REAL, 0)
    ok_code = True
except BaseException:
    signal.setitimer(signal.ITIMER_REAL, 0)
    ok_code = False
for test in payload["tests"]:
    if not ok_code:
        passed.append(False)
        continue
    try:
        signal.setitimer(signal.ITIMER_REAL, test_timeout)
        exec(compile(test, "<test>", "exec"), dict(ns))
        signal.setitimer(signal.ITIMER_REAL, 0)
        passed.append(True)
    except BaseException:
        signal.setitimer(signal.ITIMER_REAL, 0)
        passed.append(False)
out.write(nonce + " " + json.dumps(passed) + "\n")
out.flush()
os._exit(0)
"""


def _start_program(prog, limits, scratch):
    nonce = secrets.token_hex(16)
    workdir = tempfile.mkdtemp(prefix="prog-", dir=scratch)

    def preexec():
        resource.setrlimit(resource.RLIMIT_CPU, (int(limits["cpu_seconds"]), int(limits["cpu_seconds"]) + 1))
        if limits.get("memory_bytes"):
            resource.setrlimit(resource.RLIMIT_AS, (int(limits["memory_bytes"]),) * 2)
        if limits.get("nproc_abs"):
            resource.setrlimit(resource.RLIMIT_NPROC, (int(limits["nproc_abs"]),) * 2)

    proc = subprocess.Popen([sys.executable, "-I", "-c", _RUNNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, cwd=workdir, env={**os.environ, "TMPDIR": workdir,
                                                                         "HOME": workdir},
                            start_new_session=True, preexec_fn=preexec)
    payload = json.dumps({"code": prog["code"], "tests": prog["tests"],
                          "test_timeout": float(limits["test_seconds"])})
    try:
        proc.stdin.write((nonce + "\n" + payload + "\n").encode())
        proc.stdin.close()
    except OSError:
        pass  # the program died already (a limit): it scores 0
    os.set_blocking(proc.stdout.fileno(), False)
    return {"proc": proc, "nonce": nonce, "deadline": time.monotonic() + float(limits["wall_seconds"]),
            "buf": b"", "workdir": workdir}


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _poll_program(run, n_tests, limits):
    proc = run["proc"]
    r, _, _ = select.select([proc.stdout], [], [], 0)
    if r:
        try:
            chunk = proc.stdout.read(65536) or b""
        except (BlockingIOError, OSError):
            chunk = b""
        run["buf"] = (run["buf"] + chunk)[-65536:]
    finished = proc.poll() is not None
    if not finished and time.monotonic() < run["deadline"]:
        return None
    # Whether it finished or ran out of time: anything it forked is killed with its process group.
    _kill_group(proc)
    proc.wait()
    try:
        run["buf"] += proc.stdout.read() or b""
    except (BlockingIOError, OSError, ValueError):
        pass
    proc.stdout.close()
    _rmtree(run["workdir"])
    for line in reversed(run["buf"].decode("utf-8", "replace").splitlines()):
        if line.startswith(run["nonce"] + " "):
            try:
                passed = json.loads(line.split(" ", 1)[1])
            except ValueError:
                break
            if isinstance(passed, list) and len(passed) == n_tests:
                return [bool(p) for p in passed]
            break
    return [False] * n_tests


def _rmtree(path):
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def main():
    config = json.loads(sys.argv[1])
    # The protocol owns the real stdout; user code's print() goes to stderr.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    scratch = config["scratch"]
    os.chdir(scratch)
    hidden, hide_problem = hide_paths(config.get("hide_paths") or [])
    set_limits(config.get("limits") or {})
    identity = drop_root(scratch) if config.get("drop_root", True) else f"uid {os.geteuid()}"
    _libc().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    nproc_extra = (config.get("limits") or {}).get("nproc_extra")
    set_nproc(nproc_extra)
    # Requests come on a private copy of stdin; user code reading sys.stdin gets nothing.
    requests = os.fdopen(os.dup(0), "r")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    sys.stdin = open(os.devnull)
    worker = Worker(scratch, out)
    out.write(json.dumps({"ok": True, "ready": True, "identity": identity, "hidden": hidden,
                          "hide_problem": hide_problem, "pid": os.getpid()}) + "\n")
    for line in requests:
        try:
            req = json.loads(line)
            set_nproc(nproc_extra)
            answer = getattr(worker, req["op"])(req)
        except BaseException as exc:  # noqa: BLE001 - user code: every failure is reported, the worker lives on
            if isinstance(exc, SystemExit):
                exc = RuntimeError(f"reward code called sys.exit({exc.code!r})")
            answer = _error(exc)
        try:
            text = json.dumps(answer)
        except (TypeError, ValueError) as exc:
            text = json.dumps(_error(exc, transient=False))
        out.write(text + "\n")


if __name__ == "__main__":
    main()
