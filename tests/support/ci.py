"""Prerequisites that a developer's machine may lack and CI must have."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def skip_or_fail(message: str) -> NoReturn:
    """Skip loudly, except under CI (``CI`` set), where it is a failure: .ci/run
    installs every prerequisite, so a skip there would hide a test that never ran."""
    # pytest reports a skip at the innermost frame not hidden: the caller's
    # line, which says what was missing, rather than this one for every skip.
    __tracebackhide__ = True
    if os.environ.get("CI"):
        pytest.fail(f"CI is set: {message}", pytrace=False)
    pytest.skip(message)
