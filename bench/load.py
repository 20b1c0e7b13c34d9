#!/usr/bin/env python3
"""Load generator for kmsd (and for bench/baseline.py).

Drives a running daemon over its Unix socket or loopback TCP with keep-alive
aiohttp connections, at a fixed concurrency, for a bounded time and/or a
bounded number of requests:

  write   POST /api/keys with unique user ids; collects the access tokens
  read    GET /api/keys cycling through tokens, checking every plaintext
          (tokens from --tokens FILE, else a short seeding write phase)
  both    a write phase, then a read phase over the tokens it collected
  burst   N simultaneous writes, each on its own connection opened at once
  datakey POST /api/datakey cycling through tokens (as read does), checking
          that every answer is a data key (64 hex digits and its wrapped form)
  batch-unwrap
          POST /api/decrypt-dek with {"batch": [--batch-size items]}: first
          one record (its token) and --batch-size data keys from
          /api/datakey (with --context, each with its own context), then the
          same batch over and over, every answer checked against the keys
          /api/datakey gave; counts DEKs (items answered {"dek": ...})

Examples:
  python bench/load.py --unix /run/kmsd/kmsd.sock --mode write --concurrency 64 --duration 10
  python bench/load.py --tcp 127.0.0.1:8000 --mode both --concurrency 16 --duration 5
  python bench/load.py --unix /tmp/k.sock --mode burst --burst 2000 --json out.json
  python bench/load.py --unix /tmp/k.sock --mode datakey -c 64 -d 5 --tokens t.jsonl --max-tokens 1000
  python bench/load.py --unix /tmp/k.sock --mode batch-unwrap -c 2 -d 5 --batch-size 1000 --context

Only loopback TCP addresses and Unix sockets are accepted as targets.
Every loop is bounded by --duration and/or --max-requests (and a hard
per-phase time limit); burst by --burst and --timeout.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import ctypes
import errno
import ipaddress
import json
import math
import multiprocessing as mp
import resource
import secrets
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp

try:
    import uvloop
except ImportError:  # pragma: no cover - kmsd depends on uvloop
    uvloop = None

PATH = "/api/keys"
DATAKEY_PATH = "/api/datakey"
UNWRAP_PATH = "/api/decrypt-dek"
JSON_HEADERS = {"Content-Type": "application/json"}
# A phase never runs longer than its duration plus this (slow stragglers are
# cancelled and counted as "timeout").
GRACE = 15.0


# -- targets ---------------------------------------------------------------------


class Target:
    def __init__(self, unix: str | None, tcp: str | None) -> None:
        if bool(unix) == bool(tcp):
            raise SystemExit("give exactly one of --unix PATH or --tcp HOST:PORT")
        self.unix = unix
        self.tcp = tcp
        if tcp:
            host, _, port = tcp.rpartition(":")
            host = host.strip("[]")
            if host == "localhost":
                host = "127.0.0.1"
            try:
                if not ipaddress.ip_address(host).is_loopback:
                    raise ValueError
            except ValueError:
                raise SystemExit(f"--tcp must be a loopback address (127.0.0.0/8 or ::1), got {tcp!r}") from None
            self.base = f"http://{'[' + host + ']' if ':' in host else host}:{int(port)}"
            self.listener = "tcp"
        else:
            self.base = "http://localhost"  # Host: localhost
            self.listener = "unix"
        self.url = self.base + PATH
        self.datakey_url = self.base + DATAKEY_PATH
        self.unwrap_url = self.base + UNWRAP_PATH

    def connector(self, limit: int, *, force_close: bool = False) -> aiohttp.BaseConnector:
        kw: dict[str, Any] = dict(limit=limit, limit_per_host=0)
        if force_close:
            kw["force_close"] = True
        else:
            kw["keepalive_timeout"] = 120
        if self.unix:
            return aiohttp.UnixConnector(path=self.unix, **kw)
        return aiohttp.TCPConnector(use_dns_cache=True, ttl_dns_cache=None, **kw)

    def describe(self) -> str:
        return f"unix:{self.unix}" if self.unix else f"tcp:{self.tcp}"


# -- one phase in one process ----------------------------------------------------------


class Stats:
    """What one process measured in one phase (latencies in seconds)."""

    def __init__(self) -> None:
        self.lat = array.array("d")
        self.errors: Counter[str] = Counter()
        self.ok = 0
        self.requests = 0
        self.mismatches = 0
        self.tokens: list[tuple[str, str]] = []
        self.started = 0.0
        self.finished = 0.0
        # Batch phases: items answered {"dek": ...} (and, verifying, equal to
        # the key /api/datakey gave), and the item-level errors by code.
        self.items = 0
        self.item_errors: Counter[str] = Counter()

    def to_wire(self) -> dict[str, Any]:
        return {
            "lat": self.lat.tobytes(),
            "errors": dict(self.errors),
            "ok": self.ok,
            "requests": self.requests,
            "mismatches": self.mismatches,
            "items": self.items,
            "item_errors": dict(self.item_errors),
            "tokens": self.tokens,
            "started": self.started,
            "finished": self.finished,
        }


def _conn_error(exc: BaseException) -> str:
    """A short, countable name: "timeout", "conn:EAGAIN", "conn:ServerDisconnectedError"."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    os_error = getattr(exc, "os_error", None) or (exc if isinstance(exc, OSError) else None)
    if isinstance(os_error, OSError) and os_error.errno in errno.errorcode:
        return "conn:" + errno.errorcode[os_error.errno]
    return "conn:" + type(exc).__name__


def _session(target: Target, limit: int, timeout: float, *, force_close: bool = False) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=target.connector(limit, force_close=force_close),
        timeout=aiohttp.ClientTimeout(total=timeout),
        skip_auto_headers=("User-Agent",),
        auto_decompress=False,
    )


# What a timed phase sends for its i-th request: the body (None for a GET) and
# the headers.
_Request = tuple[bytes | None, dict[str, str]]
# A timed phase's look at one answer 200 to its i-th request: True if the
# request counts as ok. It counts its own failures in the stats ("bad_body",
# mismatches, items); ``measured`` says whether the request was sent after
# the warm-up.
_Check = Callable[[Stats, int, bytes, bool], bool]


async def _settle(st: Stats, tasks: Sequence[asyncio.Task[None]], hard: float) -> None:
    """Wait for the tasks at most ``hard`` seconds; cancel the others, each
    counted as "timeout"."""
    _, pending = await asyncio.wait(tasks, timeout=hard)
    for t in pending:
        t.cancel()
        st.errors["timeout"] += 1
    await asyncio.gather(*pending, return_exceptions=True)
    st.finished = time.time()


async def _drive(
    target: Target,
    method: str,
    url: str,
    request: Callable[[int], _Request],
    check: _Check,
    *,
    concurrency: int,
    duration: float,
    max_requests: int,
    start_at: float,
    timeout: float,
    warmup: float,
) -> Stats:
    """The loop of every timed phase: from start_at, ``concurrency`` workers
    on one keep-alive session send ``request(0)``, ``request(1)``, ... until
    warmup + duration has passed or max_requests were sent, and hand every
    answer 200 to ``check``. Only a request sent after the warm-up is counted
    in requests, lat and ok; errors are counted either way, the warm-up's as
    "warmup:<name>". Workers still running duration + warmup + GRACE seconds
    after the start are cancelled, each counted as "timeout"."""
    st = Stats()
    counter = 0
    limit = max_requests if max_requests > 0 else math.inf

    async with _session(target, concurrency, timeout) as session:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        t0 = time.perf_counter()
        measure_from = t0 + warmup
        deadline = measure_from + duration if duration > 0 else math.inf
        st.started = time.time() + warmup

        async def worker() -> None:
            nonlocal counter
            perf = time.perf_counter
            send = session.request
            while counter < limit and perf() < deadline:
                i = counter
                counter += 1
                data, headers = request(i)
                t = perf()
                measured = t >= measure_from
                try:
                    async with send(method, url, data=data, headers=headers) as resp:
                        raw = await resp.read()
                        status = resp.status
                except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                    st.errors[("" if measured else "warmup:") + _conn_error(exc)] += 1
                    st.requests += measured
                    continue
                if measured:
                    st.requests += 1
                    st.lat.append(perf() - t)
                if status != 200:
                    st.errors[("" if measured else "warmup:") + str(status)] += 1
                    continue
                if check(st, i, raw, measured):
                    st.ok += measured

        tasks = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
        await _settle(st, tasks, (duration if duration > 0 else 300.0) + warmup + GRACE)
    return st


async def _write_phase(
    target: Target,
    concurrency: int,
    duration: float,
    max_requests: int,
    prefix: str,
    data_size: int,
    keep_tokens: bool,
    start_at: float,
    timeout: float,
    warmup: float = 0.0,
) -> Stats:
    # Bodies are bytes built from a template: no json.dumps per request. The
    # user id is unique per process (prefix) and per request (counter).
    pad = "x" * max(0, data_size - len(prefix) - 8)
    # %-formatting on purpose: the template is filled by % per request (the fastest way).
    template = ('{"data":"d%s-%%d%s","user_id":"%s-%%d"}' % (prefix, pad, prefix)).encode()  # noqa: UP031
    data_template = f"d{prefix}-%d{pad}"

    def check(st: Stats, i: int, raw: bytes, measured: bool) -> bool:
        try:
            token = json.loads(raw)["access_token"]
        except (ValueError, KeyError, TypeError):
            st.errors["bad_body"] += 1
            return False
        if keep_tokens:
            st.tokens.append((token, data_template % i))
        return True

    return await _drive(target, "POST", target.url, lambda i: (template % (i, i), JSON_HEADERS), check,
                        concurrency=concurrency, duration=duration, max_requests=max_requests,
                        start_at=start_at, timeout=timeout, warmup=warmup)


async def _read_phase(
    target: Target,
    concurrency: int,
    duration: float,
    max_requests: int,
    tokens: list[tuple[str, str]],
    verify: bool,
    start_at: float,
    timeout: float,
    warmup: float = 0.0,
) -> Stats:
    if not tokens:
        raise SystemExit("read phase without tokens")
    # Requests and expected plaintexts prepared once per token.
    requests: list[_Request] = [(None, {"Authorization": "Bearer " + tok}) for tok, _ in tokens]
    expected = [data for _, data in tokens]
    n = len(requests)
    loads = json.loads

    def check(st: Stats, i: int, raw: bytes, measured: bool) -> bool:
        if verify:
            try:
                if loads(raw)["data"] != expected[i % n]:
                    st.mismatches += 1
            except (ValueError, KeyError, TypeError):
                st.mismatches += 1
        return True

    return await _drive(target, "GET", target.url, lambda i: requests[i % n], check,
                        concurrency=concurrency, duration=duration, max_requests=max_requests,
                        start_at=start_at, timeout=timeout, warmup=warmup)


async def _datakey_phase(
    target: Target,
    concurrency: int,
    duration: float,
    max_requests: int,
    tokens: list[tuple[str, str]],
    verify: bool,
    start_at: float,
    timeout: float,
    warmup: float = 0.0,
) -> Stats:
    """POST /api/datakey with the tokens in turn (one subject each, as the
    read phase presents them). Verifying: every answer must hold a data key
    (64 hex digits) and its wrapped form, else it counts as "bad_body"."""
    if not tokens:
        raise SystemExit("datakey phase without tokens")
    requests: list[_Request] = [(b"{}", {"Authorization": "Bearer " + tok, **JSON_HEADERS}) for tok, _ in tokens]
    n = len(requests)
    loads = json.loads

    def check(st: Stats, i: int, raw: bytes, measured: bool) -> bool:
        if not verify:
            return True
        try:
            doc = loads(raw)
            good = len(bytes.fromhex(doc["dek"])) == 32 and isinstance(doc["encrypted_dek"], str)
        except (ValueError, KeyError, TypeError):
            good = False
        if not good:
            st.errors[("" if measured else "warmup:") + "bad_body"] += 1
        return good

    return await _drive(target, "POST", target.datakey_url, lambda i: requests[i % n], check,
                        concurrency=concurrency, duration=duration, max_requests=max_requests,
                        start_at=start_at, timeout=timeout, warmup=warmup)


async def _batch_phase(
    target: Target,
    concurrency: int,
    duration: float,
    max_requests: int,
    body: bytes,
    headers: dict[str, str],
    expected: list[dict[str, str]],
    verify: bool,
    start_at: float,
    timeout: float,
    warmup: float = 0.0,
) -> Stats:
    """The same batch request over and over. A request is ok when it is
    answered 200 with exactly len(expected) entries, every one a DEK (and,
    verifying, the DEK /api/datakey gave for that item); items counts the
    entries that were, whatever became of their request."""
    size = len(expected)
    request: _Request = (body, headers)

    def check(st: Stats, i: int, raw: bytes, measured: bool) -> bool:
        try:
            entries = json.loads(raw)["batch"]
            if not isinstance(entries, list):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            st.errors[("" if measured else "warmup:") + "bad_body"] += 1
            return False
        if verify and entries == expected:  # the usual case, one comparison in C
            st.items += size * measured
            return True
        good = 0
        for j, entry in enumerate(entries):
            if not isinstance(entry, dict):
                st.item_errors["bad_entry"] += measured
            elif "dek" in entry:
                if verify and (j >= size or entry != expected[j]):
                    st.mismatches += measured
                else:
                    good += 1
            else:
                st.item_errors[str(entry.get("code") or entry.get("status") or "bad_entry")] += measured
        st.items += good * measured
        if len(entries) != size:
            st.errors[("" if measured else "warmup:") + "wrong_count"] += 1
            return False
        if good != size:
            st.errors[("" if measured else "warmup:") + "item_errors"] += 1
            return False
        return True

    return await _drive(target, "POST", target.unwrap_url, lambda i: request, check,
                        concurrency=concurrency, duration=duration, max_requests=max_requests,
                        start_at=start_at, timeout=timeout, warmup=warmup)


async def prepare_batch(target: Target, size: int, context: bool, prefix: str, verify: bool,
                        timeout: float) -> dict[str, Any]:
    """What a batch phase sends: one new record (for its token: every DEK is
    bound to that subject), ``size`` data keys from /api/datakey at c=16
    (each with the context {"doc": "<prefix>-<i>"} when ``context``), the
    batch body and the answer expected. Verifying, and with contexts, one
    DEK is also asked for alone with its context, with another and with
    none: kmsd binds the context, so only the first may answer 200."""
    info: dict[str, Any] = {"batch_size": size, "context": context}
    t0 = time.perf_counter()
    async with _session(target, 16, timeout) as session:
        record = json.dumps({"user_id": f"{prefix}-batch", "data": "batch"}).encode()
        async with session.post(target.url, data=record, headers=JSON_HEADERS) as resp:
            raw = await resp.read()
            if resp.status != 200:
                raise SystemExit(f"batch set-up: POST {PATH} answered {resp.status}: {raw[:200]!r}")
        headers = {"Authorization": "Bearer " + json.loads(raw)["access_token"], **JSON_HEADERS}
        contexts = [{"doc": f"{prefix}-{i}"} if context else None for i in range(size)]
        keys: list[tuple[str, str]] = [("", "")] * size
        next_i = 0

        async def one(i: int) -> None:
            body = json.dumps({"context": contexts[i]} if context else {}).encode()
            async with session.post(target.datakey_url, data=body, headers=headers) as resp:
                raw = await resp.read()
                if resp.status != 200:
                    raise SystemExit(f"batch set-up: POST {DATAKEY_PATH} answered {resp.status}: {raw[:200]!r}")
            doc = json.loads(raw)
            keys[i] = (doc["dek"], doc["encrypted_dek"])

        async def worker() -> None:
            nonlocal next_i
            while next_i < size:
                i = next_i
                next_i += 1
                await one(i)

        await asyncio.gather(*(worker() for _ in range(16)))
        items: list[dict[str, Any]] = []
        for (_, wrapped), ctx in zip(keys, contexts, strict=True):
            item: dict[str, Any] = {"encrypted_dek": wrapped}
            if ctx is not None:
                item["context"] = ctx
            items.append(item)
        if verify and context:
            # Is the context bound? The first DEK alone: with its context,
            # with another one, without any.
            checks = {}
            for name, ctx in (("same", contexts[0]), ("other", {"doc": f"{prefix}-other"}), ("none", None)):
                single: dict[str, Any] = {"encrypted_dek": keys[0][1]}
                if ctx is not None:
                    single["context"] = ctx
                async with session.post(target.unwrap_url, data=json.dumps(single).encode(), headers=headers) as resp:
                    raw = await resp.read()
                    ok = resp.status == 200 and json.loads(raw).get("dek") == keys[0][0]
                    checks[name] = f"{resp.status}" + ("" if resp.status != 200 else " same DEK" if ok else " OTHER DEK")
            info["context_check"] = checks
            info["context_bound"] = checks["same"] == "200 same DEK" and not any(
                checks[k].startswith("200") for k in ("other", "none"))
    info["setup_s"] = round(time.perf_counter() - t0, 2)
    body = json.dumps({"batch": items}, separators=(",", ":")).encode()
    info["body_bytes"] = len(body)
    return {"body": body, "headers": headers, "expected": [{"dek": dek} for dek, _ in keys], "info": info}


async def _burst_phase(target: Target, n: int, prefix: str, data_size: int, timeout: float, start_at: float) -> Stats:
    """n writes at once, each on its own fresh connection (force_close: no
    reuse, no connector limit): as close to n simultaneous connects as one
    event loop gets."""
    st = Stats()
    url = target.url
    pad = "x" * max(0, data_size - len(prefix) - 8)
    bodies = [('{"data":"d%s-%d%s","user_id":"%s-%d"}' % (prefix, i, pad, prefix, i)).encode() for i in range(n)]  # noqa: UP031
    gate = asyncio.Event()

    async with _session(target, 0, timeout, force_close=True) as session:

        async def one(body: bytes) -> None:
            await gate.wait()
            st.requests += 1
            t = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=JSON_HEADERS) as resp:
                    await resp.read()
                    status = resp.status
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                st.errors[_conn_error(exc)] += 1
                return
            st.lat.append(time.perf_counter() - t)
            if status == 200:
                st.ok += 1
            else:
                st.errors[str(status)] += 1

        tasks = [asyncio.ensure_future(one(b)) for b in bodies]
        await asyncio.sleep(0)  # every task is parked on the gate
        await asyncio.sleep(max(0.0, start_at - time.time()))
        st.started = time.time()
        gate.set()
        await _settle(st, tasks, timeout + GRACE)
    return st


def _run(coro: Any) -> Any:
    if uvloop is not None:
        return uvloop.run(coro)
    return asyncio.run(coro)


def _child(kind: str, kwargs: dict[str, Any], barrier: Any, out: Any) -> None:
    """One worker process: wait for the others, run the phase, send stats."""
    try:
        with contextlib.suppress(Exception):  # PR_SET_PDEATHSIG: leave with the parent
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)
        _raise_nofile()
        target = Target(kwargs.pop("unix"), kwargs.pop("tcp"))
        barrier.wait(timeout=30)
        start_at = kwargs.pop("start_at_offset") + time.time()
        coro = _PHASES[kind](target, start_at=start_at, **kwargs)
        out.put(("ok", _run(coro).to_wire()))
    except BaseException as exc:  # report, never hang the parent
        out.put(("error", f"{type(exc).__name__}: {exc}"))


_PHASES = {"write": _write_phase, "read": _read_phase, "burst": _burst_phase, "datakey": _datakey_phase,
           "batch-unwrap": _batch_phase}


# -- running a phase on N processes and merging ------------------------------------------


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run_phase(kind: str, target: Target, procs: int, **kw: Any) -> dict[str, Any]:
    """Run one phase on ``procs`` processes (1: in this process) and merge."""
    conc = kw.get("concurrency", 1)
    procs = max(1, min(procs, conc)) if kind != "burst" else max(1, procs)
    if kw.get("max_requests", 0) > 0:  # a process given a share of 0 would run uncapped
        procs = min(procs, kw["max_requests"])
    wires: list[dict[str, Any]] = []
    if procs == 1:
        _raise_nofile()
        coro = _PHASES[kind](target, start_at=time.time(), **kw)
        wires.append(_run(coro).to_wire())
    else:
        ctx = mp.get_context("fork")
        barrier = ctx.Barrier(procs)
        out = ctx.Queue()
        children = []
        concs = _split(conc, procs) if kind != "burst" else [0] * procs
        maxes = _split(kw.get("max_requests", 0), procs) if kw.get("max_requests", 0) > 0 else [0] * procs
        bursts = _split(kw.get("n", 0), procs) if kind == "burst" else [0] * procs
        tokens = kw.get("tokens")
        # Each process starts at its own offset: the tokens are split the way
        # --max-requests is, so that a phase with --max-requests = len(tokens)
        # reads every token exactly once (the cold-token read); offsets of
        # len*p//procs made two processes share a token when the count was odd.
        shares = _split(len(tokens), procs) if tokens is not None else [0] * procs
        offsets = [sum(shares[:p]) for p in range(procs)]
        for p in range(procs):
            ck = dict(kw, unix=target.unix, tcp=target.tcp, start_at_offset=0.2)
            if kind != "burst":
                ck["concurrency"] = concs[p]
                ck["max_requests"] = maxes[p]
            else:
                ck["n"] = bursts[p]
            if "prefix" in ck:
                ck["prefix"] = f"{ck['prefix']}p{p}"
            if tokens is not None:
                # every process cycles through all tokens, from its own offset
                off = offsets[p]
                ck["tokens"] = tokens[off:] + tokens[:off]
            c = ctx.Process(target=_child, args=(kind, ck, barrier, out), daemon=True)
            c.start()
            children.append(c)
        limit = (kw.get("duration", 0) or kw.get("timeout", 30)) + kw.get("warmup", 0)
        hard_deadline = time.monotonic() + limit + GRACE + 60
        failures = []
        for _ in children:
            left = max(1.0, hard_deadline - time.monotonic())
            try:
                status, payload = out.get(timeout=left)
            except Exception:
                failures.append("worker process did not report in time")
                break
            if status == "ok":
                wires.append(payload)
            else:
                failures.append(payload)
        for c in children:
            c.join(timeout=5)
            if c.is_alive():
                c.kill()
                c.join()
        if failures and not wires:
            raise SystemExit("load worker failed: " + "; ".join(failures))
    return merge(kind, target, procs, kw, wires)


def percentile(sorted_vals: Any, q: float) -> float:
    if not sorted_vals:
        return float("nan")
    k = max(0, min(len(sorted_vals) - 1, math.ceil(q / 100.0 * len(sorted_vals)) - 1))
    return sorted_vals[k]


def merge(kind: str, target: Target, procs: int, kw: dict[str, Any], wires: list[dict[str, Any]]) -> dict[str, Any]:
    lat = array.array("d")
    errors: Counter[str] = Counter()
    ok = requests = mismatches = items = 0
    item_errors: Counter[str] = Counter()
    tokens: list[tuple[str, str]] = []
    started = min(w["started"] for w in wires)
    finished = max(w["finished"] for w in wires)
    for w in wires:
        a = array.array("d")
        a.frombytes(w["lat"])
        lat.extend(a)
        errors.update(w["errors"])
        ok += w["ok"]
        requests += w["requests"]
        mismatches += w["mismatches"]
        items += w["items"]
        item_errors.update(w["item_errors"])
        tokens.extend(map(tuple, w["tokens"]))
    vals = sorted(lat)
    elapsed = max(1e-9, finished - started)
    ms = lambda v: round(v * 1000.0, 3)  # noqa: E731
    result = {
        "mode": kind,
        "listener": target.listener,
        "target": target.describe(),
        "concurrency": kw.get("concurrency", kw.get("n")),
        "procs": procs,
        "elapsed_s": round(elapsed, 3),
        "requests": requests,
        "ok": ok,
        "rps": round(ok / elapsed, 1),
        "p50_ms": ms(percentile(vals, 50)),
        "p90_ms": ms(percentile(vals, 90)),
        "p99_ms": ms(percentile(vals, 99)),
        "max_ms": ms(vals[-1]) if vals else float("nan"),
        "errors": dict(sorted(errors.items())),
        "error_count": sum(errors.values()),
        "mismatches": mismatches,
    }
    if kind == "batch-unwrap":
        result["batch_size"] = len(kw["expected"])
        result["items"] = items
        result["items_per_s"] = round(items / elapsed, 1)
        result["item_errors"] = dict(sorted(item_errors.items()))
    if kind == "burst":
        result["burst"] = kw["n"]
        result["failed"] = requests - ok + (kw["n"] - requests)
    result["_tokens"] = tokens
    result["_lat"] = lat
    return result


# -- reporting ------------------------------------------------------------------------------

COLUMNS = [
    ("mode", "mode", "<"),
    ("listener", "via", "<"),
    ("concurrency", "conc", ">"),
    ("procs", "procs", ">"),
    ("requests", "reqs", ">"),
    ("ok", "ok", ">"),
    ("rps", "req/s", ">"),
    ("p50_ms", "p50 ms", ">"),
    ("p90_ms", "p90 ms", ">"),
    ("p99_ms", "p99 ms", ">"),
    ("max_ms", "max ms", ">"),
    ("errors", "errors", "<"),
    ("mismatches", "mism", ">"),
]


def fmt_errors(errors: dict[str, int]) -> str:
    return ",".join(f"{k}:{v}" for k, v in errors.items()) or "-"


def table(results: list[dict[str, Any]]) -> str:
    columns = COLUMNS + ([("items_per_s", "DEKs/s", ">")] if any("items_per_s" in r for r in results) else [])
    rows = []
    for r in results:
        row = []
        for key, _, _ in columns:
            v = r.get(key)
            if key == "errors":
                v = fmt_errors(v or {})
            elif isinstance(v, float):
                v = f"{v:.1f}" if key in ("rps", "items_per_s") else f"{v:.2f}"
            row.append(str(v))
        rows.append(row)
    heads = [h for _, h, _ in columns]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(heads)]
    line = lambda cells: "  ".join(  # noqa: E731
        c.ljust(w) if columns[i][2] == "<" else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    )
    return "\n".join([line(heads), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("target (exactly one)")
    g.add_argument("--unix", metavar="PATH", help="Unix socket of the daemon")
    g.add_argument("--tcp", metavar="HOST:PORT", help="loopback TCP listener, e.g. 127.0.0.1:8000")
    p.add_argument("--mode", choices=["write", "read", "both", "burst", "datakey", "batch-unwrap"], default="both")
    p.add_argument("--concurrency", "-c", type=int, default=16, help="in-flight requests (connections)")
    p.add_argument("--duration", "-d", type=float, default=10.0, help="seconds per phase (0: only --max-requests)")
    p.add_argument("--max-requests", "-n", type=int, default=0, help="cap per phase (0: no cap)")
    p.add_argument("--warmup", type=float, default=0.0,
                   help="seconds run before each timed phase and not counted (errors in it are, as warmup:*)")
    p.add_argument("--procs", type=int, default=1, help="client processes sharing the concurrency")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, s (burst: per request too)")
    p.add_argument("--burst", type=int, default=2000, help="burst mode: simultaneous writes")
    p.add_argument("--data-size", type=int, default=32, help="approximate length of the stored data string")
    p.add_argument("--tokens", metavar="FILE", help="read mode: JSON lines [token, data] from --save-tokens")
    p.add_argument("--save-tokens", metavar="FILE", help="write/both: save collected tokens (JSON lines)")
    p.add_argument("--seed", type=int, default=1000, help="read mode without --tokens: records to write first")
    p.add_argument("--max-tokens", type=int, default=20000, help="keep at most this many tokens for reading")
    p.add_argument("--skip-tokens", type=int, default=0, metavar="K",
                   help="read: leave out the first K tokens (e.g. a warm working set), then apply --max-tokens")
    p.add_argument("--batch-size", type=int, default=1000, help="batch-unwrap: items per request (default 1000)")
    p.add_argument("--context", action="store_true",
                   help='batch-unwrap: each data key made, and each item sent, with its own context {"doc": ...}')
    p.add_argument("--no-verify", action="store_true", help="do not check plaintexts (for bench/baseline.py)")
    p.add_argument("--prefix", default=None, help="user id prefix (default: random per run)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--save-latencies", metavar="FILE",
                   help="write the last phase's latency samples (seconds, native float64) to FILE, "
                        "so that several runs can be merged into one set of percentiles")
    p.add_argument("--label", default="", help="free text stored in the JSON")
    p.add_argument("--quiet", action="store_true", help="no table on stdout")
    args = p.parse_args(argv)

    if args.concurrency < 1 or args.procs < 1:
        p.error("--concurrency and --procs must be >= 1")
    if args.skip_tokens < 0 or args.max_tokens < 1:
        p.error("--skip-tokens must be >= 0 and --max-tokens >= 1")
    if args.mode != "burst" and args.duration <= 0 and args.max_requests <= 0:
        p.error("a phase must be bounded: give --duration > 0 and/or --max-requests > 0")
    target = Target(args.unix, args.tcp)
    prefix = args.prefix or ("b" + secrets.token_hex(4))
    results: list[dict[str, Any]] = []
    common = dict(duration=args.duration, max_requests=args.max_requests, timeout=args.timeout, warmup=args.warmup)
    keep = args.mode in ("both", "read") or bool(args.save_tokens)
    tokens: list[tuple[str, str]] = []

    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.mode == "burst":
        r = run_phase("burst", target, args.procs, n=args.burst, prefix=prefix + "u",
                      data_size=args.data_size, timeout=args.timeout)
        results.append(r)
    elif args.mode == "batch-unwrap":
        _raise_nofile()
        batch = _run(prepare_batch(target, args.batch_size, args.context, prefix + "k", not args.no_verify,
                                   args.timeout))
        r = run_phase("batch-unwrap", target, args.procs, concurrency=args.concurrency, body=batch["body"],
                      headers=batch["headers"], expected=batch["expected"], verify=not args.no_verify, **common)
        r.update(batch["info"])
        results.append(r)
    else:
        if args.mode in ("write", "both"):
            r = run_phase("write", target, args.procs, concurrency=args.concurrency, prefix=prefix + "w",
                          data_size=args.data_size, keep_tokens=keep, **common)
            tokens = r["_tokens"]
            results.append(r)
        if args.mode in ("read", "datakey"):
            if args.tokens:
                with open(args.tokens) as fh:
                    tokens = [tuple(json.loads(line)) for line in fh if line.strip()]
            else:
                seed = run_phase("write", target, 1, concurrency=min(args.concurrency, 64),
                                 prefix=prefix + "s", data_size=args.data_size, keep_tokens=True,
                                 duration=60.0, max_requests=args.seed, timeout=args.timeout)
                seed["mode"] = "seed"
                tokens = seed["_tokens"]
                results.append(seed)
        if args.mode in ("read", "both", "datakey"):
            tokens = tokens[args.skip_tokens:][: args.max_tokens]
            kind = "datakey" if args.mode == "datakey" else "read"
            if not tokens:
                print("load.py: no tokens to read with (every write failed?)", file=sys.stderr)
            else:
                r = run_phase(kind, target, args.procs, concurrency=args.concurrency,
                              tokens=tokens, verify=not args.no_verify, **common)
                r["tokens_used"] = len(tokens)
                results.append(r)
        if args.save_tokens:
            with open(args.save_tokens, "w") as fh:
                for t in tokens:
                    fh.write(json.dumps(t) + "\n")

    if args.save_latencies:
        with open(args.save_latencies, "wb") as fh:
            if results:
                results[-1]["_lat"].tofile(fh)
    for r in results:
        r.pop("_tokens", None)
        r.pop("_lat", None)
        r["label"] = args.label
    if not args.quiet:
        print(table(results))
    if args.json:
        doc = {"label": args.label, "target": target.describe(), "prefix": prefix, "results": results}
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=1)
    bad = any(r["mismatches"] for r in results)
    return 3 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
