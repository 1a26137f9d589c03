"""Storage outages are waited out: the patience policy (storage/patience.py) and the superseding background
uploader (uploader.py, CheckpointSync).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/trainer/test_storage_outage.py -q

Policy tests run on a fake clock (no sleeping); the outage tests stop and restart a real SeaweedFS of their own
(connection refused, as a crashed or unreachable store gives). HTTP 5xx and throttling answers cannot be made
to come from SeaweedFS on demand, so those are botocore ClientErrors built by hand.
"""

from __future__ import annotations

import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
from botocore import exceptions as bx
from boto3.exceptions import RetriesExceededError, S3UploadFailedError

from kubetune_api.constants import DEFAULT_STORAGE_PATIENCE_S, ExitCode
from kubetune_trainer import checkpointing, storage
from kubetune_trainer.errors import StorageUnavailableError, TrainerError
from kubetune_trainer.storage import patience
from kubetune_trainer.storage.patience import Cancelled, Patience, is_transient
from kubetune_trainer.uploader import LatestOnlyUploader
from tests.s3_server import S3Server

EP = "http://store.example:9000"


def client_error(code: str, status: int) -> bx.ClientError:
    return bx.ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                          "PutObject")


def _id(e: BaseException) -> str:
    r = getattr(e, "response", None)
    return type(e).__name__ + (":" + str(r.get("Error", {}).get("Code")) if isinstance(r, dict) else "")


def wrapped_upload_error(inner: BaseException) -> S3UploadFailedError:
    """What boto3's upload_file raises: S3UploadFailedError with the ClientError as its context."""
    try:
        raise inner
    except BaseException as e:  # noqa: BLE001
        try:
            raise S3UploadFailedError(f"Failed to upload a to b/c: {e}")
        except S3UploadFailedError as outer:
            return outer


# --------------------------------------------------------------------------------------- classification
@pytest.mark.parametrize("exc", [
    bx.EndpointConnectionError(endpoint_url=EP),
    bx.ConnectTimeoutError(endpoint_url=EP),
    bx.ReadTimeoutError(endpoint_url=EP),
    bx.ConnectionClosedError(endpoint_url=EP),
    bx.ResponseStreamingError(error="reset"),
    client_error("SlowDown", 503), client_error("InternalError", 500), client_error("ServiceUnavailable", 503),
    client_error("", 502), client_error("TooManyRequestsException", 429), client_error("RequestTimeout", 400),
    wrapped_upload_error(client_error("SlowDown", 503)),
    RetriesExceededError(bx.ReadTimeoutError(endpoint_url=EP)),
    ConnectionResetError(104, "Connection reset by peer"),
], ids=lambda e: _id(e))
def test_transient_failures_are_retried(exc):
    assert is_transient(exc)


@pytest.mark.parametrize("exc", [
    client_error("AccessDenied", 403), client_error("InvalidAccessKeyId", 403),
    client_error("SignatureDoesNotMatch", 403), client_error("NoSuchBucket", 404), client_error("NoSuchKey", 404),
    client_error("404", 404), wrapped_upload_error(client_error("AccessDenied", 403)),
    bx.SSLError(endpoint_url=EP, error="certificate verify failed"), bx.NoCredentialsError(),
    bx.ParamValidationError(report="bad"), ValueError("x"), TrainerError("ours"),
], ids=lambda e: _id(e))
def test_permanent_failures_are_not(exc):
    assert not is_transient(exc)


# --------------------------------------------------------------------------------------- the budget
class FakeTime:
    """A clock that only moves when the policy sleeps (or the test says so)."""

    def __init__(self):
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


def failing(exc: BaseException, times: int = 10 ** 9, value="ok"):
    calls = {"n": 0}

    def fn():
        calls["n"] += 1
        if calls["n"] <= times:
            raise exc
        return value
    return fn, calls


def test_outage_longer_than_budget_gives_up_at_the_budget_naming_endpoint_and_call():
    t = FakeTime()
    p = Patience(20, clock=t.clock, sleep=t.sleep, rng=lambda: 0.5)
    fn, calls = failing(bx.EndpointConnectionError(endpoint_url=EP + "/b/k"))
    with pytest.raises(StorageUnavailableError) as ei:
        p.call(fn, endpoint=EP, what="uploading s3://b/k")
    err = ei.value
    assert err.exit_code == ExitCode.STORAGE_UNAVAILABLE == 75 and err.reason == "StorageUnavailable"
    assert t.now - 1000.0 == pytest.approx(20.0)  # waited exactly the budget: the last wait is cut to fit
    assert EP in err.message and "uploading s3://b/k" in err.message and "EndpointConnectionError" in err.message
    assert "storagePatienceSeconds" in err.message
    assert calls["n"] == len(t.sleeps) + 1 >= 4  # an attempt after every wait, the last one at the deadline


def test_outage_shorter_than_budget_is_invisible_to_the_caller():
    t = FakeTime()
    p = Patience(600, clock=t.clock, sleep=t.sleep)
    fn, calls = failing(client_error("SlowDown", 503), times=5, value="done")
    assert p.call(fn, endpoint=EP, what="writing s3://b/runs.json") == "done"
    assert calls["n"] == 6 and p.retries == 5
    assert p.outage_seconds(EP) == 0 and not p.in_outage()  # the success ended the outage


def test_permanent_failure_is_raised_at_once():
    t = FakeTime()
    p = Patience(600, clock=t.clock, sleep=t.sleep)
    fn, calls = failing(client_error("AccessDenied", 403))
    with pytest.raises(bx.ClientError):
        p.call(fn, endpoint=EP, what="reading s3://b/k")
    assert calls["n"] == 1 and t.sleeps == []


def test_budget_is_wall_clock_across_calls_and_per_endpoint():
    """The outage clock belongs to the endpoint, not the call: a second call during the same outage gets what is
    left of the budget; another endpoint has its own clock; a success anywhere on the endpoint resets it."""
    t = FakeTime()
    p = Patience(20, clock=t.clock, sleep=t.sleep, rng=lambda: 0.0)
    down = bx.EndpointConnectionError(endpoint_url=EP)
    stop_at = t.now + 12
    fn, _ = failing(down)
    with pytest.raises(Cancelled):  # call 1 waits 12 s, then is no longer wanted
        p.call(fn, endpoint=EP, what="uploading checkpoint-5", cancelled=lambda: t.now >= stop_at)
    assert p.outage_seconds(EP) >= 12
    other, _ = failing(down, times=1)
    assert p.call(other, endpoint="http://other:9000", what="x") == "ok"  # its own clock, and it recovered
    start = t.now
    with pytest.raises(StorageUnavailableError):
        p.call(fn, endpoint=EP, what="uploading checkpoint-10")
    assert t.now - start <= 20 - 12 + 0.01  # only what was left of the budget
    # back up: the next outage starts from zero
    ok, _ = failing(down, times=0)
    p.call(ok, endpoint=EP, what="y")
    assert p.outage_seconds(EP) == 0


def test_backoff_doubles_with_jitter_and_is_capped():
    lo = Patience(600, rng=lambda: 0.0, base=1.0, cap=30.0)
    hi = Patience(600, rng=lambda: 0.999999, base=1.0, cap=30.0)
    assert [lo.backoff(a) for a in range(7)] == [0.5, 1, 2, 4, 8, 15, 15]
    assert [round(hi.backoff(a), 3) for a in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    rnd = Patience(600)
    waits = [rnd.backoff(3) for _ in range(200)]
    assert 4 <= min(waits) < max(waits) <= 8 and len(set(waits)) > 100  # spread, within [d/2, d]


def test_default_budget_is_the_documented_one():
    assert Patience().seconds == DEFAULT_STORAGE_PATIENCE_S == 600
    assert patience.configure(None).seconds == 600
    assert patience.configure(30).seconds == 30
    patience.configure(None)


def test_once_gives_one_attempt_also_in_pool_threads():
    t = FakeTime()
    p = Patience(600, clock=t.clock, sleep=t.sleep)
    fn, calls = failing(bx.EndpointConnectionError(endpoint_url=EP))
    with p.once():
        with pytest.raises(bx.EndpointConnectionError):
            p.call(fn, endpoint=EP, what="pruning")
        with ThreadPoolExecutor(2) as pool:
            futs = [pool.submit(patience.in_pool(lambda: p.call(fn, endpoint=EP, what="pool"))) for _ in range(2)]
            for f in futs:
                with pytest.raises(bx.EndpointConnectionError):
                    f.result()
    assert calls["n"] == 3 and t.sleeps == []


# --------------------------------------------------------------------------------------- the uploader
def test_uploader_newest_pending_supersedes_older_and_never_runs_two_at_once():
    gate, started = threading.Event(), threading.Event()
    active, peak, done, discarded = [0], [0], [], []
    lock = threading.Lock()

    def upload(item):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        if item == 1:
            started.set()
            assert gate.wait(10)  # storage "slow": the first upload hangs while training goes on
        with lock:
            active[0] -= 1
        done.append(item)

    up = LatestOnlyUploader(upload, discard=discarded.append)
    t0 = time.monotonic()
    up.submit(1)
    assert started.wait(5)
    for item in (2, 3, 4):
        up.submit(item)
    assert time.monotonic() - t0 < 1  # submitting never waits for storage
    assert up.busy() and not up.wait(timeout=0.2)
    gate.set()
    assert up.wait(timeout=10)
    assert done == [1, 4] and up.uploaded == [1, 4]
    assert up.superseded == [2, 3] and peak[0] == 1
    assert sorted(discarded) == [1, 2, 3, 4]  # superseded snapshots and finished ones are cleaned up
    up.close()


def test_uploader_failure_reaches_the_training_thread():
    def upload(item):
        raise StorageUnavailableError("object storage at X unreachable")

    up = LatestOnlyUploader(upload)
    up.submit("a")
    with pytest.raises(StorageUnavailableError):
        up.wait(timeout=5)
    with pytest.raises(StorageUnavailableError):
        up.raise_if_failed()
    up.close()


def test_stuck_upload_yields_to_a_newer_checkpoint():
    """During an outage the running upload gives up (between retries) as soon as a newer checkpoint waits."""
    t = FakeTime()
    p = Patience(600, clock=lambda: time.monotonic(), sleep=lambda s: time.sleep(0.01))
    started = threading.Event()
    done = []

    def upload(item):
        if item == "old":
            started.set()
            fn, _ = failing(bx.EndpointConnectionError(endpoint_url=EP))
            with p.cancellable(up.cancelled):
                p.call(fn, endpoint=EP, what="uploading old")
        done.append(item)

    up = LatestOnlyUploader(upload)
    up.submit("old")
    assert started.wait(5)
    up.submit("new")
    assert up.wait(timeout=10)
    assert done == ["new"] and up.superseded == ["old"]
    del t
    up.close()


# --------------------------------------------------------------------------------------- a real outage
@pytest.fixture
def own_s3(monkeypatch):
    """A SeaweedFS of this test's own (stopping the shared one would break other tests)."""
    tmp = tempfile.mkdtemp(prefix="kubetune-s3-outage-")
    server = S3Server(Path(tmp)).start()
    for k, v in server.env().items():
        monkeypatch.setenv(k, v)
    try:
        yield server
    finally:
        server.stop()
        patience.configure(None)


def _checkpoint(root: Path, step: int) -> Path:
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (d / name).write_bytes(bytes([step]) * 2048)
    (d / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    return d


def test_store_calls_wait_out_a_real_outage(own_s3, tmp_path):
    patience.configure(60)
    store = storage.OutputStore(f"s3://{own_s3.new_bucket()}/ns/job")
    src = _checkpoint(tmp_path, 3)
    own_s3.stop()
    threading.Timer(4.0, own_s3.revive).start()
    t0 = time.monotonic()
    store.put_dir(src, "checkpoints/checkpoint-3")  # refused for ~4 s, then the same call succeeds
    store.write_text("runs.json", "{}")
    assert time.monotonic() - t0 >= 3.5
    assert sorted(store.list_files("checkpoints/checkpoint-3")) == sorted(p.name for p in src.iterdir())
    assert patience.policy().retries > 0 and not patience.policy().in_outage()


def test_store_gives_up_after_the_budget_with_a_named_error(own_s3, tmp_path):
    patience.configure(3)
    bucket = own_s3.new_bucket()
    store = storage.OutputStore(f"s3://{bucket}/ns/job")
    own_s3.stop()
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailableError) as ei:
        store.write_text("runs/r1/manifest.json", "{}")
    assert 3 <= time.monotonic() - t0 < 20
    msg = str(ei.value)
    assert own_s3.endpoint in msg and f"writing s3://{bucket}/ns/job/runs/r1/manifest.json" in msg
    assert own_s3.secret_key not in msg


def test_checkpoint_sync_trains_on_through_an_outage_and_uploads_the_newest(own_s3, tmp_path):
    """CheckpointSync during an outage: on_save returns at once (training goes on), checkpoints saved meanwhile
    supersede each other, and when the store is back only the newest one is uploaded, complete; the older
    checkpoint from before the outage stays until pruning."""
    patience.configure(120)
    store = storage.OutputStore(f"s3://{own_s3.new_bucket()}/ns/job/runs/r1")
    out = tmp_path / "checkpoints"
    sync = checkpointing.CheckpointSync(store, keep=2)
    args, control = SimpleNamespace(output_dir=str(out)), SimpleNamespace(should_save=False,
                                                                          should_training_stop=False)

    def save(step):
        _checkpoint(out, step)
        t0 = time.monotonic()
        sync.on_save(args, SimpleNamespace(global_step=step, best_global_step=None), control)
        sync.on_step_end(args, SimpleNamespace(global_step=step), control)
        return time.monotonic() - t0

    save(5)
    sync.uploader.wait(timeout=30)
    assert checkpointing.complete_checkpoints(store) == [5]
    own_s3.stop()
    blocked = [save(s) for s in (10, 15, 20)]
    time.sleep(1.5)
    assert max(blocked) < 1.0, blocked  # training was never held up by the dead store
    assert patience.policy().in_outage()
    own_s3.revive()
    sync.on_train_end(args, SimpleNamespace(global_step=20), control)  # waits for the uploads
    assert checkpointing.complete_checkpoints(store) == [5, 20]
    assert 15 in [i.step for i in sync.uploader.superseded]
    assert sync.last_uri == store.uri("checkpoints/checkpoint-20")
    assert store.read_complete("checkpoints/checkpoint-20")["files"]["trainer_state.json"] > 0
    assert not any((out / checkpointing.UPLOAD_STAGING).iterdir())  # every snapshot cleaned up
    sync.close()
