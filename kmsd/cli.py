"""The ``kmsd`` command line (DESIGN.md §8)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence

from .config import ConfigError, Settings, load_settings
from .logs import configure_logging, get_logger

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kmsd", description="kmsd key-management daemon")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the daemon")
    serve.add_argument("--config", help="TOML config file (env KMSD_CONFIG)")
    serve.add_argument("--socket", help="Unix socket path (env KMSD_SOCKET)")
    serve.add_argument(
        "--listen",
        action="append",
        metavar="HOST:PORT",
        help="TCP listener, repeatable (env KMSD_LISTEN, comma-separated)",
    )
    serve.add_argument("--database", help="sqlite:///path or mysql://... (env KMSD_DATABASE_URL)")
    serve.add_argument(
        "--dev",
        action="store_true",
        default=None,
        help="development mode: generate a root key beside the database if none is configured",
    )
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    return load_settings(
        config_file=args.config,
        overrides={
            "socket": args.socket,
            "listen": args.listen,
            "database_url": args.database,
            "dev": args.dev,
        },
    )


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

    from .errors import KMSError
    from .server import serve

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop=stop)

    try:
        uvloop.run(run())
    except KMSError as exc:
        get_logger(process="daemon").error("startup_failed", error=exc.message)
        return 1
    except OSError as exc:
        get_logger(process="daemon").error("startup_failed", error=str(exc))
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
