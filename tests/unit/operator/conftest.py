"""Shared fixtures of the operator unit tests (builders and the fake API server are in builders.py)."""

from __future__ import annotations

import pytest

from tests.unit.operator.builders import SECRET_VALUE


@pytest.fixture(autouse=True)
def _secret_in_env(monkeypatch):
    """The operator process may well have credentials in its environment: none may leak into what it renders."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_VALUE)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-ACCESS-KEY-ID")
