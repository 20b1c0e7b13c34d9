"""kmsd-client is a distribution of its own with no dependencies: installed
alone into a bare virtual environment it pulls in nothing else, and its own
tests (client/tests, standard library only) pass there against a real
daemon over both listeners."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

from conftest import Daemon

ROOT = Path(__file__).resolve().parent.parent


def test_installs_alone_and_its_tests_pass_against_the_daemon(tmp_path: Path, shared_daemon: Daemon) -> None:
    # The wheel is built here (no network: no build isolation) and installed
    # from the file alone (--no-index): any dependency would fail the install.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
         str(ROOT / "client")],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("kmsd_client-*.whl")
    env_dir = tmp_path / "bare"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")

    def installed() -> set[str]:
        out = subprocess.run([python, "-m", "pip", "list", "--format=json"], check=True, capture_output=True, timeout=120)
        return {p["name"].lower() for p in json.loads(out.stdout)}

    before = installed()
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", str(wheel)], check=True, capture_output=True,
                   timeout=300)
    assert installed() - before == {"kmsd-client"}

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "KMSD_"))}
    env.update(KMSD_TEST_SOCKET=shared_daemon.socket, KMSD_TEST_URL=shared_daemon.url, KMSD_TEST_BARE="1")
    # -s: the tests from the repository, the client from the environment
    # (the checkout's client/ is not on the path: -t names the tests' dir).
    proc = subprocess.run(
        [python, "-m", "unittest", "discover", "-v", "-s", str(ROOT / "client" / "tests"), "-t", str(ROOT / "client" / "tests")],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped" not in proc.stderr, proc.stderr[-3000:]
    assert "Ran 5 tests" in proc.stderr, proc.stderr[-3000:]
    located = subprocess.run([python, "-c", "import kmsd_client; print(kmsd_client.__file__)"], capture_output=True,
                             text=True, check=True, env=env, cwd=tmp_path)
    assert located.stdout.startswith(str(env_dir)), located.stdout


def test_every_install_of_the_daemon_from_source_installs_the_client_with_it() -> None:
    """kmsd depends on kmsd-client, which no index serves: ``pip install .``
    alone cannot resolve it, so each documented install names ./client too."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(dep.startswith("kmsd-client") for dep in project["dependencies"])
    places = {
        "Makefile": "-e ./client -e '.[test]'",
        "systemd/install.sh": '"$src/client" "$src"',
        "docs/operations.md": "pip install ./client .",
        "bench/run": "-e ./client -e .",
    }
    for path, install in places.items():
        assert install in (ROOT / path).read_text(), path
