"""How pytest-xdist splits the suite (scripts/test.sh runs `-n 2`): one job, shared by every test directory.

All end-to-end tests (tests/e2e/) are one unit of work for one worker, run in collection order: they share one
local cluster, and some of them stop its API server or its S3. Every other test is a unit of its own, so the
other worker takes the trainer and unit tests, and whoever finishes first helps with what is left. (xdist's own
`--dist loadgroup` would do this with an `xdist_group` mark, but it rewrites `Item._nodeid`, which pytest 9 no
longer reads, so the mark has no effect.)
"""
from __future__ import annotations

import os

import pytest

E2E_PREFIX = "tests/e2e/"
# The e2e tests' cluster, operator and trainer pods wait on each other and on wall-clock bounds (restart
# downtimes, outage windows); the trainer and unit tests only need CPU. Under xdist a worker lowers its own
# priority (and its children's) once it runs a non-e2e test, so the e2e lane keeps its pace and the other
# worker soaks up the CPU it leaves idle. One way: the worker that finished the e2e tests stays nice as well.
OTHER_TESTS_NICENESS = 10


@pytest.hookimpl(optionalhook=True)  # a no-op without pytest-xdist (KUBETUNE_TEST_WORKERS=0 or not installed)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class E2EOnOneWorker(LoadScopeScheduling):
        """LoadScope with two kinds of scope: "e2e" (every test under tests/e2e/) and each other test alone.
        The largest scope is handed out first (xdist's default reordering), so e2e starts at once."""

        def _split_scope(self, nodeid: str) -> str:
            return "e2e" if nodeid.startswith(E2E_PREFIX) else nodeid

    return E2EOnOneWorker(config, log)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER") and not item.nodeid.startswith(E2E_PREFIX) \
            and os.getpriority(os.PRIO_PROCESS, 0) < OTHER_TESTS_NICENESS:
        os.setpriority(os.PRIO_PROCESS, 0, OTHER_TESTS_NICENESS)
