"""The ``kmsd`` command line (README.md and docs/operations.md document it)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence

from .admin import add_parsers, run_mk, run_root_key
from .config import ConfigError, settings_from_args
from .logs import configure_logging, get_logger

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kmsd", description="kmsd key-management daemon")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the daemon")
    _database_args(serve)
    serve.add_argument("--socket", help="Unix socket path (env KMSD_SOCKET)")
    serve.add_argument(
        "--listen",
        action="append",
        metavar="HOST:PORT",
        help="TCP listener, repeatable (env KMSD_LISTEN, comma-separated)",
    )
    serve.add_argument(
        "--dev",
        action="store_true",
        default=None,
        help="development mode: generate a root key beside the database if none is configured",
    )

    migrate = sub.add_parser(
        "migrate-legacy",
        help="rewrite every row of the original system in the v1 format (resumable)",
        description="Works on the database directly, with compare-and-set writes: safe to run "
        "while daemons serve the same database, and safe to interrupt and run again.",
    )
    _database_args(migrate)
    migrate.add_argument("--batch-size", type=int, default=500, help="rows per batch (default 500)")
    add_parsers(sub, _database_args)

    check = sub.add_parser(
        "check-config",
        help="validate the configuration and print the effective settings (secrets masked)",
        description="Reads the config file, KMSD_* variables and credentials exactly as `kmsd serve` "
        "would; exit status 0 if they are valid, 2 if not.",
    )
    _database_args(check)

    audit = sub.add_parser("audit", help="audit trail: verify")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser(
        "verify",
        help="check the hash chain of an audit file",
        description="Detects an edited, removed, inserted or reordered line. With --head (the hash "
        "of an `audit_head` log record) also lines cut off at the end.",
    )
    verify.add_argument("file")
    verify.add_argument("--head", help="the hash the last line must have")
    verify.add_argument(
        "--from-start", action="store_true", help="the file starts the trail (its first line follows no other)"
    )
    return parser


def _database_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML config file (env KMSD_CONFIG)")
    parser.add_argument("--database", help="sqlite:///path or mysql://... (env KMSD_DATABASE_URL)")


def _move_root_key_out_of_environment() -> None:
    """``ROOT_KEY`` (the original system's way) must not stay in the daemon:
    /proc/PID/environ shows the environment a process was started with, so
    unsetting is not enough. Put it into a sealed memfd and re-execute."""
    from .vault import stash_root_key

    value = os.environ.get("ROOT_KEY")
    if not value:
        return
    fd = stash_root_key(value)
    env = {k: v for k, v in os.environ.items() if k != "ROOT_KEY"}
    env["KMSD_ROOT_KEY_FD"] = str(fd)
    os.execve(sys.executable, [sys.executable, "-m", "kmsd", *sys.argv[1:]], env)


def _serve(args: argparse.Namespace) -> int:
    _move_root_key_out_of_environment()
    try:
        settings = settings_from_args(args)
    except ConfigError as exc:
        print(f"kmsd: {exc.message}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    import uvloop

    from .daemon import serve
    from .errors import KMSError

    async def run() -> None:
        stop, hup = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, hup.set)
        await serve(
            settings, stop=stop, hup=hup,
            reload=lambda: settings_from_args(args, require_root_key=False, read_secrets=False),
        )

    try:
        uvloop.run(run())
    except KMSError as exc:
        get_logger(process="daemon").error("startup_failed", error=exc.message)
        return 1
    except OSError as exc:
        get_logger(process="daemon").error("startup_failed", error=str(exc))
        return 1
    return 0


def _migrate_legacy(args: argparse.Namespace) -> int:
    _move_root_key_out_of_environment()
    try:
        settings = settings_from_args(args)
    except ConfigError as exc:
        print(f"kmsd: {exc.message}", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print("kmsd: --batch-size must be positive", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    import uvloop

    from .errors import KMSError
    from .migrate import MigrationReport, migrate_legacy
    from .runtime import Runtime

    def progress(r: MigrationReport) -> None:
        print(
            f"migrate-legacy: {r.checked}/{r.total} rows checked, {r.upgraded} upgraded,"
            f" {r.current} already v1, {r.changed} changed meanwhile, {len(r.unreadable)} unreadable",
            file=sys.stderr,
            flush=True,
        )

    async def run() -> MigrationReport:
        async with Runtime(settings, log=get_logger(process="migrate")).running() as runtime:
            return await migrate_legacy(runtime.kms, batch_size=args.batch_size, progress=progress)

    print(
        f"migrate-legacy: working on {settings.database.masked()} directly"
        " (safe beside running daemons; safe to interrupt and run again)",
        file=sys.stderr,
    )
    try:
        report = uvloop.run(run())
    except KMSError as exc:
        print(f"kmsd: migrate-legacy stopped: {exc.message}; run it again to resume", file=sys.stderr)
        return 1
    for key_id in report.master_keys_upgraded:
        print(f"master key {key_id}: rewrapped in the v1 format")
    for user_id in report.unreadable:
        print(f"row {user_id!r}: no master key reads it; left unchanged")
    print(
        f"{report.checked} rows checked: {report.upgraded} upgraded, {report.current} already v1,"
        f" {report.changed} changed by another writer meanwhile, {len(report.unreadable)} unreadable"
    )
    return 1 if report.unreadable else 0


def _check_config(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    try:
        settings = settings_from_args(args, require_root_key=False)
    except ConfigError as exc:
        print(f"kmsd: invalid configuration: {exc.message}", file=sys.stderr)
        return 2
    effective: dict[str, object] = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if f.name == "database":
            value = value.masked()
        elif f.name == "root_key":
            value = value.describe()
        elif not f.repr:  # secrets
            value = "***" if value else None
        elif f.name == "socket_mode":
            value = f"{value:04o}"
        elif isinstance(value, tuple):
            value = [list(v) if isinstance(v, tuple) else v for v in value]
        effective[f.name] = value
    print(json.dumps(effective, indent=2, sort_keys=True))
    if not settings.root_key.configured:
        print("kmsd: warning: no root key configured: `kmsd serve` will refuse to start without --dev", file=sys.stderr)
    print("kmsd: configuration is valid", file=sys.stderr)
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    from .audit import GENESIS, verify_file

    try:
        result = verify_file(args.file, head=args.head, first_prev=GENESIS if args.from_start else None)
    except OSError as exc:
        print(f"kmsd: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    for problem in result.problems:
        print(f"{args.file}: {problem}")
    if result.ok:
        seq, head = result.head or (0, "-")
        print(f"{args.file}: {result.lines} lines, chain intact; last seq {seq}, head {head}")
        return 0
    print(f"{args.file}: {len(result.problems)} problems in {result.lines} lines")
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return _check_config(args)
    if args.command == "audit":
        return _audit_verify(args)
    if args.command == "serve":
        return _serve(args)
    if args.command == "migrate-legacy":
        return _migrate_legacy(args)
    if args.command in ("mk", "root-key"):
        # ROOT_KEY may be how the root key is given (for direct database work).
        _move_root_key_out_of_environment()
        configure_logging("warning")
        return run_mk(args) if args.command == "mk" else run_root_key(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
