"""User ids no other test uses: the tests of a module share one daemon and
its database (``shared_daemon``), where a fixed id would be a later test's
409, or another test's record."""

from __future__ import annotations

import uuid


def uid(prefix: str) -> str:
    """A new user id; ``prefix`` says which module or test made it (it shows
    in the daemon's logs and audit trail)."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"
