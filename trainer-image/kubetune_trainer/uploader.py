"""The background checkpoint uploader: one worker thread, at most one upload pending, the newest wins.

Training must not wait for object storage: CheckpointSync (checkpointing.py) hands each saved checkpoint to
`LatestOnlyUploader.submit` and goes on training. The worker uploads one item at a time (so two uploads of the
same folder never race). While an upload runs or waits out an outage (storage/patience.py), a newer submission
replaces the one still pending: after an outage only the newest checkpoint is uploaded, the superseded ones
are dropped (`discard` cleans up their local snapshot). A failure is kept and raised in the training thread by
`raise_if_failed` (the callback calls it at every step end) or by `wait` (before the final publish and before
a preempted pod exits), so a spent patience budget still ends the run with exit 75.

    up = LatestOnlyUploader(upload=lambda item: ..., discard=lambda item: ...)
    up.submit(item)            # returns at once
    up.raise_if_failed()       # in the training loop
    up.wait()                  # everything submitted is uploaded (or raises the upload's error)
    up.close()                 # stop the worker (pending items are discarded)
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)


class LatestOnlyUploader:
    def __init__(self, upload: Callable[[Any], None], discard: Callable[[Any], None] = lambda item: None,
                 name: str = "kubetune-uploader"):
        self._upload, self._discard, self._name = upload, discard, name
        self._cond = threading.Condition()
        self._pending: Optional[Any] = None
        self._running: Optional[Any] = None
        self._error: Optional[BaseException] = None
        self._closed = False
        self._thread: Optional[threading.Thread] = None
        self.superseded: list[Any] = []   # items dropped because a newer one came (for logs and tests)
        self.uploaded: list[Any] = []

    # ------------------------------------------------------------------------------------------ producer side
    def submit(self, item: Any) -> None:
        """Queue `item` for upload; a pending (not yet started) item is superseded and discarded."""
        with self._cond:
            if self._closed:
                raise RuntimeError("uploader is closed")
            dropped, self._pending = self._pending, item
            if dropped is not None:
                self.superseded.append(dropped)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify_all()
        if dropped is not None:
            log.warning("checkpoint upload of %s superseded by %s before it started (storage slow or "
                        "unreachable): only the newer one is uploaded", dropped, item)
            self._discard_quietly(dropped)

    def busy(self) -> bool:
        with self._cond:
            return self._pending is not None or self._running is not None

    def cancelled(self) -> bool:
        """True for the running upload once it is pointless: the uploader closes, or a newer item waits.
        (Used by the patience policy between retries: an upload stuck in an outage yields to a newer one.)"""
        with self._cond:
            return self._closed or self._pending is not None

    def raise_if_failed(self) -> None:
        with self._cond:
            err = self._error
        if err is not None:
            raise err

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until nothing is pending or running; raise the first upload error. False on timeout."""
        with self._cond:
            done = self._cond.wait_for(lambda: self._error is not None or
                                       (self._pending is None and self._running is None), timeout)
            err = self._error
        if err is not None:
            raise err
        return bool(done)

    def close(self) -> None:
        """Stop the worker after its current upload; a pending item is discarded."""
        with self._cond:
            self._closed = True
            dropped, self._pending = self._pending, None
            self._cond.notify_all()
            thread = self._thread
        if dropped is not None:
            self._discard_quietly(dropped)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    # ------------------------------------------------------------------------------------------ worker side
    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:  # closed
                    return
                item, self._pending, self._running = self._pending, None, self._pending
            try:
                self._upload(item)
                with self._cond:
                    self.uploaded.append(item)
            except BaseException as exc:  # noqa: BLE001 - reported to the training thread
                from .storage.patience import Cancelled

                if isinstance(exc, Cancelled):
                    log.warning("checkpoint upload of %s abandoned for a newer checkpoint", item)
                    with self._cond:
                        self.superseded.append(item)
                else:
                    log.error("checkpoint upload of %s failed: %s", item, exc)
                    with self._cond:
                        if self._error is None:
                            self._error = exc
                        self._closed = True
                        dropped, self._pending = self._pending, None
                    if dropped is not None:
                        self._discard_quietly(dropped)
            finally:
                self._discard_quietly(item)
                with self._cond:
                    self._running = None
                    self._cond.notify_all()

    def _discard_quietly(self, item: Any) -> None:
        try:
            self._discard(item)
        except Exception as exc:  # noqa: BLE001 - cleanup of a local snapshot must not end the run
            log.warning("could not clean up %s: %s", item, exc)
