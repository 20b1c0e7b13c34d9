"""A private MariaDB Galera cluster for the tests and bench/run: ``size``
``mariadbd`` nodes on loopback, each with its own datadir, tmpdir, Unix
socket and ports, all under one base directory, run as child processes so
that tests may kill a node, stop it, start it again, or leave a lone
survivor without quorum.

Modelled on :mod:`devtools.mariadb_server`; nothing here touches a system
MariaDB service or its files (every node runs with ``--no-defaults``).

Why the nodes run as the ``mysql`` system user (when we are root): the rsync
state transfer (SST) refuses to work for a server running as root. They are
not started with ``--user=mysql`` but with their privileges dropped before
``exec``, because the kernel clears the parent-death signal when a process
changes its credentials: a server that called ``setuid`` itself would outlive
a crashed test run.
"""

from __future__ import annotations

import itertools
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pymysql

from devtools.mariadb_server import (
    _NAME,
    APP_GRANTS,
    APP_HOSTS,
    APP_USER,
    _die_with,
    _free_port,
    find_binaries,
    socket_path,
)

__all__ = ["GaleraCluster", "GaleraNode", "find_provider"]

_PROVIDERS = (
    "/usr/lib/galera/libgalera_smm.so",  # Debian, Ubuntu
    "/usr/lib/galera-4/libgalera_smm.so",
    "/usr/lib64/galera-4/libgalera_smm.so",  # Fedora, RHEL
    "/usr/lib64/galera/libgalera_smm.so",
)

# Shorter than Galera's defaults (PT5S, PT15S) so that a killed node is
# evicted from the view, and the survivors' commits resume, within seconds.
# The inactive timeout must not be below the suspect timeout.
_EVS_TIMEOUTS = ("evs.suspect_timeout=PT3S", "evs.inactive_timeout=PT6S")

_RECOVERED = re.compile(r"WSREP: Recovered position:\s*([0-9a-fA-F-]{36}):(-?\d+)")
_SAFE_TO_BOOTSTRAP = re.compile(r"^safe_to_bootstrap:\s*\d+\s*$", re.MULTILINE)

# How long a running node's view may take to drop a killed member (the
# inactive timeout plus the view installation), with a margin.
_SETTLE_SECONDS = 20.0
_STOP_SECONDS = 30.0


def find_provider() -> str | None:
    """The Galera 4 provider library, None when Galera is not installed
    (a test may skip on that)."""
    env = os.environ.get("WSREP_PROVIDER")
    for path in ((env,) if env else ()) + _PROVIDERS:
        if Path(path).is_file():
            return path
    return None


class _PortTaken(RuntimeError):
    """A node could not bind one of its ports: another process has it."""


class GaleraNode:
    """One member of the cluster: its directory (datadir, tmpdir, socket, pid
    file, error log) and its four loopback ports: SQL (``port``), group
    communication, incremental (IST) and full (SST) state transfer."""

    def __init__(self, base: Path, index: int) -> None:
        self.index = index
        self.dir = base / f"n{index}"
        self.datadir = self.dir / "data"
        # Its own: a starting server deletes the ``#sql*`` files of its tmpdir,
        # which may belong to another node's running statement.
        self.tmpdir = self.dir / "tmp"
        self.socket = socket_path(self.dir)
        self.pid_file = self.dir / "mariadbd.pid"
        self.log_file = self.dir / "error.log"
        self.grastate = self.datadir / "grastate.dat"
        self.port = self.gcomm_port = self.ist_port = self.sst_port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def pick_ports(self, taken: set[int]) -> None:
        """Four new ports, none of them in ``taken`` (to which they are added):
        ``_free_port`` only tests a port, two calls may give the same one."""
        ports: list[int] = []
        while len(ports) < 4:
            port = _free_port()
            if port not in taken:
                taken.add(port)
                ports.append(port)
        self.port, self.gcomm_port, self.ist_port, self.sst_port = ports

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_size(self) -> int:
        try:
            return self.log_file.stat().st_size
        except OSError:
            return 0

    def log_since(self, offset: int) -> str:
        try:
            with open(self.log_file, "rb") as fh:
                fh.seek(offset)
                return fh.read().decode(errors="replace")
        except OSError:
            return ""


class GaleraCluster:
    """``size`` private Galera nodes on 127.0.0.1. ``base`` must be a short
    path (the Unix sockets inside it must fit in 108 bytes) that the
    ``mysql`` user can reach (every directory above it traversable); the
    cluster chowns ``base`` to ``mysql`` and writes nothing outside it.

    Start and restart nodes from the main thread: only then do they get the
    parent-death signal (see :func:`devtools.mariadb_server._die_with`)."""

    def __init__(self, base: Path, size: int = 3) -> None:
        if size < 1:
            raise ValueError("a cluster needs at least one node")
        found = find_binaries()
        self.mariadbd = found[0] or "mariadbd"
        self.install_db = found[1] or "mariadb-install-db"
        self.provider = find_provider() or _PROVIDERS[0]
        self.base = Path(base)
        self.nodes = [GaleraNode(self.base, i) for i in range(size)]
        self._taken: set[int] = set()
        for node in self.nodes:
            node.pick_ports(self._taken)
        # Hex: nothing in it needs percent-encoding in a URL.
        self.password = secrets.token_hex(16)
        # (uid, gid) to run the servers as: rsync SST fails for a root server.
        self._run_as: tuple[int, int] | None = None
        if os.geteuid() == 0:
            entry = pwd.getpwnam("mysql")
            self._run_as = (entry.pw_uid, entry.pw_gid)
        self._user_created = False
        self._published = False  # a URL with the SQL ports was handed out
        self._names = itertools.count(1)

    # -- lifecycle -------------------------------------------------------------

    def start(self, timeout: float = 90) -> None:
        """Install the datadirs (first call), then bring every node up: when
        none is running, bootstrap a new primary component from the most
        advanced node (node 0 on the first call); then join the others one
        at a time (joins in parallel, each with a state transfer, are
        flaky). Returns when all are Synced in one primary component."""
        deadline = time.monotonic() + timeout
        self._prepare(deadline)
        if not self._running():
            self._bootstrap(deadline)
        else:
            self._require_primary(deadline)
        for i in range(len(self.nodes)):
            if not self.is_running(i):
                self._join(i, deadline)
        self.wait_synced(timeout=self._left(deadline))

    def stop(self) -> None:
        """Clean shutdown of every node (SIGTERM), one after the other, node
        0 last; SIGKILL a node still there after 30 s. One at a time: alone,
        a node leaves in milliseconds, while nodes leaving together wait
        for each other until the suspect timeout (3 s). Node 0 last: the
        last to leave is the one marked safe to bootstrap."""
        for i in reversed(range(len(self.nodes))):
            self.stop_node(i)

    def kill(self, i: int) -> None:
        """A crash of node i: SIGKILL (with its state-transfer helpers, which
        share its process group), then wait for it to be gone."""
        node = self.nodes[i]
        if node.proc is None:
            return
        self._killpg(node)
        node.proc.wait()
        node.proc = None

    def stop_node(self, i: int) -> None:
        """Clean shutdown of node i: it leaves the cluster gracefully, so the
        others keep their quorum (they count the members that are left)."""
        node = self.nodes[i]
        if node.proc is None:
            return
        self._signal(node, signal.SIGTERM)
        self._signal(node, signal.SIGCONT)  # a paused server cannot act on SIGTERM
        self._reap(node, time.monotonic() + _STOP_SECONDS)

    def start_node(self, i: int, timeout: float = 60) -> None:
        """Restart node i after ``kill`` or ``stop_node``: recover its last
        committed position from InnoDB, then start it there so that it
        catches up by incremental transfer (IST), not a full copy. Needs a
        running node in the primary component."""
        deadline = time.monotonic() + timeout
        if self.is_running(i):
            self.wait_synced(i, timeout=self._left(deadline))
            return
        if not self._running():
            raise RuntimeError(f"node {i}: no running node to join; start() bootstraps the cluster")
        self._prepare(deadline)
        self._require_primary(deadline)
        self._join(i, deadline)

    def is_running(self, i: int) -> bool:
        return self.nodes[i].is_running()

    def wait_synced(self, i: int | None = None, timeout: float = 60) -> None:
        """Node i (or every running node) Synced, ready, in the primary
        component, whose size is the number of running nodes (so a killed
        node has been evicted, a restarted one taken in)."""
        targets = [i] if i is not None else self._running()
        if not targets:
            raise RuntimeError("no node is running")
        deadline = time.monotonic() + timeout
        while True:
            for j in targets:
                if not self.is_running(j):
                    raise RuntimeError(f"node {j} is not running:\n{self.log_tail(j)}")
            expected = len(self._running())
            states = {j: self._wsrep_state(j) for j in targets}
            behind = [j for j, state in states.items() if not _synced(state, expected)]
            if not behind:
                return
            if time.monotonic() > deadline:
                j = behind[0]
                raise RuntimeError(
                    f"node {j} not Synced in a cluster of {expected} within {timeout}s"
                    f" ({_summary(states[j])}):\n{self.log_tail(j)}"
                )
            time.sleep(0.1)

    def bootstrap_survivor(self, i: int) -> None:
        """Make node i, left without quorum (non-Primary, error 1047 to every
        query), a primary component of its own without restarting it
        (``pc.bootstrap=YES``). Waits first for its view to drop the dead
        members: right after a kill it is still Primary for a few seconds."""
        deadline = time.monotonic() + _SETTLE_SECONDS + 30
        if not self.is_running(i):
            raise RuntimeError(f"node {i} is not running")
        self._settle(deadline)
        state = self._wsrep_state(i)
        if state is None or state.get("wsrep_cluster_status") != "Primary":
            self.admin(i, "SET GLOBAL wsrep_provider_options='pc.bootstrap=YES'")
        self._wait_state(i, _primary_and_synced, deadline, "Primary and Synced after pc.bootstrap")

    def ensure_healthy(self, timeout: float = 120) -> None:
        """Whatever an earlier test left (killed, stopped, hung or non-Primary
        nodes), every node running and Synced in one primary component. As
        a last resort, the whole cluster down and up again."""
        deadline = time.monotonic() + timeout
        try:
            self._heal(deadline)
        except RuntimeError as exc:
            if self._left(deadline) < 30:
                raise
            print(f"galera_cluster: healing failed, restarting the whole cluster: {exc}", file=sys.stderr)
            for i in self._running():
                self.kill(i)
            self.start(timeout=self._left(deadline))

    def log_tail(self, i: int, lines: int = 40) -> str:
        try:
            text = self.nodes[i].log_file.read_text(errors="replace")
        except OSError:
            return f"(node {i}: no error log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- SQL as root -------------------------------------------------------------

    def _root(
        self, i: int, db: str | None = None, connect_timeout: float = 10, read_timeout: float | None = None
    ) -> pymysql.connections.Connection:
        return pymysql.connect(
            unix_socket=self.nodes[i].socket, user="root", password="", database=db,
            charset="utf8mb4", autocommit=True, connect_timeout=connect_timeout, read_timeout=read_timeout,
        )

    def admin(self, i: int, sql: str, params: Any = None, db: str | None = None) -> list[tuple[Any, ...]]:
        """Run one statement as root on node i over its Unix socket; its rows."""
        conn = self._root(i, db)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return list(cur.fetchall())
        finally:
            conn.close()

    def status(self, i: int, name: str) -> str | None:
        """``SHOW GLOBAL STATUS LIKE name`` on node i; None when the node
        does not answer (down, starting, hung)."""
        found = self._status(i, name)
        return None if found is None else found.get(name)

    def _wsrep_state(self, i: int) -> dict[str, str] | None:
        """Every ``wsrep_%`` status of node i in one round trip; None when it
        does not answer."""
        if not self.is_running(i):
            return None
        return self._status(i, "wsrep\\_%")

    def _status(self, i: int, pattern: str) -> dict[str, str] | None:
        try:
            conn = self._root(i, connect_timeout=2, read_timeout=5)
        except (pymysql.MySQLError, OSError):
            return None
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW GLOBAL STATUS LIKE %s", (pattern,))
                return {str(name): str(value) for name, value in cur.fetchall()}
        except (pymysql.MySQLError, OSError):
            return None
        finally:
            conn.close()

    # -- databases for kmsd --------------------------------------------------------

    def new_database(self, name: str | None = None) -> str:
        """A fresh database that the application user may use, on every node,
        with exactly the production grants; its multi-host URL. Made with
        replicated statements (CREATE DATABASE, CREATE USER, GRANT) on node
        0, or the first Synced node when node 0 is not; returns once every
        Synced node has applied them, so any node accepts the user."""
        name = name or f"kms_g{next(self._names)}"
        if not _NAME.match(name):
            raise ValueError(f"not a plain database name: {name!r}")
        origin = self._origin()
        self.admin(origin, f"CREATE DATABASE `{name}` DEFAULT CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci")
        if not self._user_created:
            for host in APP_HOSTS:
                # ALTER too: a datadir kept from an earlier cluster object
                # may have the user, with another password.
                for verb in ("CREATE USER IF NOT EXISTS", "ALTER USER"):
                    self.admin(origin, f"{verb} '{APP_USER}'@'{host}' IDENTIFIED BY %s", (self.password,))
            self._user_created = True
        for host in APP_HOSTS:
            self.admin(origin, f"GRANT {APP_GRANTS} ON `{name}`.* TO '{APP_USER}'@'{host}'")
        self._await_grants(origin, name)
        return self.url(name)

    def url(self, name: str) -> str:
        """The application's URL naming every node, in index order."""
        return self.node_url(0, name, order=list(range(len(self.nodes))))

    def node_url(self, i: int, name: str, *, order: list[int] | None = None) -> str:
        """The multi-host URL with node i first, then the others in index
        order; or the nodes exactly in ``order`` when given."""
        if order is None:
            order = [i] + [j for j in range(len(self.nodes)) if j != i]
        self._published = True
        hosts = ",".join(f"127.0.0.1:{self.nodes[j].port}" for j in order)
        return f"mysql://{APP_USER}:{quote(self.password, safe='')}@{hosts}/{name}"

    def _origin(self) -> int:
        """Node 0 if it is Synced, else the first node that is."""
        running = self._running()
        for i in sorted(running, key=lambda j: j != 0):
            if _primary_and_synced(self._wsrep_state(i)):
                return i
        raise RuntimeError(f"no Synced node to run the statements on (running: {running})")

    def _await_grants(self, origin: int, name: str) -> None:
        """Every other Synced node has applied the grants on ``name``: a read
        with ``wsrep_sync_wait`` waits for the node's applier to catch up
        with the cluster, a short poll covers whatever it does not."""
        for i in self._running():
            if i == origin or not _primary_and_synced(self._wsrep_state(i)):
                continue
            deadline = time.monotonic() + 30
            conn = self._root(i, read_timeout=30)
            try:
                with conn.cursor() as cur:
                    cur.execute("SET SESSION wsrep_sync_wait=1")
                    while True:
                        cur.execute("SELECT COUNT(*) FROM mysql.db WHERE Db=%s AND User=%s", (name, APP_USER))
                        row = cur.fetchone()
                        if row is not None and int(row[0]) >= len(APP_HOSTS):
                            break
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"node {i} has not applied the grants on {name}")
                        time.sleep(0.05)
            finally:
                conn.close()

    # -- internals: preparing and spawning ------------------------------------------

    def _prepare(self, deadline: float) -> None:
        """The directories, owned by the server's user, and a datadir for
        every node that has none yet (installed in parallel)."""
        self.base.mkdir(parents=True, exist_ok=True)
        self._check_reachable()
        for node in self.nodes:
            node.dir.mkdir(exist_ok=True)
            node.tmpdir.mkdir(exist_ok=True)
        self._chown(self.base, *(n.dir for n in self.nodes), *(n.tmpdir for n in self.nodes))
        fresh = [node for node in self.nodes if not (node.datadir / "mysql").is_dir() and not node.is_running()]
        installs = [(node, self._install(node)) for node in fresh]
        for node, proc in installs:
            try:
                out, _ = proc.communicate(timeout=max(1.0, self._left(deadline)))
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(
                    f"node {node.index}: mariadb-install-db failed ({proc.returncode}):\n"
                    f"{out.decode(errors='replace')}"
                )

    def _install(self, node: GaleraNode) -> subprocess.Popen[bytes]:
        if node.datadir.exists():
            shutil.rmtree(node.datadir)
        args = [
            self.install_db, "--no-defaults", f"--datadir={node.datadir}",
            "--auth-root-authentication-method=normal", "--skip-test-db",
            # Passed on to mariadbd: the installs run in parallel, and one
            # would delete the other's temporary tables in a shared /tmp.
            f"--tmpdir={node.tmpdir}",
        ]
        if self._run_as is not None:
            args.append("--user=mysql")
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def _check_reachable(self) -> None:
        """The ``mysql`` user can reach ``base``: a directory above it that
        it may not traverse (a 0700 tempdir of root's) fails every node with
        an obscure permission error."""
        if self._run_as is None:
            return
        uid, gid = self._run_as
        for parent in self.base.resolve().parents:
            st = parent.stat()
            if not (
                st.st_mode & 0o001
                or (st.st_uid == uid and st.st_mode & 0o100)
                or (st.st_gid == gid and st.st_mode & 0o010)
            ):
                raise RuntimeError(f"{parent} is not traversable by the mysql user: no node could reach {self.base}")

    def _chown(self, *paths: Path) -> None:
        if self._run_as is not None:
            for path in paths:
                os.chown(path, *self._run_as)

    def _server_args(self, node: GaleraNode) -> list[str]:
        options = "; ".join(
            (f"gmcast.listen_addr=tcp://127.0.0.1:{node.gcomm_port}", f"ist.recv_addr=127.0.0.1:{node.ist_port}")
            + _EVS_TIMEOUTS
            # A restarted node may serve IST from what it had cached before.
            + ("gcache.recover=yes",)
        )
        members = ",".join(f"127.0.0.1:{n.gcomm_port}" for n in self.nodes)
        return [
            self.mariadbd, "--no-defaults",
            f"--datadir={node.datadir}", f"--tmpdir={node.tmpdir}", f"--socket={node.socket}",
            f"--port={node.port}", "--bind-address=127.0.0.1",
            f"--pid-file={node.pid_file}", f"--log-error={node.log_file}",
            "--innodb-buffer-pool-size=64M",
            "--character-set-server=utf8mb4", "--collation-server=utf8mb4_general_ci",
            # TCP clients are matched by address ('kmsd'@'127.0.0.1').
            "--skip-name-resolve",
            "--binlog-format=ROW", "--default-storage-engine=InnoDB", "--innodb-autoinc-lock-mode=2",
            "--wsrep-on=ON", f"--wsrep-provider={self.provider}", f"--wsrep-provider-options={options}",
            "--wsrep-cluster-name=kmsd_test", f"--wsrep-node-name=n{node.index}",
            "--wsrep-node-address=127.0.0.1", f"--wsrep-node-incoming-address=127.0.0.1:{node.port}",
            f"--wsrep-cluster-address=gcomm://{members}",
            "--wsrep-sst-method=rsync", f"--wsrep-sst-receive-address=127.0.0.1:{node.sst_port}",
        ]

    def _spawn(self, node: GaleraNode, args: list[str]) -> subprocess.Popen[bytes]:
        """A child in a process group of its own (its SST script and rsync
        daemon join it, so ``kill`` takes them too), running as the
        ``mysql`` user, with the parent-death signal set *after* the
        privileges were dropped (a credential change clears it). The signal
        fires when the thread that forked exits: only a child forked from
        the main thread gets it."""
        parent = os.getpid()
        main = threading.current_thread() is threading.main_thread()
        run_as = self._run_as

        def before_exec() -> None:
            os.setpgid(0, 0)
            if run_as is not None:
                os.setgroups([])
                os.setgid(run_as[1])
                os.setuid(run_as[0])
            if main:
                _die_with(parent)

        return subprocess.Popen(
            args, cwd=node.dir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=before_exec,  # noqa: PLW1509 - only setpgid, setuid and prctl, no locks
        )

    # -- internals: starting nodes ----------------------------------------------------

    def _bootstrap(self, deadline: float) -> None:
        """A new primary component from the most advanced node (node 0 when
        none has ever been in the cluster): its ``grastate.dat`` marked safe
        to bootstrap, started with ``--wsrep-new-cluster``."""
        members = [node.index for node in self.nodes if node.grastate.exists()]
        if not members:
            self._launch(0, new_cluster=True, position=None, deadline=deadline)
            self.wait_synced(0, timeout=self._left(deadline))
            return
        positions = self._recover(members, deadline)

        def rank(i: int) -> tuple[int, int, int]:
            position = positions[i]
            seqno = int(position.rsplit(":", 1)[1]) if position else -1
            return (seqno, int(_grastate_safe(self.nodes[i])), -i)

        best = max(members, key=rank)
        _mark_safe_to_bootstrap(self.nodes[best])
        self._launch(best, new_cluster=True, position=positions[best], deadline=deadline)
        self.wait_synced(best, timeout=self._left(deadline))

    def _join(self, i: int, deadline: float) -> None:
        """Start node i into the running primary component, from its recovered
        position when it has been a member (IST), else by full copy (SST)."""
        node = self.nodes[i]
        position = self._recover([i], deadline)[i] if node.grastate.exists() else None
        self._launch(i, new_cluster=False, position=position, deadline=deadline)
        self.wait_synced(i, timeout=self._left(deadline))

    def _recover(self, indices: list[int], deadline: float) -> dict[int, str | None]:
        """``mariadbd --wsrep-recover`` for each node (in parallel): the
        ``uuid:seqno`` of its last committed transaction, from InnoDB (after
        a kill, ``grastate.dat`` says seqno -1); None when unknown."""
        runs = []
        for i in indices:
            node = self.nodes[i]
            offset = node.log_size()
            runs.append((node, offset, self._spawn(node, self._server_args(node) + ["--wsrep-recover"])))
        positions: dict[int, str | None] = {}
        for node, offset, proc in runs:
            try:
                proc.wait(max(1.0, self._left(deadline)))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                tail = self.log_tail(node.index)
                raise RuntimeError(f"node {node.index}: --wsrep-recover timed out:\n{tail}") from None
            found = _RECOVERED.findall(node.log_since(offset))
            if proc.returncode != 0 or not found:
                raise RuntimeError(
                    f"node {node.index}: --wsrep-recover failed ({proc.returncode}):\n{self.log_tail(node.index)}"
                )
            uuid, seqno = found[-1]
            positions[node.index] = f"{uuid}:{seqno}" if int(seqno) >= 0 else None
        return positions

    def _launch(self, i: int, *, new_cluster: bool, position: str | None, deadline: float) -> None:
        """Start node i's server and wait until root can connect. Until a URL
        naming the SQL ports has been handed out, ports that another process
        took meanwhile are replaced by new ones."""
        for _ in range(5):
            try:
                return self._launch_once(i, new_cluster=new_cluster, position=position, deadline=deadline)
            except _PortTaken:
                if self._published:
                    raise RuntimeError(f"node {i}: one of its ports is taken:\n{self.log_tail(i)}") from None
                self.nodes[i].pick_ports(self._taken)
        raise RuntimeError(f"node {i}: no free ports")

    def _launch_once(self, i: int, *, new_cluster: bool, position: str | None, deadline: float) -> None:
        node = self.nodes[i]
        args = self._server_args(node)
        if new_cluster:
            args.append("--wsrep-new-cluster")
        if position is not None:
            args.append(f"--wsrep-start-position={position}")
        offset = node.log_size()
        node.proc = proc = self._spawn(node, args)
        while True:
            if proc.poll() is not None:
                node.proc = None
                this_start = node.log_since(offset)
                if "Address already in use" in this_start:
                    raise _PortTaken(this_start)
                raise RuntimeError(f"node {i}: mariadbd exited ({proc.returncode}) while starting:\n{self.log_tail(i)}")
            try:
                self._root(i, connect_timeout=1).close()
                return
            except (pymysql.MySQLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.kill(i)
                raise RuntimeError(f"node {i}: mariadbd not ready in time:\n{self.log_tail(i)}")
            time.sleep(0.05)

    # -- internals: views and states ----------------------------------------------------

    def _running(self) -> list[int]:
        return [node.index for node in self.nodes if node.is_running()]

    @staticmethod
    def _left(deadline: float) -> float:
        return max(0.0, deadline - time.monotonic())

    def _settle(self, deadline: float) -> None:
        """Wait (a bounded time) until no running node's primary view still
        counts a dead member: a killed node stays in the view until the
        others time it out, and a node joining meanwhile, or a
        ``pc.bootstrap``, would act on the stale view."""
        until = min(deadline, time.monotonic() + _SETTLE_SECONDS)
        while time.monotonic() < until:
            running = self._running()
            states = [self._wsrep_state(i) for i in running]
            if all(state is not None and _settled(state, len(running)) for state in states):
                return
            time.sleep(0.1)

    def _require_primary(self, deadline: float) -> None:
        """A running node is in the primary component, for a node to join."""
        self._settle(deadline)
        running = self._running()
        if not any(_primary(self._wsrep_state(i)) for i in running):
            raise RuntimeError(
                f"no running node (of {running}) is in the primary component: bootstrap_survivor() one"
                " (or ensure_healthy()) first"
            )

    def _wait_state(
        self, i: int, check: Callable[[dict[str, str] | None], bool], deadline: float, what: str
    ) -> None:
        while True:
            state = self._wsrep_state(i)
            if check(state):
                return
            if not self.is_running(i):
                raise RuntimeError(f"node {i} is not running:\n{self.log_tail(i)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {i} not {what} in time ({_summary(state)}):\n{self.log_tail(i)}")
            time.sleep(0.1)

    def _heal(self, deadline: float) -> None:
        for i in self._running():
            self._signal(self.nodes[i], signal.SIGCONT)  # a paused node answers nothing
            if self._wsrep_state(i) is None:
                self.kill(i)  # hung, or half started
        running = self._running()
        if not running:
            self.start(timeout=self._left(deadline))
            return
        self._settle(deadline)
        states = {i: self._wsrep_state(i) for i in running}
        if not any(_primary(state) for state in states.values()):
            best = max(running, key=lambda i: int((states[i] or {}).get("wsrep_last_committed", "-1")))
            self.bootstrap_survivor(best)
        for i in range(len(self.nodes)):
            if not self.is_running(i):
                self._join(i, deadline)
        self.wait_synced(timeout=self._left(deadline))

    # -- internals: signals ----------------------------------------------------------------

    @staticmethod
    def _signal(node: GaleraNode, sig: int) -> None:
        if node.is_running():
            assert node.proc is not None
            node.proc.send_signal(sig)

    @staticmethod
    def _killpg(node: GaleraNode) -> None:
        assert node.proc is not None
        try:
            os.killpg(node.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _reap(self, node: GaleraNode, deadline: float) -> None:
        """Wait for a signalled node until ``deadline``, then SIGKILL it."""
        assert node.proc is not None
        try:
            node.proc.wait(self._left(deadline))
        except subprocess.TimeoutExpired:
            self._killpg(node)
            node.proc.wait()
        node.proc = None


def _primary(state: dict[str, str] | None) -> bool:
    return state is not None and state.get("wsrep_cluster_status") == "Primary"


def _primary_and_synced(state: dict[str, str] | None) -> bool:
    return (
        _primary(state)
        and state is not None
        and state.get("wsrep_local_state_comment") == "Synced"
        and state.get("wsrep_ready") == "ON"
    )


def _synced(state: dict[str, str] | None, size: int) -> bool:
    return _primary_and_synced(state) and state is not None and state.get("wsrep_cluster_size") == str(size)


def _settled(state: dict[str, str], running: int) -> bool:
    """The node's view no longer counts more members than are running (or it
    has already lost its primary view: that view change is the one)."""
    return not _primary(state) or int(state.get("wsrep_cluster_size", "0")) <= running


def _summary(state: dict[str, str] | None) -> str:
    if state is None:
        return "not answering"
    keys = ("wsrep_cluster_status", "wsrep_local_state_comment", "wsrep_cluster_size", "wsrep_ready")
    return ", ".join(f"{key[6:]}={state.get(key)}" for key in keys)


def _grastate_safe(node: GaleraNode) -> bool:
    try:
        return "safe_to_bootstrap: 1" in node.grastate.read_text()
    except OSError:
        return False


def _mark_safe_to_bootstrap(node: GaleraNode) -> None:
    """Galera refuses ``--wsrep-new-cluster`` on a node that was not the last
    to leave (``safe_to_bootstrap: 0``): we chose it as the most advanced.
    Rewritten in place, so the file keeps its owner."""
    text = node.grastate.read_text()
    if _SAFE_TO_BOOTSTRAP.search(text):
        text = _SAFE_TO_BOOTSTRAP.sub("safe_to_bootstrap: 1", text)
    else:
        text = text.rstrip("\n") + "\nsafe_to_bootstrap: 1\n"
    node.grastate.write_text(text)
