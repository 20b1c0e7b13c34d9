#!/usr/bin/env python3
"""The benchmark run behind ``bench/run`` (see bench/README.md).

Starts kmsd (--dev, fresh temporary SQLite database) and bench/baseline.py
on free loopback ports and Unix sockets in a temporary directory, runs every
point with bench/load.py (kmsd and baseline interleaved, point by point, so
that each ratio compares two measurements taken at the same moment), and
writes Markdown, JSON and a PNG chart to bench/results/. Everything it
starts is stopped on exit, on Ctrl-C, on SIGTERM/SIGHUP and on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PY = sys.executable
LOAD = str(BENCH / "load.py")

WRITE_CONC = (1, 16, 64)
READ_CONC = (16, 64, 256)
LISTENERS = ("unix", "tcp")


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
    if mode == "burst":
        argv += ["--mode", "burst", "--burst", str(args.burst), "--timeout", str(args.burst_timeout)]
        limit = args.burst_timeout + 120
    else:
        argv += ["--mode", mode, "--concurrency", str(conc), "--duration", str(args.duration),
                 "--warmup", str(args.warmup), "--procs", str(args.procs if conc >= 16 else 1)]
        if mode == "read":
            if tokens and tokens.exists():
                argv += ["--tokens", str(tokens)]
            else:
                argv += ["--seed", "1000"]
        if save_tokens:
            argv += ["--save-tokens", str(save_tokens)]
        limit = args.duration + args.warmup + 180
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
    r = next(x for x in doc["results"] if x["mode"] in ("write", "read", "burst"))
    r["target"] = target
    if proc.returncode not in (0, 3):
        r["load_exit"] = proc.returncode
    for k in cpu_pids:
        if cpu0.get(k) is not None and cpu1.get(k) is not None:
            used = cpu1[k] - cpu0[k]
            r[f"cpu_{k}_s"] = round(used, 2)
            # share of one core over the whole point (incl. warmup, seeding)
    return r


def short(r: dict[str, Any]) -> str:
    if "failed_to_run" in r:
        return f"{r['target']:<14} {r['listener']:<4} {r['mode']:<5} c={r['concurrency']:<4} FAILED: {r['failed_to_run']}"
    errs = ",".join(f"{k}:{v}" for k, v in r.get("errors", {}).items()) or "-"
    return (f"{r['target']:<14} {r['listener']:<4} {r['mode']:<5} c={r['concurrency']:<4} "
            f"{r['rps']:>9.1f} req/s  p50 {r['p50_ms']:>8.2f}  p99 {r['p99_ms']:>8.2f}  max {r['max_ms']:>8.2f} ms"
            f"  ok {r['ok']}/{r['requests']}  errors {errs}  mismatches {r['mismatches']}")


def run_leg(
    leg: str, database_url: str, args: argparse.Namespace, tmp: Path, baseline: Managed | None,
    base_addr: dict[str, str], env: dict[str, str], results: list[dict[str, Any]], legs: list[dict[str, Any]],
    stack: list[Managed],
) -> None:
    sock = str(tmp / f"{leg}.sock")
    port = free_port()
    argv = [str(Path(PY).parent / "kmsd"), "serve", "--dev", "--socket", sock,
            "--listen", f"127.0.0.1:{port}", "--database", database_url]
    log(f"starting kmsd ({leg}): {' '.join(argv[1:-1] + [mask_url(database_url)])}")
    daemon = Managed(f"kmsd-{leg}", argv, tmp / f"kmsd-{leg}.log", env, tmp)
    stack.append(daemon)
    info: dict[str, Any] = {"leg": leg, "database": mask_url(database_url),
                            "socket": sock, "tcp": f"127.0.0.1:{port}"}
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
        r = run_point(target=target, address=addr[listener], listener=listener, mode=mode, conc=conc, args=args,
                      tmp=tmp, tokens=tokens, save_tokens=save, verify=True, cpu_pids=kmsd_cpu)
        r["leg"] = leg
        results.append(r)
        log(short(r))
        if not daemon.alive():
            info["died"] = f"exit code {daemon.proc.returncode} during {listener} {mode} c={conc}"
            log(f"kmsd ({leg}) DIED during {listener} {mode} c={conc}:\n{tail(daemon.logfile)}")
            raise DaemonDied()
        if baseline and not args.no_baseline:
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
            for c in READ_CONC:
                point(listener, "read", c, tokens=tokens)
        if not args.no_burst:
            for listener in LISTENERS:
                point(listener, "burst", args.burst)
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


# -- reports -------------------------------------------------------------------------------------


def fmt_kib(v: int | None) -> str:
    return f"{v / 1024:.1f} MiB" if isinstance(v, int) else "-"


def ratios(results: list[dict[str, Any]]) -> None:
    """kmsd req/s as a fraction of the baseline's at the same point."""
    base = {(r["leg"], r["listener"], r["mode"], r["concurrency"]): r
            for r in results if r["target"] == "baseline" and "rps" in r}
    for r in results:
        if r["target"] != "baseline" and "rps" in r:
            b = base.get((r["leg"], r["listener"], r["mode"], r["concurrency"]))
            if b and b["rps"]:
                r["ratio_vs_baseline"] = round(r["rps"] / b["rps"], 3)


def markdown(meta: dict[str, Any], legs: list[dict[str, Any]], results: list[dict[str, Any]]) -> str:
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
        "",
        "## Throughput and latency",
        "",
        "ratio = kmsd req/s ÷ baseline req/s at the same point (the baseline is bench/baseline.py, "
        "aiohttp answering a fixed body). CPU = seconds of CPU the server (daemon / vault) used during the point, "
        "per second of the point.",
        "",
        "| target | via | mode | conc | req/s | ratio | p50 ms | p90 ms | p99 ms | max ms | ok/reqs | errors | mismatches | CPU daemon/vault |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in results:
        if r.get("mode") == "burst":
            continue
        if "failed_to_run" in r:
            lines.append(f"| {r['target']} | {r['listener']} | {r['mode']} | {r['concurrency']} | "
                         f"FAILED: {r['failed_to_run'][:120]} | | | | | | | | | |")
            continue
        errs = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "-"
        el = r["elapsed_s"] + meta["warmup"]
        cpu = "-"
        if "cpu_daemon_s" in r:
            cpu = f"{r['cpu_daemon_s'] / el:.2f} / {r.get('cpu_vault_s', 0) / el:.2f}"
        elif "cpu_baseline_s" in r:
            cpu = f"{r['cpu_baseline_s'] / el:.2f}"
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
    lines += ["", "## Daemon", ""]
    for leg in legs:
        lines.append(f"### kmsd-{leg['leg']} ({leg['database']})")
        lines.append("")
        if leg.get("failed"):
            lines += [f"- **did not start**: exit code {leg.get('exit_code')}", "", "```", leg["failed"], "```", ""]
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
    for r in results:
        if r.get("mode") in ("write", "read") and "rps" in r:
            name = r["target"] if r["target"] != "baseline" or r["leg"] == "sqlite" else None
            if name is None:  # baseline points of later legs: plot the first only
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
            axes[0][col].plot(xs, [r["rps"] for _, r in pts], **kw)
            axes[1][col].plot(xs, [r["p99_ms"] for _, r in pts], **kw)
        axes[0][col].set_title(f"{mode}: throughput")
        axes[0][col].set_ylabel("requests/s")
        axes[1][col].set_title(f"{mode}: p99 latency")
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
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per point (default 10)")
    p.add_argument("--warmup", type=float, default=None, help="warm-up seconds per point (default 1; --quick 0.5)")
    p.add_argument("--quick", action="store_true", help="~2 s points (a smoke run, numbers are rough)")
    p.add_argument("--procs", type=int, default=2, help="client processes for c>=16 (default 2)")
    p.add_argument("--burst", type=int, default=2000, help="simultaneous writes in the burst (default 2000)")
    p.add_argument("--burst-timeout", type=float, default=30.0, help="per-request timeout in the burst, s")
    p.add_argument("--request-timeout", type=float, default=30.0, help="per-request timeout elsewhere, s")
    p.add_argument("--no-baseline", action="store_true", help="skip the baseline points (no ratios)")
    p.add_argument("--no-burst", action="store_true", help="skip the burst")
    p.add_argument("--no-rewrap", action="store_true", help="skip the master-key rotation at the end of a leg")
    # ---- MariaDB/MySQL leg hook -------------------------------------------------------------
    # Given a URL, the same kmsd points run a second time against a daemon
    # started with `--database URL` (after the SQLite leg, with the baseline
    # interleaved again). Skipped when not given. The database must exist and
    # be reachable on loopback or a Unix socket; if it already holds master
    # keys, give the root key they were wrapped under with --root-key-file
    # (otherwise --dev generates a new one in the temporary directory).
    p.add_argument("--mysql", metavar="URL", help="also run a MariaDB/MySQL leg: mysql://user:pass@127.0.0.1:3306/db")
    p.add_argument("--skip-sqlite", action="store_true", help="run only the --mysql leg")
    p.add_argument("--root-key-file", help="root key for the daemon (KMSD_ROOT_KEY_FILE); default: --dev key")
    p.add_argument("--log-level", help="KMSD_LOG_LEVEL for the daemon (default: kmsd's own default)")
    p.add_argument("--out", default=str(BENCH / "results"), help="results directory (default bench/results)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory (logs, database)")
    args = p.parse_args(argv)
    if args.quick:
        args.duration = 2.0
    if args.warmup is None:
        args.warmup = 0.5 if args.quick else 1.0
    if args.duration <= 0 or args.burst < 1:
        p.error("--duration and --burst must be positive")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)

    machine = machine_info()
    started = dt.datetime.now()
    tmp = Path(tempfile.mkdtemp(prefix="kmsd-bench-", dir="/tmp"))
    stack: list[Managed] = []
    results: list[dict[str, Any]] = []
    legs: list[dict[str, Any]] = []
    status = 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMSD_") and k != "ROOT_KEY"}
    if args.root_key_file:
        env["KMSD_ROOT_KEY_FILE"] = os.path.abspath(args.root_key_file)
    if args.log_level:
        env["KMSD_LOG_LEVEL"] = args.log_level
    log(f"temporary directory {tmp}; {machine['cpu_count']} CPUs ({machine['cpu_model']}); "
        f"commit {machine['commit']}{'-dirty' if machine['dirty'] else ''}; load average {machine['loadavg_at_start']}")
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
            run_leg("sqlite", f"sqlite:///{db}", args, tmp, baseline, base_addr, env, results, legs, stack)
        if args.mysql:  # MariaDB/MySQL leg (hook; see --mysql above)
            run_leg("mysql", args.mysql, args, tmp, baseline, base_addr, env, results, legs, stack)
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

    if any(leg.get("failed") for leg in legs):
        status = status or 1
    if not results:
        log(f"no results; logs in {tmp}")
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
        "interrupted": status != 0,
        "chart": None,
    }
    png = out / f"{stem}.png"
    if chart(results, png, f"kmsd vs baseline — {machine['commit']} — {machine['cpu_count']} CPUs — {started:%Y-%m-%d}"):
        meta["chart"] = png.name
    md = markdown(meta, legs, results)
    (out / f"{stem}.md").write_text(md + "\n")
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "legs": legs, "results": results}, indent=1) + "\n")
    print()
    print(md)
    print()
    log(f"wrote {out / stem}.md, .json{', .png' if meta['chart'] else ''}")
    if args.keep_tmp or status:
        log(f"logs and database kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    if any(r.get("mismatches") for r in results):
        log("MISMATCHES: some reads returned another value than was stored")
        status = status or 3
    if any(leg.get("died") for leg in legs):
        status = status or 4
    return status


if __name__ == "__main__":
    sys.exit(main())
