"""Suite-wide setup: deterministic seeds, and (under EBF_REQUIRE_PARITY=1) failure when a parity test skipped."""

from __future__ import annotations

import os

import pytest
import torch

_skipped_parity: list[str] = []


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_runtest_logreport(report):
    if report.skipped and "parity" in report.keywords:
        _skipped_parity.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("EBF_REQUIRE_PARITY") == "1" and _skipped_parity:
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.write_line(
                f"ERROR: {len(_skipped_parity)} parity test(s) were skipped: {_skipped_parity[:10]}", red=True
            )
        session.exitstatus = 1
