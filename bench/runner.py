#!/usr/bin/env python3
"""The benchmark run behind ``bench/run`` (see bench/README.md).

Starts kmsd (--dev, fresh temporary SQLite database) and bench/baseline.py
on free loopback ports and Unix sockets in a temporary directory, runs every
point with bench/load.py (kmsd and baseline interleaved, point by point, so
that each ratio compares two measurements taken at the same moment: writes,
reads, data keys and, on the first leg, batch unwraps), measures the
client-side envelope with bench/envelope_bench.py, soaks
the SQLite daemon with reads while sampling its memory, then runs the same
points against MariaDB (a private server it starts, when the binaries are
there, or --mysql URL), then measures three daemons on a private 3-node
Galera cluster at once (with and without wsrep_sync_wait; --galera), and
writes Markdown, JSON and a PNG chart to bench/results/. Everything it
starts is stopped on exit, on Ctrl-C, on SIGTERM/SIGHUP and on failure.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import ctypes
import datetime as dt
import http.client
import json
import math
import os
import platform
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PY = sys.executable
LOAD = str(BENCH / "load.py")
FLOOD = str(BENCH / "flood.py")
# The read-flood point: Unix-socket reads at this concurrency while this
# many TCP connections present invalid tokens (issue 14: the legitimate
# client should keep at least 40% of its unloaded rate).
FLOOD_CONC = 16
FLOOD_CONNECTIONS = 32

WRITE_CONC = (1, 16, 64)
READ_CONC = (16, 64, 256)
LISTENERS = ("unix", "tcp")
# The cold-token read: one point, before the warm reads of each listener.
COLD_CONC = 64
# At most this many cold tokens per point. kmsd's token cache holds 50,000
# by default and, once full, admits nothing until entries expire: two
# listeners' cold points must leave room for the warm working sets after
# them, or the warm reads of the second listener would be cold too.
COLD_MAX_TOKENS = 20_000
# The memory soak (end of the SQLite leg): read load and RSS sampling.
SOAK_CONC = 64
SOAK_EVERY = 10.0
MYSQL_DATABASE = "kmsd_bench"
# The Galera leg: a private cluster of this many nodes, one daemon per node,
# GALERA_CONC connections in total split over the daemons (22 + 21 + 21),
# once with kmsd's default wsrep_sync_wait=1 (read-your-writes across
# nodes), once with ?wsrep_sync_wait=0 (without).
GALERA_NODES = 3
GALERA_CONC = 64
GALERA_SYNC_WAITS = (1, 0)
# Data keys: POST /api/datakey, one key per request, with the warm tokens
# of the read points, on both listeners of every leg; c=64 only with --quick.
DATAKEY_CONC = (1, 16, 64)
DATAKEY_CONC_QUICK = (64,)
DATAKEY_TARGET = 0.3  # issue 17: at least 0.3 of the baseline at c=64
# Batch unwrap: POST /api/decrypt-dek with {"batch": [BATCH_SIZE items]}
# (kmsd's MAX_BATCH), over the Unix socket of the first leg only (a batch
# asks the store once, for its token: the database hardly matters), without
# and with a context per item.
BATCH_SIZE = 1000
BATCH_CONC = (1, 2, 4)
BATCH_CONC_QUICK = (1, 4)
BATCH_TARGET = 100_000  # DEKs/s on the 2-core machine
# The client-side envelope (kmsd_client.envelope) of one document of this
# size, sealed and opened on disk and in memory (bench/envelope_bench.py),
# against the first leg's daemon.
ENVELOPE_MIB = 1024
ENVELOPE_MIB_QUICK = 256
ENVELOPE_TARGET = 500  # MB/s
ENVELOPE = str(BENCH / "envelope_bench.py")


# -- small helpers ----------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 2.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def ready(sock_path: str, path: str = "/readyz") -> bool:
    try:
        conn = UnixHTTPConnection(sock_path)
        conn.request("GET", path)
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


def _pdeathsig() -> None:
    """Child side, before exec: die with the runner even if it is SIGKILLed."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) in KiB."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of a process (all threads), in seconds."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def children_of(pid: int) -> list[int]:
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [int(x) for x in out.split()]


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def mask_url(url: str) -> str:
    """The URL without its password, for logs and reports."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(":" + parts.password + "@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = git("rev-parse", "--short", "HEAD") or "nogit"
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    versions = {}
    for mod in ("aiohttp", "uvloop", "aiosqlite", "cryptography", "structlog"):
        with contextlib.suppress(Exception):
            versions[mod] = __import__(mod).__version__
    mem = ""
    with contextlib.suppress(OSError):
        mem = next(line.split(":", 1)[1].strip() for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "memory": mem,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "commit": commit,
        "dirty": dirty,
        "versions": versions,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "nofile_limit": list(__import__("resource").getrlimit(__import__("resource").RLIMIT_NOFILE)),
    }


# -- the processes the run starts ----------------------------------------------------------


class Managed:
    """A started server process, stopped by ``stop()`` whatever happens."""

    def __init__(self, name: str, argv: list[str], logfile: Path, env: dict[str, str], cwd: Path) -> None:
        self.name = name
        self.logfile = logfile
        self._fh = open(logfile, "wb")
        # Own session: Ctrl-C in the terminal reaches the runner, which then
        # stops the servers with SIGTERM in order (and reports how that went).
        self.proc = subprocess.Popen(
            argv, stdout=self._fh, stderr=subprocess.STDOUT, env=env, cwd=cwd,
            start_new_session=True, preexec_fn=_pdeathsig,
        )
        self.children: list[int] = []  # e.g. the vault, remembered for cleanup
        self.exit_code: int | None = None
        self.stop_seconds: float | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def remember_children(self) -> list[int]:
        kids = children_of(self.pid) if self.alive() else []
        for k in kids:
            if k not in self.children:
                self.children.append(k)
        return kids

    def stop(self, timeout: float = 15.0) -> None:
        if self.alive():
            self.remember_children()
            t = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
                self.stop_seconds = round(time.monotonic() - t, 2)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not stop within {timeout:.0f}s of SIGTERM: SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait(5)
        self.exit_code = self.proc.returncode
        # Children (the vault) should leave with their parent; if one is
        # still there, it is one we started: end it by its pid.
        deadline = time.monotonic() + 5
        for kid in self.children:
            while time.monotonic() < deadline and Path(f"/proc/{kid}").exists() and "kmsd" in cmdline(kid):
                time.sleep(0.1)
            if Path(f"/proc/{kid}").exists() and "kmsd" in cmdline(kid):
                log(f"{self.name}: child {kid} still running after its parent stopped: SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(kid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            self._fh.close()


class Stoppable(Protocol):
    """What the cleanup stack holds: anything the run started."""

    name: str

    def stop(self) -> None: ...


class PrivateMariaDB:
    """The MariaDB leg's own server: devtools/mariadb_server.py's MariaDBServer (its
    own datadir, socket and loopback port) under the run's temporary
    directory, so the leg needs no database set up beforehand and touches
    no system MariaDB."""

    name = "mariadb"

    def __init__(self, module: Any, base: Path) -> None:
        self.server = module.MariaDBServer(base)

    def start(self) -> None:
        self.server.install()
        self.server.start()

    def stop(self) -> None:
        self.server.stop()


def mariadb_module() -> tuple[Any | None, str]:
    """devtools/mariadb_server.py, when the MariaDB server binaries are installed; else
    None and why not. The same discovery as the tests, so the bench and the
    tests agree on whether MariaDB is there."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        import devtools.mariadb_server as module  # needs pymysql, a kmsd dependency
    except ImportError as exc:
        return None, f"cannot import devtools/mariadb_server.py ({exc})"
    mariadbd, install_db = module.find_binaries()
    missing = [name for name, path in (("mariadbd", mariadbd), ("mariadb-install-db", install_db)) if not path]
    if missing:
        return None, (f"{' and '.join(missing)} not found on PATH or in /usr/sbin "
                      "(sudo apt-get install mariadb-server; no running service is needed)")
    return module, ""


def mysql_server_info(url: str, origin: str) -> dict[str, str]:
    """How the leg reaches its server, and the server's SELECT VERSION()
    (best effort: the leg runs anyway, kmsd reports its own errors)."""
    parts = urlsplit(url)
    sock = parse_qs(parts.query).get("unix_socket", [None])[0]
    transport = f"Unix socket {sock}" if sock else f"TCP {parts.hostname}:{parts.port or 3306}"
    try:
        import pymysql

        conn = pymysql.connect(
            host=parts.hostname or "localhost", port=parts.port or 3306, unix_socket=sock,
            user=unquote(parts.username or ""), password=unquote(parts.password or ""),
            database=unquote(parts.path.lstrip("/")) or None, connect_timeout=5,
        )
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT VERSION()")
                version = str(cur.fetchone()[0])
        finally:
            conn.close()
    except Exception as exc:  # noqa: BLE001 - best effort; the error names user and host, never the password
        version = f"version unknown ({type(exc).__name__}: {str(exc)[:120]})"
    return {"origin": origin, "transport": transport, "version": version}


def mysql_database(args: argparse.Namespace, tmp: Path, stack: list[Stoppable]) -> tuple[str | None, dict[str, Any]]:
    """The MariaDB leg's database URL and what to say about its server;
    None with {"skipped": why} or {"failed": what} when there is no leg."""
    if args.mysql != "auto":
        return args.mysql, mysql_server_info(args.mysql, "given by --mysql")
    module, why = mariadb_module()
    if module is None:
        log(f"MariaDB leg skipped: {why}")
        return None, {"skipped": why}
    private = PrivateMariaDB(module, tmp / "my")
    stack.append(private)  # before it starts: stopped whatever happens from here on
    log(f"starting a private MariaDB server in {private.server.base}")
    try:
        private.start()
        tcp_url = private.server.new_database(MYSQL_DATABASE)
    except Exception as exc:  # noqa: BLE001 - install or start failed: the leg fails, the rest of the run stands
        log(f"private MariaDB server did not start: {exc}")
        return None, {"failed": f"private MariaDB server did not start: {exc}"}
    url = tcp_url if args.mysql_tcp else private.server.socket_url(MYSQL_DATABASE)
    return url, mysql_server_info(url, "private server started by the run (devtools/mariadb_server.py)")


def wait_ready(server: Managed, sock_path: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode} before it was ready:\n"
                               + tail(server.logfile))
        if ready(sock_path):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{server.name} not ready after {timeout:.0f}s:\n" + tail(server.logfile))


def tail(path: Path, n: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    return ""


def memory_snapshot(server: Managed) -> dict[str, Any]:
    kids = server.remember_children()
    return {
        "daemon": {"pid": server.pid, **proc_status(server.pid)},
        "children": [{"pid": k, "cmd": cmdline(k)[:80], **proc_status(k)} for k in kids],
    }


def scan_log(path: Path) -> dict[str, Any]:
    """Counts of log levels and of non-request events (never prints values)."""
    levels: dict[str, int] = {}
    events: dict[str, int] = {}
    statuses: dict[str, int] = {}
    unparsed = 0
    with contextlib.suppress(OSError), open(path, errors="replace") as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except ValueError:
                unparsed += 1
                continue
            if not isinstance(rec, dict):
                unparsed += 1
                continue
            lvl = str(rec.get("level", "?"))
            levels[lvl] = levels.get(lvl, 0) + 1
            ev = str(rec.get("event", "?"))
            if ev == "request":
                st = str(rec.get("status"))
                statuses[st] = statuses.get(st, 0) + 1
            else:
                events[ev] = events.get(ev, 0) + 1
    return {"levels": levels, "events": events, "request_statuses": statuses, "unparsed_lines": unparsed}


# -- points ------------------------------------------------------------------------------------


def run_point(
    *, target: str, address: str, listener: str, mode: str, conc: int, args: argparse.Namespace,
    tmp: Path, tokens: Path | None, save_tokens: Path | None, verify: bool, cpu_pids: dict[str, int | None],
) -> dict[str, Any]:
    out = tmp / f"point-{time.monotonic_ns()}.json"
    argv = [PY, LOAD, f"--{listener}", address, "--json", str(out), "--quiet", "--label", target,
            "--timeout", str(args.request_timeout)]
    warmup = 0.0 if mode in ("burst", "read-cold") else args.warmup
    load_mode = {"read-cold": "read", "read-flood": "read", "batch-unwrap-context": "batch-unwrap"}.get(mode, mode)
    if mode == "burst":
        argv += ["--mode", "burst", "--burst", str(args.burst), "--timeout", str(args.burst_timeout)]
        limit = args.burst_timeout + 120
    else:
        argv += ["--mode", load_mode, "--concurrency", str(conc),
                 "--duration", str(args.duration), "--warmup", str(warmup),
                 "--procs", str(args.procs if conc >= 16 else 1)]
        if load_mode == "batch-unwrap":
            argv += ["--batch-size", str(BATCH_SIZE)] + (["--context"] if mode == "batch-unwrap-context" else [])
        elif load_mode in ("read", "datakey") and mode != "read-cold":
            if tokens and tokens.exists():
                # the warm working set: the first --read-users tokens, over and over
                argv += ["--tokens", str(tokens), "--max-tokens", str(args.read_users)]
            else:
                argv += ["--seed", "1000"]
        elif mode == "read-cold":
            # the tokens after the working set, each at most once (load.py
            # splits them between its processes without overlap); no warm-up,
            # which would spend tokens uncounted; bounded by time as well
            cold = cold_token_count(tokens, args.read_users)
            argv += ["--tokens", str(tokens), "--skip-tokens", str(args.read_users),
                     "--max-tokens", str(cold), "--max-requests", str(cold)]
        if save_tokens:
            argv += ["--save-tokens", str(save_tokens)]
        limit = args.duration + warmup + 180
    if not verify:
        argv.append("--no-verify")
    cpu0 = {k: cpu_seconds(p) for k, p in cpu_pids.items()}
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=limit, preexec_fn=_pdeathsig)
    except subprocess.TimeoutExpired:
        return {"target": target, "listener": listener, "mode": mode, "concurrency": conc,
                "failed_to_run": f"load.py did not finish in {limit:.0f}s"}
    cpu1 = {k: cpu_seconds(p) for k, p in cpu_pids.items()}
    if not out.exists():
        return {"target": target, "listener": listener, "mode": mode, "concurrency": conc,
                "failed_to_run": f"load.py exit {proc.returncode}: {proc.stderr.strip()[-500:]}"}
    doc = json.loads(out.read_text())
    r = next(x for x in doc["results"] if x["mode"] in ("write", "read", "burst", "datakey", "batch-unwrap"))
    r["target"] = target
    r["mode"] = mode  # read-cold and read-flood are load.py's read, batch-unwrap-context its batch-unwrap
    r["warmup_s"] = warmup
    if proc.returncode not in (0, 3):
        r["load_exit"] = proc.returncode
    for k in cpu_pids:
        if cpu0.get(k) is not None and cpu1.get(k) is not None:
            used = cpu1[k] - cpu0[k]
            r[f"cpu_{k}_s"] = round(used, 2)
            # share of one core over the whole point (incl. warmup, seeding)
    return r


def cold_token_count(tokens: Path | None, read_users: int) -> int:
    """How many tokens the cold-token point reads: those after the warm
    working set, at most COLD_MAX_TOKENS."""
    if not tokens or not tokens.exists():
        return 0
    with open(tokens) as fh:
        saved = sum(1 for line in fh if line.strip())
    return max(0, min(saved - read_users, COLD_MAX_TOKENS))


def short(r: dict[str, Any]) -> str:
    if "failed_to_run" in r:
        return f"{r['target']:<14} {r['listener']:<4} {r['mode']:<9} c={r['concurrency']:<4} FAILED: {r['failed_to_run']}"
    errs = ",".join(f"{k}:{v}" for k, v in r.get("errors", {}).items()) or "-"
    line = (f"{r['target']:<14} {r['listener']:<4} {r['mode']:<9} c={r['concurrency']:<4} "
            f"{r['rps']:>9.1f} req/s  p50 {r['p50_ms']:>8.2f}  p99 {r['p99_ms']:>8.2f}  max {r['max_ms']:>8.2f} ms"
            f"  ok {r['ok']}/{r['requests']}  errors {errs}  mismatches {r['mismatches']}")
    if "items_per_s" in r:
        item_errs = ",".join(f"{k}:{v}" for k, v in r.get("item_errors", {}).items()) or "-"
        line += f"  DEKs/s {r['items_per_s']:.0f}  item errors {item_errs}"
        if "context_bound" in r:
            line += f"  context bound {r['context_bound']} {r.get('context_check')}"
    return line


def run_leg(
    leg: str, database_url: str, args: argparse.Namespace, tmp: Path, baseline: Managed | None,
    base_addr: dict[str, str], env: dict[str, str], results: list[dict[str, Any]], legs: list[dict[str, Any]],
    stack: list[Stoppable], server_info: dict[str, str] | None = None, extras: bool = False,
) -> None:
    """One daemon on one database: every point on both listeners, the burst,
    (SQLite) the soak, the rotation; with ``extras`` (the first leg run) also
    the batch-unwrap points and the client-side envelope."""
    sock = str(tmp / f"{leg}.sock")
    port = free_port()
    argv = [str(Path(PY).parent / "kmsd"), "serve", "--dev", "--socket", sock,
            "--listen", f"127.0.0.1:{port}", "--database", database_url]
    log(f"starting kmsd ({leg}): {' '.join(argv[1:-1] + [mask_url(database_url)])}")
    daemon = Managed(f"kmsd-{leg}", argv, tmp / f"kmsd-{leg}.log", env, tmp)
    stack.append(daemon)
    info: dict[str, Any] = {"leg": leg, "database": mask_url(database_url),
                            "socket": sock, "tcp": f"127.0.0.1:{port}"}
    if server_info:
        info["server"] = server_info
    legs.append(info)
    t = time.monotonic()
    try:
        wait_ready(daemon, sock)
    except RuntimeError as exc:
        info["failed"] = str(exc)
        log(f"kmsd ({leg}) did not start: {exc}")
        daemon.stop()
        info["exit_code"] = daemon.exit_code
        return
    info["startup_s"] = round(time.monotonic() - t, 2)
    with contextlib.suppress(OSError):
        info["nofile_limit"] = next(line.split()[3:5] for line in open(f"/proc/{daemon.pid}/limits")
                                    if line.startswith("Max open files"))
    info["memory_before"] = memory_snapshot(daemon)
    addr = {"unix": sock, "tcp": f"127.0.0.1:{port}"}
    target = f"kmsd-{leg}"
    vault = info["memory_before"]["children"][0]["pid"] if info["memory_before"]["children"] else None
    kmsd_cpu = {"daemon": daemon.pid, "vault": vault}
    base_cpu = {"baseline": baseline.pid} if baseline else {}

    def point(listener: str, mode: str, conc: int, tokens: Path | None = None, save: Path | None = None) -> None:
        if not daemon.alive():
            raise DaemonDied()
        flood = None
        if mode == "read-flood":
            flood = subprocess.Popen([PY, FLOOD, "--tcp", addr["tcp"], "--connections", str(FLOOD_CONNECTIONS),
                                      "--duration", str(args.duration + args.warmup + 180)],
                                     stdout=subprocess.PIPE, text=True, preexec_fn=_pdeathsig)
            time.sleep(1.0)  # the flood is on before the reads start
        try:
            r = run_point(target=target, address=addr[listener], listener=listener, mode=mode, conc=conc, args=args,
                          tmp=tmp, tokens=tokens, save_tokens=save, verify=True, cpu_pids=kmsd_cpu)
        finally:
            if flood is not None:
                flood.terminate()
                out, _ = flood.communicate(timeout=30)
        if flood is not None:
            with contextlib.suppress(ValueError):
                r["flood"] = json.loads(out)
            # The TCP side as a whole was over its limit: its connections
            # stay paused until the Retry-After (a second or two). The next
            # points must not measure that.
            time.sleep(3.0)
        r["leg"] = leg
        results.append(r)
        log(short(r) + (f"  flood {r['flood']}" if "flood" in r else ""))
        if not daemon.alive():
            info["died"] = f"exit code {daemon.proc.returncode} during {listener} {mode} c={conc}"
            log(f"kmsd ({leg}) DIED during {listener} {mode} c={conc}:\n{tail(daemon.logfile)}")
            raise DaemonDied()
        if baseline and not args.no_baseline and mode != "read-flood":
            b = run_point(target="baseline", address=base_addr[listener], listener=listener, mode=mode, conc=conc,
                          args=args, tmp=tmp, tokens=tokens, save_tokens=None, verify=False, cpu_pids=base_cpu)
            b["leg"] = leg
            results.append(b)
            log(short(b))

    try:
        for listener in LISTENERS:
            tokens = tmp / f"tokens-{leg}-{listener}.jsonl"
            for c in WRITE_CONC:
                point(listener, "write", c, save=tokens if c == max(WRITE_CONC) else None)
            # Cold before warm: the warm points touch only the first
            # --read-users tokens, the cold one only those after them.
            if cold_token_count(tokens, args.read_users):
                point(listener, "read-cold", COLD_CONC, tokens=tokens)
            else:
                log(f"{listener} read-cold skipped: the write c={max(WRITE_CONC)} point saved no more than "
                    f"--read-users {args.read_users} tokens")
            for c in READ_CONC:
                point(listener, "read", c, tokens=tokens)
            if not args.no_datakey:  # the same warm tokens as the reads
                for c in DATAKEY_CONC_QUICK if args.quick else DATAKEY_CONC:
                    point(listener, "datakey", c, tokens=tokens)
            if listener == "unix" and leg == "sqlite":
                point(listener, "read-flood", FLOOD_CONC, tokens=tokens)
        if extras and not args.no_batch:
            for mode in ("batch-unwrap", "batch-unwrap-context"):
                for c in BATCH_CONC_QUICK if args.quick else BATCH_CONC:
                    point("unix", mode, c)
        if not args.no_burst:
            for listener in LISTENERS:
                point(listener, "burst", args.burst)
        if extras and not args.no_envelope:
            info["envelope"] = run_envelope(sock, args, tmp)
            log(f"envelope ({leg}): {envelope_line(info['envelope'])}")
        if leg == "sqlite" and args.soak > 0:
            info["soak"] = run_soak(daemon, vault, sock, [tmp / f"tokens-{leg}-{x}.jsonl" for x in LISTENERS],
                                    args, tmp)
            log(f"soak ({leg}): {soak_line(info['soak'])}")
            if not daemon.alive():
                info["died"] = f"exit code {daemon.proc.returncode} during the memory soak"
                log(f"kmsd ({leg}) DIED during the memory soak:\n{tail(daemon.logfile)}")
                raise DaemonDied()
        if not args.no_rewrap:
            info["rewrap"] = measure_rewrap(sock)
            log(f"rewrap ({leg}): {info['rewrap']}")
    except DaemonDied:
        info.setdefault("died", f"exit code {daemon.proc.returncode}")
    info["memory_after"] = memory_snapshot(daemon) if daemon.alive() else None
    log(f"stopping kmsd ({leg})")
    daemon.stop()
    info["exit_code"] = daemon.exit_code
    info["stop_seconds"] = daemon.stop_seconds
    info["log"] = scan_log(daemon.logfile)
    info["log_file_lines"] = sum(info["log"]["levels"].values()) + info["log"]["unparsed_lines"]


def run_envelope(sock: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """bench/envelope_bench.py against this daemon: one document of
    --envelope-mib sealed and opened, on disk in the run's temporary
    directory and in memory to /dev/null, then profiled (cProfile)."""
    out = tmp / "envelope.json"
    argv = [PY, ENVELOPE, "--unix", sock, "--size-mib", str(args.envelope_mib), "--dir", str(tmp),
            "--json", str(out), "--profile"]
    limit = 180 + args.envelope_mib / 20  # 20 MB/s would be very slow indeed
    log(f"client-side envelope: {args.envelope_mib} MiB sealed and opened, on disk in {tmp} and in memory")
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=limit, preexec_fn=_pdeathsig)
    except subprocess.TimeoutExpired:
        return {"failed": f"envelope_bench.py did not finish in {limit:.0f}s"}
    if not out.exists():
        return {"failed": f"envelope_bench.py exit {proc.returncode}: {proc.stderr.strip()[-500:]}"}
    return json.loads(out.read_text())


def envelope_line(env: dict[str, Any]) -> str:
    if "failed" in env:
        return f"FAILED: {env['failed']}"
    return (", ".join(f"{k.replace('_', ' ')} {env[k]['mb_s']:.0f} MB/s"
                      for k in ("disk_seal", "disk_open", "memory_seal", "memory_open"))
            + f" ({env['size_mib']} MiB); identical after open: {env['identical']}")


def measure_rewrap(sock: str, timeout: float = 600.0) -> dict[str, Any]:
    """Rotate the master key over the Unix socket and wait for the
    background rewrap of every record the points wrote."""

    def call(method: str) -> tuple[int, Any]:
        conn = UnixHTTPConnection(sock, timeout=30)
        try:
            conn.request(method, "/api/rotate-mk", headers={"Host": "localhost"})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    status, body = call("POST")
    if status != 200:
        return {"failed": f"POST /api/rotate-mk: {status} {body.get('error')}"}
    job_id, records = body["job"]["id"], body["remaining_total"]
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        time.sleep(0.2)
        status, body = call("GET")
        job = body.get("job") or {}
        if job.get("id") == job_id and job.get("state") == "finished":
            return {
                "records": records,
                "rewrapped": job["rewrapped"],
                "unreadable": job["unreadable"],
                "active_seconds": round(job["active_seconds"], 3),
                "records_per_s": job["rate_per_second"],
                "wall_s": round(time.monotonic() - t, 2),
            }
    return {"failed": f"rewrap not finished after {timeout} s"}


def rss_kib(pid: int | None) -> int | None:
    return proc_status(pid).get("VmRSS") if pid else None


def run_soak(
    daemon: Managed, vault: int | None, sock: str, token_files: list[Path], args: argparse.Namespace, tmp: Path,
) -> dict[str, Any]:
    """Reads at c=64 over the Unix socket for --soak seconds, cycling through
    every token the leg saved (in a full run more than the token cache
    holds, so the cache fills up to its bound), sampling the RSS of the
    daemon and of the vault every SOAK_EVERY s. Memory that grows in the
    first minute is the cache and the pools filling; memory that keeps
    growing after it is what the soak is looking for."""
    tokens = tmp / "tokens-soak.jsonl"
    count = 0
    with open(tokens, "w") as out:
        for path in token_files:
            lines = [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
            out.writelines(line + "\n" for line in lines)
            count += len(lines)
    info: dict[str, Any] = {"seconds": args.soak, "concurrency": SOAK_CONC, "listener": "unix",
                            "tokens": count, "interval_s": SOAK_EVERY}
    if not count:
        info["failed"] = "no tokens saved in this leg (did every write fail?)"
        return info
    result = tmp / "soak.json"
    argv = [PY, LOAD, "--unix", sock, "--mode", "read", "--concurrency", str(SOAK_CONC),
            "--duration", str(args.soak), "--warmup", "0", "--procs", str(args.procs),
            "--tokens", str(tokens), "--max-tokens", str(count), "--timeout", str(args.request_timeout),
            "--json", str(result), "--quiet", "--label", "soak"]

    def sample(t: float) -> dict[str, Any]:
        return {"t": round(t, 1), "daemon_kib": rss_kib(daemon.pid), "vault_kib": rss_kib(vault)}

    log(f"memory soak: reads at c={SOAK_CONC} over the Unix socket for {args.soak:.0f} s, "
        f"cycling through {count} tokens; RSS every {SOAK_EVERY:.0f} s")
    samples = [sample(0.0)]
    with open(tmp / "soak-load.log", "wb") as fh:
        proc = subprocess.Popen(
            argv, stdout=fh, stderr=subprocess.STDOUT, preexec_fn=_pdeathsig,  # noqa: PLW1509 - only prctl
        )
    t0 = time.monotonic()
    limit = args.soak + 180
    try:
        due = SOAK_EVERY
        while True:
            try:
                proc.wait(timeout=max(0.0, t0 + due - time.monotonic()))
                break
            except subprocess.TimeoutExpired:
                pass
            samples.append(sample(time.monotonic() - t0))
            due += SOAK_EVERY
            if due > limit:
                info["failed"] = f"load.py did not finish in {limit:.0f}s"
                break
    finally:  # also on Ctrl-C/SIGTERM: the load must not outlive the run
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    samples.append(sample(time.monotonic() - t0))  # the end, just after the load
    info["samples"] = samples
    info["summary"] = soak_summary(samples)
    if result.exists():
        r = next(x for x in json.loads(result.read_text())["results"] if x["mode"] == "read")
        info["result"] = {k: r[k] for k in ("elapsed_s", "requests", "ok", "rps", "p50_ms", "p90_ms", "p99_ms",
                                            "max_ms", "errors", "error_count", "mismatches", "procs")}
    elif "failed" not in info:
        info["failed"] = f"load.py exit {proc.returncode}: {tail(tmp / 'soak-load.log', 5)}"
    return info


def soak_summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Before, after the first minute (or the first sample after the start,
    when the soak is shorter), the end, and the growth from the first minute
    to the end: the cache filling shows before it, a leak after it."""
    before, end = samples[0], samples[-1]
    ref = next((s for s in samples[1:-1] if s["t"] >= 60), samples[1] if len(samples) > 2 else end)
    growth = {}
    for proc in ("daemon", "vault"):
        a, b = ref[f"{proc}_kib"], end[f"{proc}_kib"]
        growth[f"{proc}_kib"] = b - a if isinstance(a, int) and isinstance(b, int) else None
    return {"before": before, "first_minute": ref, "end": end, "growth": growth}


def soak_line(soak: dict[str, Any]) -> str:
    if "result" not in soak:
        return f"FAILED: {soak.get('failed')}"
    r, g = soak["result"], soak["summary"]["growth"]
    errs = ",".join(f"{k}:{v}" for k, v in r["errors"].items()) or "-"
    return (f"{r['rps']:.1f} req/s, ok {r['ok']}/{r['requests']}, errors {errs}, mismatches {r['mismatches']}; "
            f"RSS growth after t={soak['summary']['first_minute']['t']:.0f} s: daemon "
            f"{fmt_kib(g['daemon_kib'], sign=True)}, vault {fmt_kib(g['vault_kib'], sign=True)}"
            + (f"; {soak['failed']}" if "failed" in soak else ""))


# -- the Galera leg --------------------------------------------------------------------------------


class PrivateGalera:
    """The Galera leg's cluster: devtools/galera_cluster.py's GaleraCluster
    (GALERA_NODES mariadbd nodes on loopback, run as the mysql user) in a
    short directory of its own under /tmp: the run's temporary directory is
    0700 (the mysql user could not traverse it), and the nodes' Unix socket
    paths must fit in 108 bytes."""

    name = "galera"

    def __init__(self, module: Any, base: Path) -> None:
        self.base = base
        self.cluster = module.GaleraCluster(base, size=GALERA_NODES)
        self.started = False

    def start(self) -> None:
        self.cluster.start()
        self.started = True

    def stop(self) -> None:
        """A clean shutdown, node after node (well under a second), once the
        cluster was up. Interrupted while starting, SIGKILL instead: a
        node still joining ignores SIGTERM (the clean stop would wait 30 s
        for it), and the cluster is thrown away anyway. A no-op once done."""
        if self.started:
            self.cluster.stop()
        else:
            for i in range(len(self.cluster.nodes)):
                self.cluster.kill(i)


def galera_module() -> tuple[Any | None, str]:
    """devtools/galera_cluster.py when a cluster can run here (the MariaDB
    server binaries, the Galera 4 provider, rsync for the joiners' state
    transfer, a mysql user when we are root); else None and why not."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        import devtools.galera_cluster as module  # needs pymysql, a kmsd dependency
    except ImportError as exc:
        return None, f"cannot import devtools/galera_cluster.py ({exc})"
    missing = [name for name, path in zip(("mariadbd", "mariadb-install-db"), module.find_binaries(), strict=True)
               if not path]
    if module.find_provider() is None:
        missing.append("the Galera 4 provider libgalera_smm.so (sudo apt-get install galera-4)")
    if shutil.which("rsync") is None:
        missing.append("rsync (the joining nodes' state transfer)")
    if missing:
        return None, f"{', '.join(missing)} not found (sudo apt-get install mariadb-server galera-4 rsync)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("mysql")
        except KeyError:
            return None, "no mysql system user to run the nodes as (we are root; rsync SST refuses a root server)"
    return module, ""


def readyz_body(sock_path: str) -> dict[str, Any]:
    """GET /readyz over a Unix socket, its JSON body ({} when unreadable)."""
    try:
        conn = UnixHTTPConnection(sock_path, timeout=5)
        try:
            conn.request("GET", "/readyz")
            body = json.loads(conn.getresponse().read())
        finally:
            conn.close()
    except (OSError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


def split(total: int, parts: int) -> list[int]:
    """total as parts nearly equal integers (64 over 3: 22, 21, 21)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def percentile(sorted_vals: Any, q: float) -> float:
    """The same nearest-rank percentile as load.py's."""
    k = max(0, min(len(sorted_vals) - 1, math.ceil(q / 100.0 * len(sorted_vals)) - 1))
    return sorted_vals[k]


def run_galera(args: argparse.Namespace, tmp: Path, env: dict[str, str], stack: list[Stoppable],
               galera: dict[str, Any]) -> None:
    """The Galera leg (see bench/README.md): a private cluster, then for each
    wsrep_sync_wait in GALERA_SYNC_WAITS a fresh database, one daemon per
    node, a write point and a read point through all of them at once.
    Fills ``galera`` as it goes, so that an interrupted run reports what was
    measured; everything it starts is on ``stack``."""
    module, why = galera_module()
    if module is None:
        log(f"Galera leg skipped: {why}")
        galera["skipped"] = why
        return
    t0 = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="kg-", dir="/tmp"))
    galera["base"] = str(base)
    try:
        private = PrivateGalera(module, base)
    except Exception as exc:  # noqa: BLE001 - e.g. no port: the leg fails, the rest of the run stands
        galera["failed"] = f"cannot set up the Galera cluster: {type(exc).__name__}: {exc}"
        log(galera["failed"])
        return
    stack.append(private)  # before it starts: stopped whatever happens from here on
    cluster = private.cluster
    log(f"starting a private {GALERA_NODES}-node Galera cluster in {base}")
    try:
        private.start()
    except Exception as exc:  # noqa: BLE001 - the leg fails, the rest of the run stands
        galera["failed"] = f"the Galera cluster did not start: {exc}"
        log(galera["failed"])
        return
    galera["cluster_start_s"] = round(time.monotonic() - t0, 1)
    galera["nodes"] = [{"node": n.index, "port": n.port} for n in cluster.nodes]
    try:
        version = str(cluster.admin(0, "SELECT VERSION()")[0][0])
    except Exception as exc:  # noqa: BLE001 - best effort
        version = f"version unknown ({type(exc).__name__})"
    galera["server"] = {"version": version, "provider": cluster.status(0, "wsrep_provider_version") or "?",
                        "size": cluster.status(0, "wsrep_cluster_size") or "?"}
    log(f"Galera cluster up in {galera['cluster_start_s']} s: {version}, provider "
        f"{galera['server']['provider']}, nodes on ports {[n.port for n in cluster.nodes]}")
    # One root key for all the daemons (the master keys in the shared
    # database are wrapped under it): no --dev, which makes one per daemon.
    key = tmp / "galera-root.key"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(os.urandom(32).hex() + "\n")
    denv = dict(env, KMSD_ROOT_KEY_FILE=str(key))
    galera["passes"] = []
    for sync_wait in GALERA_SYNC_WAITS:
        pinfo: dict[str, Any] = {"sync_wait": sync_wait}
        galera["passes"].append(pinfo)
        galera_pass(cluster, sync_wait, pinfo, args, tmp, denv, stack)
    log("stopping the Galera cluster")
    t = time.monotonic()
    private.stop()
    galera["cluster_stop_s"] = round(time.monotonic() - t, 1)
    galera["leg_s"] = round(time.monotonic() - t0, 1)
    log(f"Galera leg done in {galera['leg_s']} s")


def galera_pass(cluster: Any, sync_wait: int, pinfo: dict[str, Any], args: argparse.Namespace, tmp: Path,
                env: dict[str, str], stack: list[Stoppable]) -> None:
    """One database, one daemon per node (daemon i's URL names node i
    first), a write point and a warm read point through all of them at once;
    the daemons are stopped before it returns."""
    name = f"kmsd_galera_sw{sync_wait}"
    pinfo["database"] = name
    try:
        cluster.new_database(name)
    except Exception as exc:  # noqa: BLE001 - this pass fails, the next may not
        pinfo["failed"] = f"CREATE DATABASE {name} failed: {exc}"
        log(f"Galera sync_wait={sync_wait}: {pinfo['failed']}")
        return
    daemons: list[tuple[Managed, str]] = []
    pinfo["daemons"] = []
    t = time.monotonic()
    for i in range(len(cluster.nodes)):
        url = cluster.node_url(i, name) + ("" if sync_wait == 1 else f"?wsrep_sync_wait={sync_wait}")
        sock, port = str(tmp / f"galera{sync_wait}-{i}.sock"), free_port()
        argv = [str(Path(PY).parent / "kmsd"), "serve", "--socket", sock,
                "--listen", f"127.0.0.1:{port}", "--database", url]
        log(f"starting kmsd (galera sync_wait={sync_wait}, daemon {i}): {' '.join(argv[1:-1] + [mask_url(url)])}")
        daemon = Managed(f"kmsd-galera-sw{sync_wait}-{i}", argv, tmp / f"kmsd-galera-sw{sync_wait}-{i}.log", env, tmp)
        stack.append(daemon)
        daemons.append((daemon, sock))
        pinfo["daemons"].append({"daemon": i, "database": mask_url(url), "socket": sock})
    node_of = {f"127.0.0.1:{n.port}": n.index for n in cluster.nodes}
    try:
        for (daemon, sock), dinfo in zip(daemons, pinfo["daemons"], strict=True):
            try:
                wait_ready(daemon, sock, timeout=60)
            except RuntimeError as exc:
                pinfo["failed"] = f"{daemon.name} did not start: {exc}"
                log(f"Galera sync_wait={sync_wait}: {pinfo['failed']}")
                return
            dinfo["server"] = readyz_body(sock).get("database")
            dinfo["node"] = node_of.get(str(dinfo["server"]))
            daemon.remember_children()  # the vault, for the CPU figures
        pinfo["startup_s"] = round(time.monotonic() - t, 2)
        log(f"Galera sync_wait={sync_wait}: daemons ready in {pinfo['startup_s']} s; "
            + ", ".join(f"daemon {d['daemon']} on node {d['node']} ({d['server']})" for d in pinfo["daemons"]))
        tokens = [tmp / f"tokens-galera{sync_wait}-{i}.jsonl" for i in range(len(daemons))]
        kmsd_pids = [p for d, _ in daemons for p in (d.pid, *d.children)]
        node_pids = [n.proc.pid for n in cluster.nodes if n.proc is not None]
        for mode in ("write", "read"):
            r = galera_point(mode, [s for _, s in daemons], tokens, args, tmp, kmsd_pids, node_pids)
            pinfo[mode] = r
            log(f"Galera sync_wait={sync_wait}: {galera_line(r)}")
            dead = [d.name for d, _ in daemons if not d.alive()]
            if dead:
                pinfo["died"] = f"{', '.join(dead)} exited during the {mode} point"
                log(f"Galera sync_wait={sync_wait}: {pinfo['died']}:\n"
                    + "\n".join(tail(d.logfile) for d, _ in daemons if not d.alive()))
                return
    finally:  # also on failure and Ctrl-C (then the stack stops them again: a no-op)
        log(f"stopping the Galera daemons (sync_wait={sync_wait})")
        for (daemon, _), dinfo in zip(daemons, pinfo["daemons"], strict=True):
            daemon.stop()
            dinfo["exit_code"] = daemon.exit_code
            dinfo["stop_seconds"] = daemon.stop_seconds
            lg = scan_log(daemon.logfile)
            dinfo["log"] = {"levels": lg["levels"], "events": lg["events"]}


def galera_point(mode: str, socks: list[str], tokens: list[Path], args: argparse.Namespace, tmp: Path,
                 kmsd_pids: list[int], node_pids: list[int]) -> dict[str, Any]:
    """One point through every daemon at once: one load.py per daemon, in
    parallel, GALERA_CONC connections in total (one client process each);
    req/s summed, percentiles over the merged latency samples, and the
    worst daemon's."""
    concs = split(GALERA_CONC, len(socks))
    limit = args.duration + args.warmup + 180
    stamp = time.monotonic_ns()
    runs: list[tuple[subprocess.Popen[bytes], Path, Path, Path]] = []
    cpu0 = {p: cpu_seconds(p) for p in kmsd_pids + node_pids}
    t0 = time.monotonic()
    try:
        for i, (sock, conc) in enumerate(zip(socks, concs, strict=True)):
            out, lat, logf = (tmp / f"galera-{stamp}-{i}.{ext}" for ext in ("json", "lat", "log"))
            argv = [PY, LOAD, "--unix", sock, "--mode", mode, "--concurrency", str(conc),
                    "--duration", str(args.duration), "--warmup", str(args.warmup), "--procs", "1",
                    "--timeout", str(args.request_timeout), "--json", str(out), "--save-latencies", str(lat),
                    "--quiet", "--label", f"galera-{mode}-{i}"]
            if mode == "write":
                argv += ["--save-tokens", str(tokens[i])]
            elif tokens[i].exists() and tokens[i].stat().st_size:
                # warm reads, as the main read points: the daemon's own first --read-users tokens
                argv += ["--tokens", str(tokens[i]), "--max-tokens", str(args.read_users)]
            else:
                argv += ["--seed", "1000"]
            with open(logf, "wb") as fh:
                proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT,
                                        preexec_fn=_pdeathsig)  # noqa: PLW1509 - only prctl
            runs.append((proc, out, lat, logf))
        deadline = time.monotonic() + limit
        for proc, *_ in runs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:  # also on Ctrl-C/SIGTERM: the load must not outlive the run
        for proc, *_ in runs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    wall = time.monotonic() - t0
    cpu1 = {p: cpu_seconds(p) for p in kmsd_pids + node_pids}

    def cpu(pids: list[int]) -> float | None:
        used = [cpu1[p] - cpu0[p] for p in pids if cpu0.get(p) is not None and cpu1.get(p) is not None]
        return round(sum(used) / wall, 2) if used else None

    agg: dict[str, Any] = {"mode": mode, "concurrency": sum(concs), "daemons": len(socks),
                           "wall_s": round(wall, 2), "cpu_kmsd_per_s": cpu(kmsd_pids),
                           "cpu_nodes_per_s": cpu(node_pids)}
    per: list[dict[str, Any]] = []
    samples = array.array("d")
    for i, ((proc, out, lat, logf), conc) in enumerate(zip(runs, concs, strict=True)):
        if not out.exists():
            code = proc.returncode if proc.returncode is not None else "killed"
            per.append({"daemon": i, "concurrency": conc, "failed_to_run": f"load.py exit {code}: {tail(logf, 5)}"})
            continue
        doc = json.loads(out.read_text())
        r = next((x for x in doc["results"] if x["mode"] == mode), None)
        if r is None:
            per.append({"daemon": i, "concurrency": conc, "failed_to_run": f"no {mode} phase: {tail(logf, 5)}"})
            continue
        r = {k: r[k] for k in ("concurrency", "elapsed_s", "requests", "ok", "rps", "p50_ms", "p90_ms", "p99_ms",
                                "max_ms", "errors", "error_count", "mismatches")}
        r["daemon"] = i
        if proc.returncode not in (0, 3):
            r["load_exit"] = proc.returncode
        per.append(r)
        if lat.exists():
            a = array.array("d")
            a.frombytes(lat.read_bytes())
            samples.extend(a)
    agg["per_daemon"] = per
    ok = [r for r in per if "rps" in r]
    if len(ok) < len(per):
        agg["failed_to_run"] = "; ".join(f"daemon {r['daemon']}: {r['failed_to_run']}" for r in per if "rps" not in r)
    if ok:
        errors: dict[str, int] = {}
        for r in ok:
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
        agg.update({
            "rps": round(sum(r["rps"] for r in ok), 1),
            "requests": sum(r["requests"] for r in ok),
            "ok": sum(r["ok"] for r in ok),
            "errors": dict(sorted(errors.items())),
            "mismatches": sum(r["mismatches"] for r in ok),
            "worst_p50_ms": max(r["p50_ms"] for r in ok),
            "worst_p99_ms": max(r["p99_ms"] for r in ok),
            "max_ms": max(r["max_ms"] for r in ok),
        })
        if len(ok) < len(per):
            agg["rps_partial"] = True  # a daemon's figures are missing from the sum
        vals = sorted(samples)
        if vals:  # the percentiles of every request of the point, whichever daemon answered it
            agg.update({f"p{q}_ms": round(percentile(vals, q) * 1000.0, 3) for q in (50, 90, 99)})
    return agg


def galera_line(r: dict[str, Any]) -> str:
    if "rps" not in r:
        return f"{r['mode']} c={r['concurrency']} total FAILED: {r.get('failed_to_run')}"
    errs = ",".join(f"{k}:{v}" for k, v in r["errors"].items()) or "-"
    per = " + ".join(f"{x['rps']:.0f}" if "rps" in x else "FAILED" for x in r["per_daemon"])
    return (f"{r['mode']:<5} c={r['concurrency']} total over {r['daemons']} daemons: {r['rps']:.1f} req/s ({per}); "
            f"p50 {r.get('p50_ms', float('nan')):.2f} p99 {r.get('p99_ms', float('nan')):.2f} ms merged, "
            f"worst daemon p99 {r['worst_p99_ms']:.2f} ms; ok {r['ok']}/{r['requests']}; errors {errs}; "
            f"mismatches {r['mismatches']}; CPU kmsd {r['cpu_kmsd_per_s']} nodes {r['cpu_nodes_per_s']}"
            + (f"; {r['failed_to_run']}" if "failed_to_run" in r else ""))


def galera_comparison(results: list[dict[str, Any]], legs: list[dict[str, Any]],
                      galera: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of the Galera table: the single-server MariaDB leg's c=64
    write and warm read over the Unix socket, then each Galera pass."""

    def single(mode: str) -> dict[str, Any] | None:
        return next((r for r in results if r.get("leg") == "mysql" and r.get("target") == "kmsd-mysql"
                     and r.get("listener") == "unix" and r.get("mode") == mode
                     and r.get("concurrency") == GALERA_CONC and "rps" in r), None)

    rows: list[dict[str, Any]] = []
    w, rd = single("write"), single("read")
    server = next((leg.get("server") for leg in legs if leg.get("leg") == "mysql"), None) or {}
    row: dict[str, Any] = {"setup": f"single MariaDB server, 1 daemon, c={GALERA_CONC}",
                           "transport": server.get("transport")}
    for mode, r in (("write", w), ("read", rd)):
        if r:
            row[mode] = {k: r[k] for k in ("rps", "p50_ms", "p99_ms", "errors", "mismatches")}
    rows.append(row)
    for p in galera.get("passes", []):
        row = {"setup": f"Galera {GALERA_NODES} nodes, {GALERA_NODES} daemons, c={GALERA_CONC} total, "
                        f"sync_wait={p['sync_wait']}", "sync_wait": p["sync_wait"]}
        for mode in ("write", "read"):
            r = p.get(mode) or {}
            if "rps" in r:
                row[mode] = {k: r.get(k) for k in ("rps", "p50_ms", "p99_ms", "worst_p50_ms", "worst_p99_ms",
                                                   "errors", "mismatches")}
        rows.append(row)
    return rows



# -- reports -------------------------------------------------------------------------------------


def fmt_kib(v: int | None, *, sign: bool = False) -> str:
    return f"{v / 1024:{'+' if sign else ''}.1f} MiB" if isinstance(v, int) else "-"


def ratios(results: list[dict[str, Any]]) -> None:
    """kmsd req/s as a fraction of the baseline's at the same point."""
    base = {(r["leg"], r["listener"], r["mode"], r["concurrency"]): r
            for r in results if r["target"] == "baseline" and "rps" in r}
    for r in results:
        if r["target"] != "baseline" and "rps" in r:
            b = base.get((r["leg"], r["listener"], r["mode"], r["concurrency"]))
            if b and b["rps"]:
                r["ratio_vs_baseline"] = round(r["rps"] / b["rps"], 3)


def mysql_header(meta: dict[str, Any], legs: list[dict[str, Any]]) -> str:
    """The MariaDB leg in one line of the header: what ran, or why not."""
    if meta["mysql"] == "none":
        return "- MariaDB leg: not run (--mysql none)"
    if meta.get("mysql_skipped"):
        return f"- MariaDB leg: **skipped**, {meta['mysql_skipped']}"
    leg = next((x for x in legs if x["leg"] == "mysql"), None)
    if leg is None:
        return "- MariaDB leg: not reached"
    server = leg.get("server")
    if not server:
        return f"- MariaDB leg: **failed**: {str(leg.get('failed', '?')).splitlines()[0][:200]}"
    return f"- MariaDB leg (kmsd-mysql): {server['version']} over {server['transport']}; {server['origin']}"


def galera_header(meta: dict[str, Any], galera: dict[str, Any]) -> str:
    """The Galera leg in one line of the header: what ran, or why not."""
    if meta.get("galera") == "none":
        return "- Galera leg: not run (--galera none)"
    if galera.get("skipped"):
        return f"- Galera leg: **skipped**, {galera['skipped']}"
    if galera.get("failed"):
        return f"- Galera leg: **failed**: {str(galera['failed']).splitlines()[0][:200]}"
    server = galera.get("server")
    if not server:
        return "- Galera leg: not reached"
    return (f"- Galera leg: {GALERA_NODES} private nodes (devtools/galera_cluster.py), {server['version']}, "
            f"Galera provider {server['provider']}; 3 daemons without `--dev`, sharing one root key")


def galera_markdown(galera: dict[str, Any], procs: int) -> list[str]:
    """The Galera section: the comparison table, the cost of read-your-writes,
    then which node each daemon used and the per-daemon figures."""
    if not galera.get("passes") and not galera.get("failed"):
        return []
    conc = " + ".join(str(c) for c in split(GALERA_CONC, GALERA_NODES))
    lines = [
        "",
        f"## Galera: {GALERA_NODES} nodes, {GALERA_NODES} daemons",
        "",
    ]
    if galera.get("failed"):
        return lines + ["**failed**:", "", "```", str(galera["failed"]), "```"]
    lines += [
        (f"A private {GALERA_NODES}-node cluster; daemon i runs with `--database` naming node i first (then the "
         f"others), all on one database and one root key. Each point runs one bench/load.py per daemon at once, "
         f"over its Unix socket, c = {conc} = {GALERA_CONC} in total (one client process each; the single-server "
         f"row used {procs}): req/s is the sum of the three; p50/p99 are over the merged samples of every request, "
         "with the worst daemon's p99 in brackets. Reads are warm: each daemon's client cycles through the "
         "first tokens its own write point saved. **sync_wait=1** is kmsd's default on Galera: every read first "
         "waits until its node has applied every write committed anywhere in the cluster (read-your-writes "
         "across nodes); **sync_wait=0** (`?wsrep_sync_wait=0` in the URL) gives that up."),
        "",
        "| setup | write req/s | write p50 ms | write p99 ms | read req/s | read p50 ms | read p99 ms | errors | mismatches |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]

    def cells(r: dict[str, Any] | None) -> list[str]:
        if not r:
            return ["-", "-", "-"]
        p99 = f"{r['p99_ms']:.2f}" if r.get("p99_ms") is not None else "-"
        if r.get("worst_p99_ms") is not None:
            p99 += f" ({r['worst_p99_ms']:.2f})"
        p50 = f"{r['p50_ms']:.2f}" if r.get("p50_ms") is not None else "-"
        return [f"{r['rps']:.0f}", p50, p99]

    rows = galera.get("comparison", [])
    for row in rows:
        w, r = row.get("write"), row.get("read")
        setup = row["setup"]
        if "sync_wait" not in row:  # the daemon reached the server over its Unix socket, or TCP (--mysql-tcp)
            via = str(row.get("transport") or "")
            setup += (" (MariaDB leg not run)" if not (w or r) else
                      " (to the server over its Unix socket)" if via.startswith("Unix") else
                      " (to the server over TCP)" if via else "")
        else:
            setup += " (to the nodes over TCP)"
        errors: dict[str, int] = {}
        for x in (w, r):
            for k, v in ((x or {}).get("errors") or {}).items():
                errors[k] = errors.get(k, 0) + v
        errs = ", ".join(f"{k}: {v}" for k, v in errors.items()) or "-"
        mism = sum((x or {}).get("mismatches", 0) for x in (w, r)) if (w or r) else "-"
        lines.append(f"| {setup} | " + " | ".join(cells(w) + cells(r)) + f" | {errs} | {mism} |")
    by_wait = {row.get("sync_wait"): row for row in rows if "sync_wait" in row}
    on, off = by_wait.get(1, {}), by_wait.get(0, {})
    costs = []
    for mode in ("read", "write"):
        a, b = on.get(mode), off.get(mode)
        if a and b and b["rps"]:
            costs.append(f"{mode}s {a['rps']:.0f} vs {b['rps']:.0f} req/s ({(a['rps'] / b['rps'] - 1) * 100:+.0f}%), "
                         f"p99 {a['p99_ms']:.2f} vs {b['p99_ms']:.2f} ms")
    lines.append("")
    if costs:
        lines.append("- read-your-writes (sync_wait=1 vs 0): " + "; ".join(costs))
    lines.append(f"- cluster ready in {galera.get('cluster_start_s', '-')} s, stopped in "
                 f"{galera.get('cluster_stop_s', '-')} s; the whole leg took {galera.get('leg_s', '-')} s")
    lines += ["", "| sync_wait | daemon | node | ready | write req/s | write p99 ms | read req/s | read p99 ms | "
              "exit code | log levels |", "|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for p in galera.get("passes", []):
        if p.get("failed"):
            lines.append(f"| {p['sync_wait']} | | **failed**: {str(p['failed']).splitlines()[0][:200]} | | | | | | | |")
        if p.get("died"):
            lines.append(f"| {p['sync_wait']} | | **died**: {p['died']} | | | | | | | |")
        for d in p.get("daemons", []):
            def one(mode: str, d: dict[str, Any] = d, p: dict[str, Any] = p) -> list[str]:
                r = next((x for x in (p.get(mode) or {}).get("per_daemon", []) if x["daemon"] == d["daemon"]), None)
                if not r:
                    return ["-", "-"]
                if "rps" not in r:
                    return ["FAILED", "-"]
                return [f"{r['rps']:.0f}", f"{r['p99_ms']:.2f}"]
            node = f"{d['node']} ({d['server']})" if d.get("node") is not None else str(d.get("server") or "-")
            ready = f"{p['startup_s']} s" if "startup_s" in p else "-"
            lines.append(f"| {p['sync_wait']} | {d['daemon']} | {node} | {ready} | " + " | ".join(one("write") + one("read"))
                         + f" | {d.get('exit_code', '-')} | {(d.get('log') or {}).get('levels', '-')} |")
    cpus = [f"sync_wait={p['sync_wait']} {mode}: kmsd {p[mode].get('cpu_kmsd_per_s')}, nodes "
            f"{p[mode].get('cpu_nodes_per_s')}" for p in galera.get("passes", []) for mode in ("write", "read")
            if p.get(mode)]
    if cpus:
        lines += ["", "- CPU per second of the point (the 3 daemons with their vaults / the 3 mariadbd nodes): "
                  + "; ".join(cpus)]
    return lines


def soak_markdown(soak: dict[str, Any], max_rows: int = 16) -> list[str]:
    lines = [
        "",
        f"#### Memory soak: reads at c={soak['concurrency']} over the Unix socket for {soak['seconds']:.0f} s",
        "",
        (f"- cycling through all {soak['tokens']} tokens this leg saved (the token cache fills up to its "
         "bound, 50,000 by default, when there are more)"),
    ]
    r = soak.get("result")
    if r:
        errs = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "-"
        lines.append(f"- **{r['rps']:.0f} req/s**; ok {r['ok']}/{r['requests']}; errors {errs}; "
                     f"mismatches {r['mismatches']}; p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, "
                     f"max {r['max_ms']:.2f} ms")
    if soak.get("failed"):
        lines.append(f"- **failed**: {soak['failed']}")
    sm = soak.get("summary")
    if not sm:
        return lines + [""]
    ref = sm["first_minute"]
    ref_name = (f"after the first minute (t={ref['t']:.0f} s)" if ref["t"] >= 60
                else f"at t={ref['t']:.0f} s (the first sample: the soak is shorter than a minute)")

    def both(s: dict[str, Any]) -> str:
        return f"{fmt_kib(s['daemon_kib'])} / {fmt_kib(s['vault_kib'])}"

    g = sm["growth"]
    lines.append(
        f"- RSS daemon / vault: before {both(sm['before'])}; {ref_name} {both(ref)}; "
        f"end (t={sm['end']['t']:.0f} s) {both(sm['end'])}; **growth from t={ref['t']:.0f} s to the end: "
        f"{fmt_kib(g['daemon_kib'], sign=True)} / {fmt_kib(g['vault_kib'], sign=True)}**"
    )
    samples = soak["samples"]
    # A long soak has dozens of samples: show every k-th (and the last); all are in the JSON.
    step = -(-len(samples) // max_rows)
    shown = samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else [])
    lines += ["", "| t (s) | daemon RSS | vault RSS |", "|---:|---:|---:|"]
    lines += [f"| {s['t']:.1f}{' (end)' if s is samples[-1] else ''} | {fmt_kib(s['daemon_kib'])} | "
              f"{fmt_kib(s['vault_kib'])} |" for s in shown]
    if step > 1:
        lines.append(f"\nOne sample in {step} of {len(samples)}, and the last (all are in the JSON).")
    return lines


def _fmt_cpu(r: dict[str, Any], warmup: float) -> str:
    el = r["elapsed_s"] + r.get("warmup_s", warmup)
    if "cpu_daemon_s" in r:
        return f"{r['cpu_daemon_s'] / el:.2f} / {r.get('cpu_vault_s', 0) / el:.2f}"
    if "cpu_baseline_s" in r:
        return f"{r['cpu_baseline_s'] / el:.2f}"
    return "-"


def targets_markdown(meta: dict[str, Any], legs: list[dict[str, Any]], results: list[dict[str, Any]]) -> list[str]:
    """Issue 17's three figures against their targets, in three lines (the
    tables below have the details). A reference, not a verdict: one quick
    run on a shared machine moves by tens of percent."""
    t = meta["targets"]
    lines: list[str] = []
    dk = [r for r in results if r.get("mode") == "datakey" and r["target"] != "baseline"
          and r.get("concurrency") == 64 and "ratio_vs_baseline" in r]
    if dk:
        lines.append(f"- **datakey** at c=64, kmsd ÷ baseline (target ≥ {t['datakey_ratio_c64']:.2f}): "
                     + ", ".join(f"{r['leg']} {r['listener']} **{r['ratio_vs_baseline']:.2f}** ({r['rps']:.0f} req/s)"
                                 for r in dk))
    for mode, name in (("batch-unwrap", "batch unwrap"), ("batch-unwrap-context", "batch unwrap, a context per item")):
        pts = [r for r in results if r.get("mode") == mode and r["target"] != "baseline" and "items_per_s" in r]
        if pts:
            best = max(pts, key=lambda r: r["items_per_s"])
            lines.append(f"- **{name}**, {meta['batch_size']} DEKs a request (target ≥ {t['batch_deks_per_s']:,} "
                         f"DEKs/s): best **{best['items_per_s']:,.0f} DEKs/s** at c={best['concurrency']} "
                         f"(" + ", ".join(f"c={r['concurrency']} {r['items_per_s']:,.0f}" for r in pts) + ")")
    env = next((leg["envelope"] for leg in legs if leg.get("envelope")), None)
    if env and "failed" not in env:
        lines.append(f"- **client-side envelope**, {env['size_mib']} MiB (target ≥ {t['envelope_mb_s']} MB/s): "
                     f"in memory seal **{env['memory_seal']['mb_s']:,.0f}** / open **{env['memory_open']['mb_s']:,.0f}** "
                     f"MB/s; on disk seal {env['disk_seal']['mb_s']:,.0f} / open {env['disk_open']['mb_s']:,.0f} MB/s")
    if not lines:
        return []
    return ["## Against the targets", "", *lines, "",
            "(Targets of the data-key issue, as a reference: the sections below have every point.)", ""]


def batch_markdown(meta: dict[str, Any], results: list[dict[str, Any]]) -> list[str]:
    pts = [r for r in results if str(r.get("mode", "")).startswith("batch-unwrap")]
    if not pts:
        return []
    lines = [
        "",
        f"## Batch unwrap: POST /api/decrypt-dek with {{\"batch\": [{meta['batch_size']} items]}}, Unix socket",
        "",
        (f"Each point first makes {meta['batch_size']} data keys with POST /api/datakey (one subject; with a "
         "context, each key its own `{\"doc\": ...}`), then sends the same batch over and over. **DEKs/s** counts "
         "items answered `{\"dek\": ...}` equal to the key /api/datakey gave (every answer is compared whole); "
         "a batch is ok when all its items are. The baseline answers one fixed `{\"dek\": ...}` per item "
         "without unwrapping anything (the HTTP stack and the client moving the same bytes)."),
        "",
        "| target | context | conc | DEKs/s | batches/s | ratio | p50 ms | p99 ms | max ms | batches ok/reqs | "
        "item errors | errors | mismatches | CPU daemon/vault |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---|",
    ]
    checks = []
    for r in pts:
        ctx = "per item" if r["mode"] == "batch-unwrap-context" else "-"
        if "failed_to_run" in r:
            lines.append(f"| {r['target']} | {ctx} | {r['concurrency']} | FAILED: {r['failed_to_run'][:120]} "
                         "| | | | | | | | | | |")
            continue
        errs = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "-"
        item_errs = ", ".join(f"{k}: {v}" for k, v in r.get("item_errors", {}).items()) or "-"
        ratio = f"{r['ratio_vs_baseline']:.2f}" if "ratio_vs_baseline" in r else ""
        lines.append(
            f"| {r['target']} | {ctx} | {r['concurrency']} | {r['items_per_s']:,.0f} | {r['rps']:.1f} | {ratio} | "
            f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['max_ms']:.2f} | {r['ok']}/{r['requests']} | {item_errs} | "
            f"{errs} | {r['mismatches']} | {_fmt_cpu(r, meta['warmup'])} |")
        if "context_bound" in r:
            checks.append(r)
    if checks:
        bound = all(r["context_bound"] for r in checks)
        c = checks[-1]["context_check"]
        lines += ["", f"- context bound to the wrapped DEK: **{'yes' if bound else 'NO'}** (one DEK asked for alone: "
                  f"with its own context {c['same']}, with another {c['other']}, with none {c['none']}"
                  + ("" if bound else "; the server ignores the context") + ")"]
    return lines


def envelope_markdown(meta: dict[str, Any], legs: list[dict[str, Any]]) -> list[str]:
    env, leg = next(((leg["envelope"], leg["leg"]) for leg in legs if leg.get("envelope")), (None, None))
    if env is None:
        return []
    lines = ["", f"## Client-side envelope: kmsd_client.envelope, one {meta['envelope_mib']} MiB document", ""]
    if "failed" in env:
        return lines + [f"**failed**: {env['failed']}"]
    lines += [
        (f"bench/envelope_bench.py: `encrypt(kms, source, sink, context=...)` and `decrypt(...)` against the "
         f"kmsd-{leg} daemon (one data-key request each way), segments of {env['segment_size'] // 1024} KiB, "
         "in one client process. MB/s = 10^6 plaintext bytes per second of wall time. **disk**: a file in the "
         "run's temporary directory to another there, the input first evicted from the page cache (read from the "
         "device), the output left in the page cache; *with fsync* adds the time to put it on the device. "
         "**memory**: from a reader in memory (seal) or the blob held in memory (open) into /dev/null: the "
         "envelope's own speed. The difference is the disk's (and the kernel's page cache: see the kernel CPU)."),
        "",
        "| case | MB/s | with fsync MB/s | wall s | CPU user s | CPU kernel s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, name in (("disk_seal", "disk seal (file → file)"), ("disk_open", "disk open (file → file)"),
                      ("memory_seal", "memory seal (→ /dev/null)"), ("memory_open", "memory open (→ /dev/null)")):
        r = env[key]
        fs = f"{r['mb_s_with_fsync']:,.0f}" if "mb_s_with_fsync" in r else "-"
        lines.append(f"| {name} | {r['mb_s']:,.0f} | {fs} | {r['wall_s']:.2f} | {r['cpu_user_s']:.2f} | "
                     f"{r['cpu_sys_s']:.2f} |")
    pw = env["plain_write"]
    lines += ["", f"- the same directory's own speed: writing the plaintext file {pw['mb_s']:,.0f} MB/s "
              f"({pw['mb_s_with_fsync']:,.0f} MB/s with fsync)",
              f"- opened on disk, the document is identical to the original: **{env['identical']}**"]
    for name, rows in (env.get("profile") or {}).items():
        top = ", ".join(f"`{x['function']}` {x['share'] * 100:.0f}%" for x in rows[:4])
        lines.append(f"- where the time goes, memory {name} (cProfile, own time): {top}")
    return lines


def markdown(meta: dict[str, Any], legs: list[dict[str, Any]], results: list[dict[str, Any]],
             galera: dict[str, Any]) -> str:
    m = meta["machine"]
    lines = [
        f"# kmsd benchmark — {meta['date']} — commit {m['commit']}{' (dirty tree)' if m['dirty'] else ''}",
        "",
        f"- machine: {m['cpu_count']} CPUs, {m['cpu_model']}, {m['memory']} RAM, kernel {m['kernel']}",
        f"- Python {m['python']} ({m['implementation']}); "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        f"- load average at start: {m['loadavg_at_start']} (a busy machine skews every number)",
        f"- per point: {meta['duration']} s measured after {meta['warmup']} s warm-up; "
        f"client processes: {meta['procs']} (1 at c=1); bench/load.py (aiohttp client, keep-alive)",
        "- kmsd: `kmsd serve --dev`, logging at its default level (one JSON line per request to a file)",
        mysql_header(meta, legs),
        galera_header(meta, galera),
        "",
    ]
    lines += targets_markdown(meta, legs, results)
    if results:  # (none when only the Galera leg ran)
        lines += [
            "## Throughput and latency",
            "",
            "ratio = kmsd req/s ÷ baseline req/s at the same point (the baseline is bench/baseline.py, "
            "aiohttp answering a fixed body). CPU = seconds of CPU the server (daemon / vault) used during the point, "
            "per second of the point.",
            "",
            (f"Reads: **read** is warm: {meta['read_users']} users reading over and over (the first "
             f"{meta['read_users']} tokens of that listener's write c={max(WRITE_CONC)} point, cycled), so after its "
             "first read each token is in kmsd's verified-token cache and no read pays a signature check; "
             f"**read-cold** (c={COLD_CONC}, no warm-up) is cold: every read presents a token kmsd has never seen "
             f"(the tokens after those, each used once, at most {COLD_MAX_TOKENS}), so every read pays an Ed25519 "
             "signature check."),
            "",
            ("**datakey**: POST /api/datakey, one data key per request (generated and wrapped in the vault), "
             "authenticated with the same warm tokens as the reads; the answer is checked to be a 32-byte key and "
             "its wrapped form."),
            "",
            "| target | via | mode | conc | req/s | ratio | p50 ms | p90 ms | p99 ms | max ms | ok/reqs | errors | mismatches | CPU daemon/vault |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
        ]
    for r in results:
        if r.get("mode") == "burst" or str(r.get("mode")).startswith("batch-unwrap"):
            continue  # sections of their own
        if "failed_to_run" in r:
            lines.append(f"| {r['target']} | {r['listener']} | {r['mode']} | {r['concurrency']} | "
                         f"FAILED: {r['failed_to_run'][:120]} | | | | | | | | | |")
            continue
        errs = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "-"
        cpu = _fmt_cpu(r, meta["warmup"])
        ratio = f"{r['ratio_vs_baseline']:.2f}" if "ratio_vs_baseline" in r else ""
        lines.append(
            f"| {r['target']} | {r['listener']} | {r['mode']} | {r['concurrency']} | {r['rps']:.0f} | {ratio} | "
            f"{r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | {r['max_ms']:.2f} | "
            f"{r['ok']}/{r['requests']} | {errs} | {r['mismatches']} | {cpu} |"
        )
    bursts = [r for r in results if r.get("mode") == "burst"]
    if bursts:
        lines += [
            "",
            f"## Burst: {meta['burst']} simultaneous writes, each on its own new connection (timeout {meta['burst_timeout']} s)",
            "",
            "| target | via | succeeded | failed | failures by kind | wall s | p50 ms | p99 ms | max ms |",
            "|---|---|---:|---:|---|---:|---:|---:|---:|",
        ]
        for r in bursts:
            if "failed_to_run" in r:
                lines.append(f"| {r['target']} | {r['listener']} | FAILED: {r['failed_to_run'][:120]} | | | | | | |")
                continue
            errs = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "-"
            lines.append(f"| {r['target']} | {r['listener']} | {r['ok']} | {r['burst'] - r['ok']} | {errs} | "
                         f"{r['elapsed_s']:.2f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.1f} |")
    floods = [r for r in results if r.get("mode") == "read-flood" and "rps" in r]
    if floods:
        lines += [
            "",
            f"## Under a flood of invalid tokens ({FLOOD_CONNECTIONS} TCP connections)",
            "",
            "A legitimate client reads over the Unix socket while TCP callers present invalid tokens as fast as "
            "the daemon answers them (bench/flood.py); kept = its rate ÷ its unloaded rate at the same "
            "concurrency in this run (the goal: at least 0.40).",
            "",
            "| leg | conc | req/s under flood | unloaded req/s | kept | flood answers/s | flood answers |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in floods:
            alone = next((x for x in results if x.get("leg") == r.get("leg") and x.get("target") == r["target"]
                          and x.get("listener") == r["listener"] and x.get("mode") == "read"
                          and x.get("concurrency") == r["concurrency"] and "rps" in x), None)
            kept = f"{r['rps'] / alone['rps']:.2f}" if alone and alone["rps"] else "-"
            flood = r.get("flood", {})
            answers = ", ".join(f"{k}: {v}" for k, v in sorted(flood.get("answers", {}).items())) or "-"
            lines.append(f"| {r.get('leg')} | {r['concurrency']} | {r['rps']:.0f} | "
                         f"{alone['rps'] if alone else 0:.0f} | {kept} | {flood.get('answers_per_s', '-')} | {answers} |")
    lines += batch_markdown(meta, results)
    lines += envelope_markdown(meta, legs)
    lines += galera_markdown(galera, meta["procs"])
    if legs:
        lines += ["", "## Daemon", ""]
    for leg in legs:
        server = leg.get("server")
        if server:  # the MariaDB leg: which server, and how kmsd reached it
            lines += [f"### kmsd-{leg['leg']} — {server['version']} over {server['transport']}", "",
                      f"- {server['origin']}; database `{leg.get('database', '-')}`"]
        else:
            lines += [f"### kmsd-{leg['leg']} ({leg.get('database', '-')})", ""]
        if leg.get("failed"):
            code = f": exit code {leg['exit_code']}" if "exit_code" in leg else ""
            lines += [f"- **did not start**{code}", "", "```", leg["failed"], "```", ""]
            continue
        lines.append(f"- ready after {leg.get('startup_s', '-')} s; open-files limit {leg.get('nofile_limit', '-')}")
        if leg.get("died"):
            lines.append(f"- **DIED**: {leg['died']}")
        lines.append(f"- stopped with exit code {leg.get('exit_code')} after {leg.get('stop_seconds')} s of SIGTERM")
        lines += ["", "| process | RSS before | RSS after | peak RSS (VmHWM) |", "|---|---:|---:|---:|"]
        before, after = leg.get("memory_before") or {}, leg.get("memory_after") or {}
        lines.append(f"| daemon (pid {before.get('daemon', {}).get('pid')}) | {fmt_kib(before.get('daemon', {}).get('VmRSS'))} | "
                     f"{fmt_kib(after.get('daemon', {}).get('VmRSS'))} | {fmt_kib(after.get('daemon', {}).get('VmHWM'))} |")
        kids_after = {k["pid"]: k for k in after.get("children", [])}
        for k in before.get("children", []):
            a = kids_after.get(k["pid"], {})
            lines.append(f"| child {k['pid']} (`{k['cmd'][:40]}`) | {fmt_kib(k.get('VmRSS'))} | "
                         f"{fmt_kib(a.get('VmRSS'))} | {fmt_kib(a.get('VmHWM'))} |")
        for pid, k in kids_after.items():
            if pid not in {c["pid"] for c in before.get("children", [])}:
                lines.append(f"| new child {pid} (`{k['cmd'][:40]}`) | - | {fmt_kib(k.get('VmRSS'))} | {fmt_kib(k.get('VmHWM'))} |")
        if leg.get("soak"):
            lines += soak_markdown(leg["soak"])
        rw = leg.get("rewrap")
        if rw:
            lines += ["", "- master-key rotation, rewrap of every record: "
                      + (rw["failed"] if "failed" in rw else
                         f"{rw['rewrapped']} of {rw['records']} records in {rw['active_seconds']} s of work = "
                         f"**{rw['records_per_s']:.0f} records/s** ({rw['wall_s']} s wall, including the "
                         f"job's settle time; {rw['unreadable']} unreadable)")]
        lg = leg.get("log", {})
        lines += ["", f"- log levels: {lg.get('levels')}; request statuses logged: {lg.get('request_statuses')}",
                  f"- other log events: {lg.get('events')}", ""]
    if meta.get("chart"):
        lines += ["## Chart", "", f"![throughput and p99]({meta['chart']})", ""]
    return "\n".join(lines)


def chart(results: list[dict[str, Any]], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed: no chart (pip install -r bench/requirements.txt)")
        return False
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), sharex="col")
    series: dict[tuple[str, str], dict[str, list[tuple[int, dict[str, Any]]]]] = {}
    cold: dict[tuple[str, str], dict[str, Any]] = {}  # one read-cold point per line of the read panels
    for r in results:
        if r.get("mode") in ("write", "read", "read-cold") and "rps" in r:
            name = r["target"] if r["target"] != "baseline" or r["leg"] == "sqlite" else None
            if name is None:  # baseline points of later legs: plot the first only
                continue
            if r["mode"] == "read-cold":
                cold[(name, r["listener"])] = r
                continue
            series.setdefault((name, r["listener"]), {}).setdefault(r["mode"], []).append((r["concurrency"], r))
    styles = {"unix": "-", "tcp": "--"}
    for col, mode in enumerate(("write", "read")):
        for (name, listener), modes in sorted(series.items()):
            pts = sorted(modes.get(mode, []), key=lambda x: x[0])
            if not pts:
                continue
            xs = [c for c, _ in pts]
            color = "tab:gray" if name == "baseline" else None
            marker = "s" if name == "baseline" else "o"
            kw = dict(linestyle=styles[listener], marker=marker, label=f"{name} ({listener})")
            if color:
                kw["color"] = color
            (line,) = axes[0][col].plot(xs, [r["rps"] for _, r in pts], **kw)
            axes[1][col].plot(xs, [r["p99_ms"] for _, r in pts], **kw)
            c = cold.get((name, listener)) if mode == "read" else None
            if c:  # the cold point: a cross in its line's colour, not joined to the warm line
                for row, key in ((0, "rps"), (1, "p99_ms")):
                    axes[row][col].plot([c["concurrency"]], [c[key]], linestyle="none", marker="x",
                                        markersize=10, markeredgewidth=2, color=line.get_color())
        cold_note = " (warm; × = read-cold)" if mode == "read" and cold else ""
        axes[0][col].set_title(f"{mode}: throughput{cold_note}")
        axes[0][col].set_ylabel("requests/s")
        axes[1][col].set_title(f"{mode}: p99 latency{cold_note}")
        axes[1][col].set_ylabel("p99 (ms)")
        axes[1][col].set_yscale("log")
        axes[1][col].set_xlabel("concurrency (connections)")
        for row in (0, 1):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.grid(True, which="both", alpha=0.3)
        axes[1][col].set_xticks(sorted({c for m in series.values() for c, _ in m.get(mode, [])}))
        axes[1][col].get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axes[0][col].set_ylim(bottom=0)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- main -------------------------------------------------------------------------------------------


class Stop(Exception):
    pass


class DaemonDied(Exception):
    pass


def _on_signal(signum: int, _frame: Any) -> None:
    raise Stop(f"signal {signal.Signals(signum).name}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run the kmsd benchmark (see bench/README.md).")
    p.add_argument("--duration", type=float, default=None, help="measured seconds per point (default 10; --quick 2)")
    p.add_argument("--warmup", type=float, default=None, help="warm-up seconds per point (default 1; --quick 0.5)")
    p.add_argument("--quick", action="store_true", help="~2 s points (a smoke run, numbers are rough)")
    p.add_argument("--procs", type=int, default=2, help="client processes for c>=16 (default 2)")
    p.add_argument("--burst", type=int, default=2000, help="simultaneous writes in the burst (default 2000)")
    p.add_argument("--burst-timeout", type=float, default=30.0, help="per-request timeout in the burst, s")
    p.add_argument("--request-timeout", type=float, default=30.0, help="per-request timeout elsewhere, s")
    p.add_argument("--no-baseline", action="store_true", help="skip the baseline points (no ratios)")
    p.add_argument("--no-burst", action="store_true", help="skip the burst")
    p.add_argument("--no-rewrap", action="store_true", help="skip the master-key rotation at the end of a leg")
    p.add_argument("--no-datakey", action="store_true", help="skip the POST /api/datakey points")
    p.add_argument("--no-batch", action="store_true", help="skip the batch-unwrap points")
    p.add_argument("--no-envelope", action="store_true", help="skip the client-side envelope")
    p.add_argument("--envelope-mib", type=int, default=None, metavar="MIB",
                   help=f"client-side envelope: document size (default {ENVELOPE_MIB}; --quick {ENVELOPE_MIB_QUICK})")
    p.add_argument("--read-users", type=int, default=1000, metavar="N",
                   help="warm reads cycle through the first N saved tokens; read-cold uses those after (default 1000)")
    p.add_argument("--soak", type=float, default=None, metavar="SECONDS",
                   help="memory soak at the end of the SQLite leg (default 300; --quick 0 = none)")
    # ---- MariaDB/MySQL leg -------------------------------------------------------------------
    # The same kmsd points run a second time against a daemon started with
    # `--database URL` (after the SQLite leg, with the baseline interleaved
    # again). auto (the default): a private mariadbd in the temporary
    # directory (devtools/mariadb_server.py), reached over its Unix socket (--mysql-tcp:
    # its loopback port), skipped with a reason when the server binaries are
    # missing; none: no leg; a URL: that database, which must exist and be
    # reachable on loopback or a Unix socket; if it already holds master
    # keys, give the root key they were wrapped under with --root-key-file
    # (otherwise --dev generates a new one in the temporary directory).
    p.add_argument("--mysql", metavar="auto|none|URL", default="auto",
                   help="MariaDB/MySQL leg: auto (private server, default), none, or "
                        "mysql://user:pass@127.0.0.1:3306/db")
    p.add_argument("--mysql-tcp", action="store_true",
                   help="--mysql auto: reach the private server over loopback TCP instead of its Unix socket")
    p.add_argument("--skip-sqlite", action="store_true", help="run only the MariaDB/MySQL (and Galera) legs")
    # ---- Galera leg ---------------------------------------------------------------------------
    # After the MariaDB leg: a private 3-node Galera cluster
    # (devtools/galera_cluster.py), one daemon per node sharing one root key,
    # a write and a read point at c=64 in total through the three at once,
    # with wsrep_sync_wait=1 (kmsd's default) and =0. auto (the default): when
    # the Galera provider, the server binaries and rsync are there, else
    # skipped with a reason; none: no leg.
    p.add_argument("--galera", choices=("auto", "none"), default="auto",
                   help="Galera leg: auto (a private 3-node cluster when galera-4 is installed, default) or none")
    p.add_argument("--root-key-file", help="root key for the daemon (KMSD_ROOT_KEY_FILE); default: --dev key")
    p.add_argument("--log-level", help="KMSD_LOG_LEVEL for the daemon (default: kmsd's own default)")
    p.add_argument("--out", default=str(BENCH / "results"), help="results directory (default bench/results)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory (logs, database)")
    args = p.parse_args(argv)
    # --quick sets defaults, never overrides what was given
    if args.duration is None:
        args.duration = 2.0 if args.quick else 10.0
    if args.warmup is None:
        args.warmup = 0.5 if args.quick else 1.0
    if args.soak is None:
        args.soak = 0.0 if args.quick else 300.0
    if args.envelope_mib is None:
        args.envelope_mib = ENVELOPE_MIB_QUICK if args.quick else ENVELOPE_MIB
    if args.envelope_mib < 1:
        p.error("--envelope-mib must be >= 1")
    if args.duration <= 0 or args.burst < 1:
        p.error("--duration and --burst must be positive")
    if args.read_users < 1 or args.soak < 0:
        p.error("--read-users must be >= 1 and --soak >= 0")
    if args.mysql_tcp and args.mysql != "auto":
        p.error("--mysql-tcp applies to the private server of --mysql auto only")
    if args.skip_sqlite and args.mysql == "none" and args.galera == "none":
        p.error("--skip-sqlite with --mysql none and --galera none leaves nothing to run")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)

    machine = machine_info()
    started = dt.datetime.now()
    tmp = Path(tempfile.mkdtemp(prefix="kmsd-bench-", dir="/tmp"))
    stack: list[Stoppable] = []
    results: list[dict[str, Any]] = []
    legs: list[dict[str, Any]] = []
    galera: dict[str, Any] = {}  # the Galera leg, filled as it runs
    status = 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMSD_") and k != "ROOT_KEY"}
    if args.root_key_file:
        env["KMSD_ROOT_KEY_FILE"] = os.path.abspath(args.root_key_file)
    if args.log_level:
        env["KMSD_LOG_LEVEL"] = args.log_level
    # One client process writes thousands of new records a second here; the
    # default record_creation_rate (100/s per peer) would answer most of the
    # TCP writes 429. The other limits stay at their defaults.
    env["KMSD_RECORD_CREATION_RATE"] = "0"
    log(f"temporary directory {tmp}; {machine['cpu_count']} CPUs ({machine['cpu_model']}); "
        f"commit {machine['commit']}{'-dirty' if machine['dirty'] else ''}; load average {machine['loadavg_at_start']}")
    mysql_skipped = ""
    try:
        baseline = None
        base_addr: dict[str, str] = {}
        if not args.no_baseline:
            bsock, bport = str(tmp / "baseline.sock"), free_port()
            baseline = Managed("baseline", [PY, str(BENCH / "baseline.py"), "--socket", bsock,
                                            "--listen", f"127.0.0.1:{bport}"], tmp / "baseline.log", env, tmp)
            stack.append(baseline)
            wait_ready(baseline, bsock)
            base_addr = {"unix": bsock, "tcp": f"127.0.0.1:{bport}"}
        db = tmp / "kmsd.db"
        if not args.skip_sqlite:
            run_leg("sqlite", f"sqlite:///{db}", args, tmp, baseline, base_addr, env, results, legs, stack,
                    extras=True)
        if args.mysql != "none":  # MariaDB/MySQL leg (see --mysql above)
            url, server_info = mysql_database(args, tmp, stack)
            if url:
                run_leg("mysql", url, args, tmp, baseline, base_addr, env, results, legs, stack, server_info,
                        extras=args.skip_sqlite)
            elif "failed" in server_info:
                legs.append({"leg": "mysql", "database": "private MariaDB server", **server_info})
            else:
                mysql_skipped = server_info["skipped"]
        if args.galera != "none":  # Galera leg (see --galera above)
            run_galera(args, tmp, env, stack, galera)
    except (KeyboardInterrupt, Stop) as exc:
        log(f"interrupted ({str(exc) or 'Ctrl-C'}): stopping everything")
        status = 130
    except Exception as exc:  # report what we have, then fail
        log(f"FAILED: {type(exc).__name__}: {exc}")
        status = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # finish cleanup undisturbed
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        for server in reversed(stack):
            server.stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    if any(leg.get("failed") for leg in legs) or galera.get("failed") or any(
        p.get("failed") for p in galera.get("passes", [])
    ):
        status = status or 1
    # The Galera cluster's directory (its own, outside tmp: see PrivateGalera)
    # is kept with tmp, for inspection.
    galera_base = Path(galera["base"]) if galera.get("base") else None
    if not results and not galera.get("passes"):
        log(f"no results; logs in {tmp}" + (f" and {galera_base}" if galera_base else ""))
        return status or 1

    ratios(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{started:%Y-%m-%d}-{machine['commit']}{'-dirty' if machine['dirty'] else ''}{'-quick' if args.quick else ''}"
    if status:
        stem += "-partial"
    if any(out.glob(stem + ".*")):
        stem += f"-{started:%H%M%S}"
    meta = {
        "date": started.isoformat(timespec="seconds"),
        "machine": machine,
        "duration": args.duration,
        "warmup": args.warmup,
        "procs": args.procs,
        "burst": args.burst,
        "burst_timeout": args.burst_timeout,
        "quick": args.quick,
        "read_users": args.read_users,
        "cold_concurrency": COLD_CONC,
        "cold_max_tokens": COLD_MAX_TOKENS,
        "soak": args.soak,
        "mysql": args.mysql if args.mysql in ("auto", "none") else mask_url(args.mysql),
        "mysql_tcp": args.mysql_tcp,
        "mysql_skipped": mysql_skipped,
        "galera": args.galera,
        "galera_skipped": galera.get("skipped", ""),
        "datakey_concurrency": list(DATAKEY_CONC_QUICK if args.quick else DATAKEY_CONC),
        "batch_size": BATCH_SIZE,
        "batch_concurrency": list(BATCH_CONC_QUICK if args.quick else BATCH_CONC),
        "envelope_mib": args.envelope_mib,
        "targets": {"datakey_ratio_c64": DATAKEY_TARGET, "batch_deks_per_s": BATCH_TARGET,
                    "envelope_mb_s": ENVELOPE_TARGET},
        "interrupted": status != 0,
        "chart": None,
    }
    png = out / f"{stem}.png"
    if results and chart(results, png, f"kmsd vs baseline — {machine['commit']} — {machine['cpu_count']} CPUs — {started:%Y-%m-%d}"):
        meta["chart"] = png.name
    if galera.get("passes"):
        galera["comparison"] = galera_comparison(results, legs, galera)
    md = markdown(meta, legs, results, galera)
    (out / f"{stem}.md").write_text(md + "\n")
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "legs": legs, "results": results, "galera": galera}, indent=1) + "\n")
    print()
    print(md)
    print()
    log(f"wrote {out / stem}.md, .json{', .png' if meta['chart'] else ''}")
    if args.keep_tmp or status:
        log(f"logs and database kept in {tmp}" + (f"; the Galera cluster's in {galera_base}" if galera_base else ""))
    else:
        shutil.rmtree(tmp, ignore_errors=True)
        if galera_base:
            shutil.rmtree(galera_base, ignore_errors=True)
    if any(r.get("mismatches") for r in results) or any(
        (leg.get("soak") or {}).get("result", {}).get("mismatches") for leg in legs
    ) or any((p.get(mode) or {}).get("mismatches") for p in galera.get("passes", []) for mode in ("write", "read")
             ) or any((leg.get("envelope") or {}).get("identical") is False for leg in legs):
        log("MISMATCHES: some reads returned another value than was stored (or an unwrapped DEK another than "
            "/api/datakey gave, or an opened envelope another document)")
        status = status or 3
    if any(leg.get("died") for leg in legs) or any(p.get("died") for p in galera.get("passes", [])):
        status = status or 4
    return status


if __name__ == "__main__":
    sys.exit(main())
