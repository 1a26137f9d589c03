"""How pytest-xdist splits the suite (scripts/test.sh runs `-n 2`): one job, shared by every test directory.

All end-to-end tests (tests/e2e/) are one unit of work for one worker, run in collection order: they share one
local cluster, and some of them stop its API server or its S3. Every other test is a unit of its own, so the
other worker takes the trainer and unit tests, and whoever finishes first helps with what is left. (xdist's own
`--dist loadgroup` would do this with an `xdist_group` mark, but it rewrites `Item._nodeid`, which pytest 9 no
longer reads, so the mark has no effect.)
"""
from __future__ import annotations

import pytest

E2E_PREFIX = "tests/e2e/"


@pytest.hookimpl(optionalhook=True)  # a no-op without pytest-xdist (KUBETUNE_TEST_WORKERS=0 or not installed)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class E2EOnOneWorker(LoadScopeScheduling):
        """LoadScope with two kinds of scope: "e2e" (every test under tests/e2e/) and each other test alone.
        The largest scope is handed out first (xdist's default reordering), so e2e starts at once."""

        def _split_scope(self, nodeid: str) -> str:
            return "e2e" if nodeid.startswith(E2E_PREFIX) else nodeid

    return E2EOnOneWorker(config, log)
