"""The audit trail: one JSON line per key operation, apart from the
operational log, each line chained to the one before by hash.

    {"seq": 7, "time": "...", "operation": "fetch", "subject": "alice",
     "caller": {"transport": "unix", "uid": 1000, "pid": 4242},
     "token_id": "3f2a...", "outcome": "ok", "status": 200,
     "prev": "<sha256 hex of line 6, without its newline>"}

``kmsd audit verify FILE`` recomputes the chain: an edited, removed,
inserted or reordered line breaks it at that point. What the chain alone
cannot show is lines cut off at the end; the daemon logs the chain head
(``audit_head``, seq and hash) when it stops, and ``verify --head`` checks a
file against such a record.

Never a secret: the subject is a user id, the token is named by its ``jti``,
never by its value; there is no payload, DEK or key material in any field.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import threading
from dataclasses import dataclass
from typing import Any

from .errors import AuditUnavailable
from .logs import escape_controls

__all__ = ["AuditTrail", "AuditUnavailable", "VerifyResult", "GENESIS", "verify_file"]

GENESIS = "0" * 64  # the "prev" of the first line of a new trail


def _hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _last_line(path: str) -> bytes | None:
    """The last complete line of ``path`` (without its newline), reading
    backwards from the end so that a large trail costs nothing at start."""
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        end = fh.tell()
        block, data = 4096, b""
        pos = end
        while pos > 0:
            step = min(block, pos)
            pos -= step
            fh.seek(pos)
            data = fh.read(step) + data
            stripped = data.rstrip(b"\n")
            if b"\n" in stripped:
                return stripped.rsplit(b"\n", 1)[1]
        stripped = data.rstrip(b"\n")
        return stripped or None


class AuditTrail:
    """Appends hash-chained lines to one file. ``fail_closed``: a line that
    cannot be written makes ``record`` raise ``AuditUnavailable`` (the
    request then fails with 503) instead of only logging the failure."""

    def __init__(self, path: str, *, fail_closed: bool = False, log: Any = None) -> None:
        self.path = path
        self.fail_closed = fail_closed
        self._log = log
        self._fd: int | None = None
        self._prev = GENESIS
        self._seq = 0
        self.healthy = False
        self._lock = threading.Lock()
        # Directories open() made, outermost first: a daemon that drops its
        # privileges makes them its own, to create the file anew in after a
        # logrotate (one that existed before is the operator's to set up).
        self.created_dirs: list[str] = []

    def open(self) -> None:
        """Open for appending, continuing the chain of what is there."""
        directory = os.path.dirname(os.path.abspath(self.path))
        missing = []
        while directory and not os.path.isdir(directory):
            missing.append(directory)
            directory = os.path.dirname(directory)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.created_dirs += reversed(missing)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        last = _last_line(self.path)
        prev, seq = GENESIS, 0
        if last is not None:
            try:
                doc = json.loads(last)
                prev, seq = _hash(last), int(doc["seq"])
            except (ValueError, KeyError, TypeError):
                # A damaged tail: start a new chain, and say so in it.
                prev, seq = _hash(last), 0
        self.close()
        self._fd, self._prev, self._seq = fd, prev, seq
        self.healthy = True

    def reopen(self) -> None:
        """After the file was rotated away (SIGHUP): a new file continues
        the chain of the old one."""
        with self._lock:
            prev, seq = self._prev, self._seq
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            if os.fstat(self._fd).st_size > 0:
                last = _last_line(self.path)
                if last is not None:
                    prev = _hash(last)
                    try:
                        seq = int(json.loads(last)["seq"])
                    except (ValueError, KeyError, TypeError):
                        pass
            self._prev, self._seq = prev, seq
            self.healthy = True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def head(self) -> tuple[int, str]:
        """(seq, hash) of the last line written."""
        return self._seq, self._prev

    def check(self) -> None:
        """Before an operation: fail closed at once if the trail is broken."""
        if self.fail_closed and not self.healthy:
            raise AuditUnavailable()

    def record(
        self,
        *,
        operation: str,
        outcome: str,
        status: int,
        caller: dict[str, Any],
        subject: str | None = None,
        token_id: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        with self._lock:
            seq = self._seq + 1
            entry: dict[str, Any] = {
                "seq": seq,
                "time": dt.datetime.now(dt.UTC).isoformat(timespec="microseconds"),
                "operation": operation,
                "subject": subject,
                "caller": caller,
                "token_id": token_id,
                "outcome": outcome,
                "status": status,
                "prev": self._prev,
            }
            if detail:
                entry["detail"] = detail
            # backslashreplace: a lone surrogate (a JSON "\ud800" in an
            # encryption context) has no UTF-8; the line keeps it as text.
            line = escape_controls(
                json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
                    "utf-8", "backslashreplace"
                )
            )
            try:
                if self._fd is None:
                    raise OSError("audit trail not open")
                size = os.fstat(self._fd).st_size
                written = os.write(self._fd, line + b"\n")
                if written != len(line) + 1:
                    # Cut the partial line off, or the next one would be glued to it.
                    os.ftruncate(self._fd, size)
                    raise OSError("short write")
            except OSError as exc:
                self.healthy = False
                if self._log is not None:
                    self._log.error("audit_write_failed", error=str(exc), path=self.path)
                if self.fail_closed:
                    raise AuditUnavailable() from None
                return
            self.healthy = True
            self._seq, self._prev = seq, _hash(line)


@dataclass
class VerifyResult:
    lines: int
    problems: list[str]
    head: tuple[int, str] | None  # (seq, hash) of the last line

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_file(path: str, *, head: str | None = None, first_prev: str | None = None) -> VerifyResult:
    """Check the chain of ``path``. ``first_prev``: what the first line must
    point to (GENESIS for a trail's first file; by default whatever it
    says, so a rotated file verifies on its own). ``head``: the hash the
    last line must have (from an ``audit_head`` record), which also shows
    lines cut off at the end."""
    problems: list[str] = []
    prev: str | None = first_prev
    last: tuple[int, str] | None = None
    seq_expected: int | None = None
    n = 0
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, start=1):
            if not raw.endswith(b"\n"):
                problems.append(f"line {n}: incomplete (no newline)")
            line = raw.rstrip(b"\n")
            try:
                doc = json.loads(line)
                seq, claimed = int(doc["seq"]), str(doc["prev"])
            except (ValueError, KeyError, TypeError):
                problems.append(f"line {n}: not an audit record")
                prev, seq_expected = _hash(line), None
                continue
            if prev is not None and claimed != prev:
                problems.append(f"line {n} (seq {seq}): does not follow the line before (edited, removed or reordered)")
            if seq_expected is not None and seq != seq_expected:
                problems.append(f"line {n}: seq {seq}, expected {seq_expected}")
            prev = _hash(line)
            seq_expected = seq + 1
            last = (seq, prev)
    if head is not None and (last is None or last[1] != head):
        problems.append("the last line is not the recorded head: lines were cut off or added at the end")
    return VerifyResult(n, problems, last)
