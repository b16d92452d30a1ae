"""Shared fixtures. `slow` tests run only with RELAYVOICE_SLOW=1 (CI sets it when time allows).

``async def`` tests run on a fresh event loop each (no plugin needed for that).
"""

from __future__ import annotations

import asyncio
import inspect
import os

import pytest


@pytest.fixture(autouse=True)
def _transcripts_in_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """server.transcripts defaults under XDG_DATA_HOME: never the developer's own."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("data")))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("RELAYVOICE_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set RELAYVOICE_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    names = pyfuncitem._fixtureinfo.argnames
    asyncio.run(pyfuncitem.obj(**{name: pyfuncitem.funcargs[name] for name in names}))
    return True
