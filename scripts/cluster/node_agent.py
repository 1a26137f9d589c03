#!/usr/bin/env python3
"""A "process kubelet" for the local kubetune test cluster.

KWOK only pretends to run pods. The end-to-end tests also need pods that really run (the trainer), and the
test machines have no container runtime, so this agent registers the Node `local-runner` and runs each pod
bound to it as a local process group: init containers in order, then the first container's command+args,
with the env, volumes and status reporting a kubelet would do. The container image is ignored.

A local process cannot see the container filesystem, so each volume is materialized in a per-pod sandbox
($KUBETUNE_CLUSTER_DIR/pods/<ns>_<pod>/) and every occurrence of a volumeMount's mountPath (and of the
terminationMessagePath) in what the pod spec supplies (command, args, workingDir, env `value`s, Secret and
ConfigMap values) is rewritten to the sandbox path, before $(VAR) expansion. Values that come from this host
(PATH and the other passthrough variables, HOME, TMPDIR) are host paths and are never rewritten: a checkout
under /tmp must keep its virtualenv on PATH although the trainer pod mounts a volume at /tmp.
HOME and TMPDIR point into the sandbox. In the same places, the DNS name a pod gets from spec.hostname +
spec.subdomain (JobSet gangs, Indexed Jobs with a headless Service: `<hostname>.<subdomain>[.<ns>[.svc[.cluster.local]]]`)
is replaced with that pod's IP, since nothing on this host resolves those names (see PodRun.rewrite_names). Each pod gets its own loopback IP (127.0.1.N, or KUBETUNE_POD_IP_PREFIX.N) as podIP, so several
pods can bind the same port. Output goes to <sandbox>/container.log (`kubectl logs` cannot work).

up.sh starts it with the node's own credentials (user system:node:local-runner, group system:nodes), so the
Node authorizer applies as to a real kubelet. Env: KUBECONFIG, KUBETUNE_CLUSTER_DIR, KUBETUNE_NODE_NAME,
KUBETUNE_LOCAL_RUNNER_{CPU,MEMORY,PODS}, KUBETUNE_AGENT_PASSTHROUGH_ENV (extra host env vars for pods, a
comma-separated list). Executables are looked up on the agent's PATH (up.sh puts the venv first).
"""
import base64
import json
import logging
import os
import re
import shutil
import itertools
import signal
import subprocess
import threading
import time
from datetime import datetime, timezone

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

NODE = os.environ.get("KUBETUNE_NODE_NAME", "local-runner")
# Pods get IPs <prefix>.2 .. <prefix>.254. A second local cluster on the same machine uses another prefix
# (common.sh: KUBETUNE_POD_IP_PREFIX) so that both clusters' trainer pods can bind the metrics port.
POD_IP_PREFIX = os.environ.get("KUBETUNE_POD_IP_PREFIX", "127.0.1")
PODS_DIR = os.path.join(os.environ.get("KUBETUNE_CLUSTER_DIR", "/tmp/kubetune-cluster"), "pods")
# How long a pod status patch is retried while the API server is unreachable (a kubelet retries indefinitely).
STATUS_PATCH_PATIENCE = float(os.environ.get("KUBETUNE_STATUS_PATCH_PATIENCE", "300"))
RESOURCES = {"cpu": os.environ.get("KUBETUNE_LOCAL_RUNNER_CPU", "2"),
             "memory": os.environ.get("KUBETUNE_LOCAL_RUNNER_MEMORY", "24Gi"),
             "pods": os.environ.get("KUBETUNE_LOCAL_RUNNER_PODS", "20"), "ephemeral-storage": "100Gi"}
LEASE_SECONDS, RENEW_EVERY = 40, 10  # the node lifecycle controller gives up on a node after ~50 s
# A kubelet hands containers only the image's env plus the spec's; the host's PATH etc. is our "image".
PASSTHROUGH = ["PATH", "LANG", "LC_ALL", "TZ", "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
               "TRANSFORMERS_OFFLINE", "TORCH_HOME"] + \
    [v for v in os.environ.get("KUBETUNE_AGENT_PASSTHROUGH_ENV", "").split(",") if v]
# The shell wrapper leads the pod's process group and records the exit code, so that an agent restarted
# while the pod runs can still report it. `trap : TERM` keeps it alive until the command has exited.
WRAPPER = 'trap : TERM; f=$1; shift; "$@"; c=$?; echo $c > "$f"; exit $c'

log = logging.getLogger("node-agent")


def now(ts=None):
    return datetime.fromtimestamp(ts or time.time(), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def call(fn, *args, **kwargs):
    """Calls a client method, returns the JSON body as a dict (camelCase, as `kubectl -o json` shows it)."""
    return json.loads(fn(*args, _preload_content=False, **kwargs).data or b"null")


def alive(pid, group=False):
    """Is process pid (group=True: any process of group pid) running? Zombies do not count: a pod whose
    parent agent died is re-parented to PID 1, which on these machines reaps only now and then."""
    for p in [int(d) for d in os.listdir("/proc") if d.isdigit()] if group else [pid]:
        try:
            with open(f"/proc/{p}/stat") as f:
                state, _ppid, pgrp = f.read().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if state != "Z" and (not group or int(pgrp) == pid):
            return True
    return False


def signal_group(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def read_text(path, limit=4096):
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode(errors="replace")
    except OSError:
        return ""


def read_int(path):
    try:
        return int(read_text(path).strip())
    except ValueError:
        return None


def tail(path, limit=2048, lines=80):
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - limit))
            return b"\n".join(f.read().splitlines()[-lines:]).decode(errors="replace")
    except OSError:
        return ""


def expand(text, env):
    """Kubernetes $(VAR) expansion: defined vars are substituted, $$ escapes, other refs stay verbatim."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$"); i += 2
        elif text.startswith("$(", i) and ")" in text[i + 2:]:
            j = text.index(")", i + 2)
            out.append(env.get(text[i + 2:j], text[i:j + 1])); i = j + 1
        else:
            out.append(text[i]); i += 1
    return "".join(out)


class ConfigError(Exception):
    """A referenced Secret/ConfigMap/key is missing: the pod waits (CreateContainerConfigError), as in k8s."""


class PodRun:
    """One pod on this node: sandbox, process group, status, termination. run() has a thread of its own."""

    def __init__(self, agent, pod):
        self.agent, self.pod = agent, pod
        md = pod["metadata"]
        self.ns, self.name, self.uid = md["namespace"], md["name"], md["uid"]
        self.key = f"{self.ns}/{self.name}"
        self.sandbox = os.path.join(PODS_DIR, f"{self.ns}_{self.name}")
        self.deleting = threading.Event()   # deletionTimestamp seen, or the object is gone
        self.vanished = False               # object gone: nothing left to report or delete
        self.finished = self.finalized = False
        self.ip = self.pgid = None
        self.start_time = (pod.get("status") or {}).get("startTime") or now()
        self.started_at = self.start_time
        self.restarts = 0
        self.init_statuses = []             # reported with every later status patch
        self.mounts = {}                    # container path -> local path, for the container being prepared
        self.term_file = os.path.join(self.sandbox, "termination-log")
        # a pod with hostname + subdomain has a DNS name under a headless Service (JobSet, Indexed Jobs)
        self.hostname, self.subdomain = pod["spec"].get("hostname"), pod["spec"].get("subdomain")
        self.dns_key = (self.ns, self.subdomain, self.hostname) if self.hostname and self.subdomain else None

    # ------------------------------------------------------------------ API
    def patch_status(self, status):
        if self.vanished:
            return
        # A kubelet keeps retrying its status until the API server takes it: a pod whose process ended while the
        # API server was down must still end Succeeded/Failed once it is back (not stay Running forever).
        deadline, delay, warned = time.monotonic() + STATUS_PATCH_PATIENCE, 0.5, False
        while True:
            try:
                call(self.agent.core.patch_namespaced_pod_status, self.name, self.ns, {"status": status})
                return
            except ApiException as e:
                if e.status == 404:
                    self.vanished = True
                    return
                why = e.reason
            except Exception as e:  # noqa: BLE001 - connection refused/reset while the API server is down
                why = type(e).__name__
            if time.monotonic() > deadline:
                log.warning("%s: status patch failed, giving up: %s", self.key, why)
                return
            if not warned:
                log.warning("%s: status patch failed (%s); retrying", self.key, why)
                warned = True
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    def get_data(self, kind, name, optional):
        """A ConfigMap's or Secret's data as {key: bytes}; None if it is optional and missing."""
        try:
            if kind == "secret":
                obj = call(self.agent.core.read_namespaced_secret, name, self.ns)
                return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
            obj = call(self.agent.core.read_namespaced_config_map, name, self.ns)
            data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
            return data | {k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()}
        except ApiException as e:
            # 403 as well: the Node authorizer learns of a new pod's references a moment after the pod
            if e.status not in (403, 404):
                raise
            if optional:
                return None
            raise ConfigError(f"{kind} {name!r} not found") from e

    def field(self, path):
        """A downward-API fieldRef value."""
        md = self.pod["metadata"]
        m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if m:
            return (md.get(m.group(1)) or {}).get(m.group(2), "")
        return {"metadata.name": self.name, "metadata.namespace": self.ns, "metadata.uid": self.uid,
                "spec.nodeName": NODE, "spec.serviceAccountName": self.pod["spec"].get("serviceAccountName", ""),
                "status.podIP": self.ip, "status.podIPs": self.ip, "status.hostIP": "127.0.0.1",
                "status.hostIPs": "127.0.0.1"}.get(path, "")

    def sa_token(self, src):
        """A bound ServiceAccount token from the TokenRequest API, as a kubelet projects it."""
        sa = self.pod["spec"].get("serviceAccountName") or "default"
        body = {"spec": {"audiences": [src["audience"]] if src.get("audience") else None,
                         "expirationSeconds": src.get("expirationSeconds", 3600),
                         "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.name, "uid": self.uid}}}
        try:
            return call(self.agent.core.create_namespaced_service_account_token, sa, self.ns, body)["status"]["token"].encode()
        except ApiException as e:
            raise ConfigError(f"token for serviceaccount {sa!r}: {e.reason}") from e

    # ------------------------------------------------------------------ sandbox
    def materialize_volumes(self):
        """Writes configMap/secret/projected/downwardAPI volumes, creates emptyDirs; returns {name: path}."""
        paths = {}
        for vol in self.pod["spec"].get("volumes") or []:
            name, d = vol["name"], os.path.join(self.sandbox, "volumes", vol["name"])
            if "hostPath" in vol:                   # this host is the node: use the path itself
                paths[name] = vol["hostPath"]["path"]
                if (vol["hostPath"].get("type") or "").endswith("OrCreate"):
                    os.makedirs(paths[name], exist_ok=True)
                continue
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
            paths[name], files = d, {}
            sources = (vol["projected"].get("sources") or []) if "projected" in vol else [vol]
            for src in sources:
                for kind in ("configMap", "secret"):
                    if kind in src:
                        s = src[kind]
                        data = self.get_data(kind.lower(), s.get("name") or s.get("secretName"), s.get("optional", False))
                        data = data or {}
                        items = s.get("items")
                        files.update({i["path"]: data[i["key"]] for i in items if i["key"] in data} if items else data)
                if "serviceAccountToken" in src:
                    files[src["serviceAccountToken"]["path"]] = self.sa_token(src["serviceAccountToken"])
                if "downwardAPI" in src:
                    files.update({i["path"]: str(self.field(i["fieldRef"]["fieldPath"])).encode()
                                  for i in src["downwardAPI"].get("items") or [] if "fieldRef" in i})
            if not files and not {"emptyDir", "configMap", "secret", "projected", "downwardAPI"} & set(vol):
                log.warning("%s: volume %s: unsupported type, using an empty dir", self.key, name)
            for rel, content in files.items():
                p = os.path.join(d, rel)
                os.makedirs(os.path.dirname(p), exist_ok=True)
                with open(p, "wb") as f:
                    f.write(content)
        return paths

    def rewrite(self, text):
        """Replaces pod DNS names with pod IPs (rewrite_names), then container paths (mountPaths,
        terminationMessagePath) with their sandbox paths.

        One pass with an alternation (longest path first): replacing path after path would rewrite the
        result of an earlier replacement again (/etc/kubetune -> /tmp/.../config, then /tmp -> sandbox)."""
        text = self.rewrite_names(text)
        if not self.mounts:
            return text
        paths = sorted(self.mounts, key=len, reverse=True)
        pattern = r"(?<![\w.\-/])(" + "|".join(re.escape(p) for p in paths) + r")(?=$|/|[^\w.\-])"
        return re.sub(pattern, lambda m: self.mounts[m.group(1)], text)

    def rewrite_names(self, text):
        """Replaces the DNS name of a pod in this namespace, `<hostname>.<subdomain>` with an optional
        `.<namespace>`, `.<namespace>.svc`, `.<namespace>.svc.cluster.local` (what a headless Service gives a pod
        with spec.hostname/subdomain, e.g. JobSet's `<jobset>-<job>-<i>-<j>.<jobset>`), with that pod's IP.

        No resolver on this host knows these names (no cluster DNS, and /etc/hosts is shared), while torch's
        c10d, gloo and plain sockets call getaddrinfo. Subdomains considered: this pod's and those of the pods
        this agent runs in the namespace. The peer need not exist yet: its IP is reserved by name and it gets
        that IP when it starts (Agent.name_ip)."""
        subs = self.agent.subdomains(self.ns) | ({self.subdomain} if self.subdomain else set())
        if not subs or "." not in text:
            return text
        ns = re.escape(self.ns)
        pattern = (r"(?<![\w.\-])([a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?)\.(" + "|".join(map(re.escape, sorted(subs)))
                   + r")(?:\." + ns + r"(?:\.svc(?:\.cluster\.local)?)?)?\.?(?![\w\-]|\.[\w\-])")
        return re.sub(pattern, lambda m: self.agent.name_ip(self.ns, m.group(2), m.group(1), self.uid), text)

    def prepare(self, c, volumes, tag):
        """argv, env and cwd of container c. Raises ConfigError for a missing reference (the pod waits),
        FileNotFoundError/ValueError for what can never start."""
        self.mounts = {}
        for vm in c.get("volumeMounts") or []:
            if vm["name"] in volumes and vm["mountPath"].rstrip("/"):
                local = os.path.join(volumes[vm["name"]], vm.get("subPath") or "")
                if not os.path.exists(local):
                    os.makedirs(local)              # a kubelet creates a missing subPath as a directory
                self.mounts[vm["mountPath"].rstrip("/")] = local.rstrip("/")
        self.term_file = os.path.join(self.sandbox, f"{tag}termination-log")
        open(self.term_file, "w").close()
        self.mounts[c.get("terminationMessagePath") or "/dev/termination-log"] = self.term_file
        host, port = self.agent.api_host_port
        env = {k: os.environ[k] for k in PASSTHROUGH if k in os.environ}
        env.update(HOME=os.path.join(self.sandbox, "home"), TMPDIR=os.path.join(self.sandbox, "tmp"),
                   HOSTNAME=self.hostname or self.name, KUBERNETES_SERVICE_HOST=host, KUBERNETES_SERVICE_PORT=port)
        for ef in c.get("envFrom") or []:
            kind, ref = ("configmap", ef["configMapRef"]) if "configMapRef" in ef else ("secret", ef["secretRef"])
            for k, v in (self.get_data(kind, ref["name"], ref.get("optional", False)) or {}).items():
                env[ef.get("prefix", "") + k] = self.rewrite(v.decode())
        for e in c.get("env") or []:
            vf = e.get("valueFrom")
            if vf is None:                          # container paths in the literal text, then $(VAR)
                env[e["name"]] = expand(self.rewrite(e.get("value", "")), env)
            elif "fieldRef" in vf:
                env[e["name"]] = str(self.field(vf["fieldRef"]["fieldPath"]))
            elif "resourceFieldRef" in vf:          # the raw quantity; a kubelet would apply the divisor
                kind, res = vf["resourceFieldRef"]["resource"].split(".", 1)
                env[e["name"]] = str(((c.get("resources") or {}).get(kind) or {}).get(res) or RESOURCES.get(res, "0"))
            else:
                kind, ref = ("secret", vf["secretKeyRef"]) if "secretKeyRef" in vf else ("configmap", vf["configMapKeyRef"])
                data = self.get_data(kind, ref["name"], ref.get("optional", False)) or {}
                if ref["key"] in data:
                    env[e["name"]] = self.rewrite(data[ref["key"]].decode())
                elif not ref.get("optional", False):
                    raise ConfigError(f"key {ref['key']!r} not found in {kind} {ref['name']!r}")
        command = c.get("command")
        if not command:                             # the image's ENTRYPOINT is unknown here: let the pod say
            ann = (self.pod["metadata"].get("annotations") or {}).get("kubetune.dev/local-command")
            if not ann:
                raise ValueError("container has no command (image entrypoints are unknown to the node agent: "
                                 "set one, or the pod annotation kubetune.dev/local-command to a JSON list)")
            command = json.loads(ann)
        argv = [expand(self.rewrite(a), env) for a in [*command, *(c.get("args") or [])]]
        # an image path such as /usr/local/bin/python falls back to the same name on PATH
        exe = argv[0] if "/" not in argv[0] or os.path.exists(argv[0]) else os.path.basename(argv[0])
        argv[0] = shutil.which(exe, path=env.get("PATH")) or ""
        if not argv[0]:
            raise FileNotFoundError(f'exec: "{exe}": executable file not found in $PATH')
        cwd = self.rewrite(c.get("workingDir") or "")
        return argv, env, cwd if os.path.isdir(cwd) else os.path.join(self.sandbox, "work")

    # ------------------------------------------------------------------ status documents
    def conditions(self, initialized, ready, reason="ContainersNotReady"):
        t = now()
        def cond(typ, ok, why):
            return {"type": typ, "status": str(bool(ok)), "lastTransitionTime": t, **({} if ok else {"reason": why})}
        return [cond("PodReadyToStartContainers", True, ""), cond("Initialized", initialized, "ContainersNotInitialized"),
                cond("ContainersReady", ready, reason), cond("Ready", ready, reason)]

    def cstatus(self, c, state, ready=False):
        return {"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": ready,
                "started": "running" in state, "restartCount": self.restarts, "state": state,
                **({"containerID": f"local://{self.pgid}"} if self.pgid else {})}

    def status(self, phase, initialized, ready, reason="ContainersNotReady", **statuses):
        return {"phase": phase, "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}], "startTime": self.start_time,
                "conditions": self.conditions(initialized, ready, reason),
                **({"initContainerStatuses": self.init_statuses} if self.init_statuses else {}), **statuses,
                **({"podIP": self.ip, "podIPs": [{"ip": self.ip}]} if self.ip else {})}

    def report_terminated(self, c, code, reason=None, message=None):
        if message is None:                         # as a kubelet reads it when the container exits
            message = read_text(self.term_file)
            if not message and code != 0 and c.get("terminationMessagePolicy") == "FallbackToLogsOnError":
                message = tail(os.path.join(self.sandbox, "container.log"))
        term = {"exitCode": code, "reason": reason or ("Completed" if code == 0 else "Error"),
                "startedAt": self.started_at, "finishedAt": now(), **({"message": message} if message else {})}
        phase = "Succeeded" if code == 0 else "Failed"
        self.patch_status(self.status(phase, True, False, "PodCompleted",
                                      containerStatuses=[self.cstatus(c, {"terminated": term})]))
        log.info("%s: %s (exit %d)", self.key, phase, code)

    # ------------------------------------------------------------------ lifecycle
    def run(self, adopt_pgid=None):
        main = self.pod["spec"]["containers"][0]
        if len(self.pod["spec"]["containers"]) > 1:
            log.warning("%s: only the first container (%s) is run", self.key, main["name"])
        log.info("%s: starting (image %s ignored); output in %s/container.log", self.key, main.get("image"), self.sandbox)
        try:
            self.ip = self.agent.alloc_ip(self.uid, (self.pod.get("status") or {}).get("podIP"), self.dns_key)
            if adopt_pgid:
                code = self.supervise(main, None, adopt_pgid, os.path.getmtime(os.path.join(self.sandbox, "pid")))
            else:
                code = self.run_containers(main)
            if code is not None:
                self.report_terminated(main, code)
        except Exception as e:                      # one bad pod must not take the agent down
            log.exception("%s: failed", self.key)
            self.report_terminated(main, 128, reason="StartError", message=str(e))
        finally:
            if self.agent.release(self):
                self.agent.finalize_deletion(self)

    def run_containers(self, main):
        """Init containers in order, then the main one; returns its exit code (None: no terminal status)."""
        spec = self.pod["spec"]
        for d in ("home", "tmp", "work"):
            os.makedirs(os.path.join(self.sandbox, d), exist_ok=True)
        with open(os.path.join(self.sandbox, "uid"), "w") as f:
            f.write(self.uid)
        inits = spec.get("initContainers") or []
        while True:                                 # a kubelet keeps retrying missing Secrets/ConfigMaps
            try:
                volumes = self.materialize_volumes()
                for c in [*inits, main]:
                    self.prepare(c, volumes, "")    # check every container before anything starts
                break
            except ConfigError as e:
                waiting = {"waiting": {"reason": "CreateContainerConfigError", "message": str(e)}}
                self.patch_status(self.status("Pending", False, False, containerStatuses=[self.cstatus(main, waiting)]))
                if self.deleting.wait(2):
                    return None
        for c in inits:
            running = self.cstatus(c, {"running": {"startedAt": now()}})
            self.patch_status(self.status("Pending", False, False, initContainerStatuses=[*self.init_statuses, running]))
            code = self.launch(c, volumes, f"{c['name']}.init.")
            term = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                    "startedAt": self.started_at, "finishedAt": now()}
            self.init_statuses.append(self.cstatus(c, {"terminated": term}))
            if code != 0 or self.deleting.is_set():
                self.patch_status(self.status("Failed", False, False))
                return None
        policy = spec.get("restartPolicy", "Always")
        while True:
            code = self.launch(main, volumes, "")
            if self.deleting.is_set() or not (policy == "Always" or (policy == "OnFailure" and code != 0)):
                return code
            self.restarts += 1                      # restart in place, with a short backoff
            if self.deleting.wait(min(10, 2 ** self.restarts)):
                return code

    def launch(self, c, volumes, tag):
        """Starts container c in a session of its own and supervises it; returns its exit code."""
        argv, env, cwd = self.prepare(c, volumes, tag)
        exitfile = os.path.join(self.sandbox, f"{tag}exitcode")
        if os.path.exists(exitfile):
            os.remove(exitfile)
        with open(os.path.join(self.sandbox, f"{tag}log" if tag else "container.log"), "ab") as out:
            proc = subprocess.Popen(["/bin/sh", "-c", WRAPPER, "kubetune-pod", exitfile, *argv], env=env, cwd=cwd,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        log.info("%s: %s pid %d: %s", self.key, c["name"], proc.pid, " ".join(argv))
        if not tag:
            with open(os.path.join(self.sandbox, "pid"), "w") as f:
                f.write(str(proc.pid))
        return self.supervise(c, proc, proc.pid, time.time(), tag)

    def supervise(self, c, proc, pgid, started, tag=""):
        """Waits for the process group (ours, or adopted after an agent restart) and handles deletion:
        SIGTERM, then SIGKILL once the grace period is over."""
        self.pgid, self.started_at = pgid, now(started)
        if not tag:
            running = self.cstatus(c, {"running": {"startedAt": self.started_at}}, ready=True)
            self.patch_status(self.status("Running", True, True, containerStatuses=[running]))
        kill_at = None
        while proc.poll() is None if proc else alive(pgid):
            if self.deleting.is_set() and kill_at is None:
                md = self.pod["metadata"]
                grace = md.get("deletionGracePeriodSeconds")
                grace = self.pod["spec"].get("terminationGracePeriodSeconds", 30) if grace is None else grace
                log.info("%s: deleting: SIGTERM, grace %ss", self.key, grace)
                signal_group(pgid, signal.SIGTERM)
                kill_at = time.time() + grace
            if kill_at is not None and time.time() >= kill_at:
                signal_group(pgid, signal.SIGKILL)
                kill_at = float("inf")
            time.sleep(0.2)
        signal_group(pgid, signal.SIGKILL)          # leftovers die with the pod, as in a cgroup
        code = read_int(os.path.join(self.sandbox, f"{tag}exitcode"))
        if code is None:                            # wrapper killed (SIGKILL) or adopted without a record
            rc = proc.returncode if proc else -signal.SIGKILL
            code = 128 - rc if rc < 0 else rc
        log.info("%s: %s exited with %d", self.key, c["name"], code)
        return code


class Agent:
    def __init__(self):
        cfg = client.Configuration()
        config.load_kube_config(client_configuration=cfg)
        cfg.connection_pool_maxsize = 32            # each pod's thread talks to the apiserver
        api = client.ApiClient(cfg)
        self.core, self.coord = client.CoreV1Api(api), client.CoordinationV1Api(api)
        m = re.match(r"https?://([^:/]+):?(\d*)", cfg.host)
        self.api_host_port = (m.group(1), m.group(2) or "443")
        self.lock = threading.Lock()
        self.runs = {}                              # pod uid -> PodRun, until the object is gone
        self.ips = {}                               # pod uid -> <POD_IP_PREFIX>.N
        self.names = {}                             # (ns, subdomain, hostname) -> IP: the pods' DNS names
        self.name_users = {}                        # (ns, subdomain, hostname) -> uids of the pod and its peers
        self.since = now()

    # ------------------------------------------------------------------ node registration and heartbeat
    def node_conditions(self):
        t = now()
        return [{"type": typ, "status": st, "reason": why, "message": "", "lastHeartbeatTime": t,
                 "lastTransitionTime": self.since} for typ, st, why in [
                    ("Ready", "True", "KubeletReady"), ("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                    ("DiskPressure", "False", "KubeletHasNoDiskPressure"), ("PIDPressure", "False", "KubeletHasSufficientPID")]]

    def register(self):
        labels = {"kubernetes.io/hostname": NODE, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                  "kubetune.dev/local-runner": "true"}
        status = {"capacity": RESOURCES, "allocatable": RESOURCES, "conditions": self.node_conditions(),
                  "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": NODE}],
                  "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
                  "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux", "osImage": "local processes",
                               "kubeletVersion": "kubetune-node-agent", "kubeProxyVersion": "",
                               "containerRuntimeVersion": "local-process://1", "kernelVersion": os.uname().release,
                               "bootID": "", "machineID": "", "systemUUID": ""}}
        try:
            node = call(self.core.create_node, {"apiVersion": "v1", "kind": "Node",
                                                "metadata": {"name": NODE, "labels": labels}, "status": status})
            log.info("registered node %s", NODE)
        except ApiException as e:
            if e.status != 409:
                raise
            node = call(self.core.patch_node, NODE, {"metadata": {"labels": labels}})
        call(self.core.patch_node_status, NODE, {"status": status})   # an existing Node gets fresh status too
        self.node_uid = node["metadata"]["uid"]

    def heartbeat(self):
        """Renews the node Lease (what the node lifecycle controller watches) and, less often, Ready."""
        for tick in itertools.count():
            try:
                self.renew_lease()
                if tick % 3 == 0:
                    call(self.core.patch_node_status, NODE, {"status": {"conditions": self.node_conditions()}})
            except ApiException as e:
                log.warning("heartbeat failed: %s", e.reason)
                if e.status == 404:
                    self.register()                 # the node was deleted: register again
            except Exception as e:
                log.warning("heartbeat failed: %s", e)
            time.sleep(RENEW_EVERY)

    def renew_lease(self):
        spec = {"holderIdentity": NODE, "leaseDurationSeconds": LEASE_SECONDS,
                "renewTime": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")}
        try:
            call(self.coord.patch_namespaced_lease, NODE, "kube-node-lease", {"spec": spec})
        except ApiException as e:
            if e.status != 404:
                raise
            owner = {"apiVersion": "v1", "kind": "Node", "name": NODE, "uid": self.node_uid}
            call(self.coord.create_namespaced_lease, "kube-node-lease",
                 {"metadata": {"name": NODE, "ownerReferences": [owner]}, "spec": spec})

    # ------------------------------------------------------------------ pods
    def _free_ip(self, wanted=None):
        """An IP neither a pod nor a reserved DNS name holds (caller holds the lock)."""
        used = set(self.ips.values()) | set(self.names.values())
        free = [wanted] if wanted and wanted.startswith(f"{POD_IP_PREFIX}.") and wanted not in used else []
        free += [f"{POD_IP_PREFIX}.{n}" for n in range(2, 255) if f"{POD_IP_PREFIX}.{n}" not in used]
        if not free:
            raise RuntimeError(f"no free pod IP left in {POD_IP_PREFIX}.0/24")
        return free[0]

    def alloc_ip(self, uid, wanted=None, dns_key=None):
        """The pod's IP: the one reserved for its DNS name (ns, subdomain, hostname) if a peer named it first,
        else the IP it had (an adopted pod), else a free one."""
        with self.lock:
            ip = self.names.get(dns_key) if dns_key else None
            if ip is None or ip in self.ips.values():
                ip = self._free_ip(wanted)
            if dns_key:
                self.names[dns_key] = ip
                self.name_users.setdefault(dns_key, set()).add(uid)
            self.ips[uid] = ip
            return ip

    def name_ip(self, ns, subdomain, hostname, user_uid):
        """The IP of pod DNS name hostname.subdomain in ns, reserved now if no pod holds it yet. The reservation
        lasts while the pod or any running pod that named it (user_uid) lives."""
        key = (ns, subdomain, hostname)
        with self.lock:
            if key not in self.names:
                self.names[key] = self._free_ip()
            self.name_users.setdefault(key, set()).add(user_uid)
            return self.names[key]

    def subdomains(self, ns):
        with self.lock:
            return {r.subdomain for r in self.runs.values() if r.ns == ns and r.subdomain and not r.finished}

    def release(self, run):
        """run() is over: frees the IP. Returns whether the caller must finalize a deletion."""
        with self.lock:
            self.ips.pop(run.uid, None)
            for key in [k for k, users in self.name_users.items() if run.uid in users]:
                self.name_users[key].discard(run.uid)
                if not self.name_users[key]:
                    del self.name_users[key], self.names[key]
            run.finished = True
            must = run.deleting.is_set() and not run.finalized
            run.finalized = run.finalized or must
            return must

    def finalize_deletion(self, run):
        """Containers stopped: drop secrets from disk, delete the pod object with grace 0 (as a kubelet)."""
        shutil.rmtree(os.path.join(run.sandbox, "volumes"), ignore_errors=True)
        if run.vanished:
            return
        try:
            opts = client.V1DeleteOptions(grace_period_seconds=0, preconditions=client.V1Preconditions(uid=run.uid))
            self.core.delete_namespaced_pod(run.name, run.ns, body=opts, _preload_content=False)
            log.info("%s: deleted", run.key)
        except ApiException as e:
            if e.status not in (404, 409):
                log.warning("%s: delete failed: %s", run.key, e.reason)

    def handle(self, etype, pod):
        md, phase = pod["metadata"], (pod.get("status") or {}).get("phase")
        uid = md["uid"]
        deleting = etype == "DELETED" or bool(md.get("deletionTimestamp"))
        with self.lock:
            run = self.runs.get(uid)
            if etype == "DELETED" and (run is None or run.finished):
                self.runs.pop(uid, None)
                return
            if run and not run.finished:            # running: its thread reacts to the flags
                run.pod = pod
                run.vanished = run.vanished or etype == "DELETED"
                if deleting:
                    run.deleting.set()
                return
            if run:                                 # finished earlier: only a deletion is left to do
                if deleting and not run.finalized:
                    run.finalized = True
                    threading.Thread(target=self.finalize_deletion, args=(run,), daemon=True).start()
                return
            self.runs[uid] = run = PodRun(self, pod)
            if deleting:
                run.deleting.set()
        # new to this agent: terminal, never started, started by an earlier agent, or to be started now
        adopt = None
        if phase in ("Succeeded", "Failed") or (deleting and phase != "Running"):
            pass
        elif read_text(os.path.join(run.sandbox, "uid"), 64) == uid and alive(read_int(os.path.join(run.sandbox, "pid")) or 0, True):
            adopt = read_int(os.path.join(run.sandbox, "pid"))
            log.info("%s: adopting running process group %d", run.key, adopt)
        elif phase == "Running":                    # its process ended (or vanished) while no agent watched
            code = read_int(os.path.join(run.sandbox, "exitcode"))
            if read_text(os.path.join(run.sandbox, "uid"), 64) != uid:
                code = None
            run.report_terminated(pod["spec"]["containers"][0], 137 if code is None else code,
                                  message=None if code is not None else "process lost while the node agent was down")
        else:
            adopt = 0                               # Pending: start it
        if adopt is None:
            if self.release(run):
                self.finalize_deletion(run)
            return
        threading.Thread(target=run.run, kwargs={"adopt_pgid": adopt}, name=run.key, daemon=True).start()

    def serve(self):
        self.register()
        threading.Thread(target=self.heartbeat, name="heartbeat", daemon=True).start()
        selector = f"spec.nodeName={NODE}"
        while True:
            try:
                listing = call(self.core.list_pod_for_all_namespaces, field_selector=selector)
                rv = listing["metadata"]["resourceVersion"]
                for pod in listing["items"]:
                    self.safe_handle("ADDED", pod)
                while True:                         # resume from the last version seen; relist on errors/410
                    for ev in watch.Watch().stream(self.core.list_pod_for_all_namespaces, field_selector=selector,
                                                   resource_version=rv, timeout_seconds=300, deserialize=False):
                        rv = ev["object"]["metadata"]["resourceVersion"]
                        if ev["type"] in ("ADDED", "MODIFIED", "DELETED"):
                            self.safe_handle(ev["type"], ev["object"])
            except Exception as e:
                log.warning("pod watch interrupted (%s); relisting", e)
                time.sleep(1)

    def safe_handle(self, etype, pod):
        try:
            self.handle(etype, pod)
        except Exception:
            log.exception("handling pod %s failed", pod.get("metadata", {}).get("name"))


def main():
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    os.makedirs(PODS_DIR, exist_ok=True)
    # SIGTERM (down.sh) stops the agent only: pod processes live in sessions of their own, and a restarted
    # agent adopts them, as containers outlive a kubelet restart. down.sh stops them separately.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    Agent().serve()


if __name__ == "__main__":
    main()
