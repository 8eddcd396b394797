"""Components a test needs (nginx, Redis, node and npm packages, Chromium): skip without one, fail in CI.

CI runs with ``CI`` set (``CI=true ./.ci/run``), and there a missing component is a failure, so that a
green run always means every test ran. Elsewhere, a developer without the component gets a skip that
says what to install.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(reason: str, tests: str) -> NoReturn:
    """The calling test cannot run for ``reason``: skip it, or fail it in CI (``tests``: which ones)."""
    if in_ci():
        pytest.fail(f"{reason} (CI must run the {tests} tests)", pytrace=False)
    pytest.skip(reason)
