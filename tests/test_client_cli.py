"""``python -m kmsd_client encrypt|decrypt``: files through the real daemon,
the token from a file or KMSD_TOKEN, the context checked, and a clear exit
status and message when something is refused."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from conftest import Daemon, remember

from kmsd_client import KMSClient


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kmsd_client", *args], capture_output=True, text=True, timeout=60,
        env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
    )


def test_encrypt_and_decrypt_files(shared_daemon: Daemon, tmp_path: Path) -> None:
    owner = f"cli-{uuid.uuid4().hex[:10]}"
    with KMSClient(shared_daemon.socket) as kms:
        token = kms.store(owner, "x")
        other = kms.store(owner + "-o", "y")
    remember(token, other)
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    document = os.urandom(3 << 20) + b"tail"
    plain, sealed, opened = tmp_path / "doc", tmp_path / "doc.kmse", tmp_path / "doc.out"
    plain.write_bytes(document)

    done = run("encrypt", str(plain), str(sealed), "--socket", shared_daemon.socket, "--token-file", str(token_file),
               "--context", "table=docs", "--context", "id=9")
    assert done.returncode == 0, done.stderr
    assert document not in sealed.read_bytes()
    # Over TCP, the token from the environment, the context in another order.
    done = run("decrypt", str(sealed), str(opened), "--url", shared_daemon.url, "--context", "id=9",
               "--context", "table=docs", env={"KMSD_TOKEN": token})
    assert done.returncode == 0, done.stderr
    assert opened.read_bytes() == document
    opened.unlink()

    # Refused: another context, another subject's token; nothing written.
    done = run("decrypt", str(sealed), str(opened), "--socket", shared_daemon.socket, "--context", "id=10",
               env={"KMSD_TOKEN": token})
    assert done.returncode == 1 and "invalid envelope" in done.stderr and not opened.exists()
    done = run("decrypt", str(sealed), str(opened), "--socket", shared_daemon.socket, env={"KMSD_TOKEN": other})
    assert done.returncode == 1 and "decryption failed" in done.stderr and not opened.exists()
    assert token not in done.stderr and other not in done.stderr
    # Bad usage.
    done = run("decrypt", str(sealed), str(opened), "--context", "novalue")
    assert done.returncode != 0 and "NAME=VALUE" in done.stderr
    done = run("encrypt", str(tmp_path / "missing"), str(opened), "--socket", shared_daemon.socket,
               env={"KMSD_TOKEN": token})
    assert done.returncode == 1 and "missing" in done.stderr and "Traceback" not in done.stderr
