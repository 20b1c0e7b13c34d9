"""The daemon process around the app: its listeners (a Unix socket and
loopback TCP side by side, or the sockets systemd passed), the privilege
drop once they are bound, readiness and the watchdog for systemd, and
SIGHUP (reopen the audit trail, reload what may change at run time)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import os
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from aiohttp import web

from .auth import peer_from_socket
from .config import Settings
from .connections import GuardedRunner, GuardedServer, Limits, raise_fd_limit
from .errors import KMSError
from .http_state import STATE, policy_from, remember_peer
from .limits import peer_key
from .logs import get_logger, set_log_level
from .privileges import harden, switch_user, user_exists
from .server import create_app
from .systemd import ListenSocket, Notifier, listen_fds, watchdog_interval

__all__ = ["apply_reload", "daemon_user", "serve", "start_listeners"]


async def start_listeners(
    app: web.Application, settings: Settings, passed: Sequence[ListenSocket] = ()
) -> web.AppRunner:
    limits = Limits(
        header_timeout=settings.header_timeout,
        max_connections=settings.max_connections,
        connection_share=settings.connection_share,
        send_timeout=settings.send_timeout,
    )
    policy = app[STATE].policy

    def classify(transport: asyncio.BaseTransport) -> tuple[Hashable, bool]:
        peer = peer_from_socket(transport.get_extra_info("socket"))
        remember_peer(transport, peer)
        return peer_key(peer.transport, peer.uid), policy.is_admin(peer)

    runner = GuardedRunner(
        app, limits, app[STATE].log, classify, access_log=None, handle_signals=False, shutdown_timeout=10,
        keepalive_timeout=settings.idle_timeout,
    )
    try:
        await runner.setup()
        if passed:
            # Socket activation: systemd bound them (mode, owner, address
            # come from kmsd.socket); the settings' addresses are not used.
            for listener in passed:
                await web.SockSite(runner, listener.sock).start()
        else:
            await _bind(runner, settings)
    except BaseException:
        # Whatever started (store threads, the vault) must stop, or the
        # process would linger after a failed start.
        await runner.cleanup()
        raise
    if isinstance(runner.server, GuardedServer):
        app[STATE].connections = runner.server
    return runner


async def _bind(runner: web.AppRunner, settings: Settings) -> None:
    if settings.socket:
        directory = os.path.dirname(os.path.abspath(settings.socket))
        os.makedirs(directory, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if os.path.exists(settings.socket) and not os.path.isdir(settings.socket):
                os.unlink(settings.socket)
        site: web.BaseSite = web.UnixSite(runner, settings.socket, backlog=4096)
        await site.start()
        os.chmod(settings.socket, settings.socket_mode)
    for host, port in settings.listen:
        site = web.TCPSite(runner, host, port, reuse_address=True, backlog=4096)
        await site.start()


def _describe(listener: ListenSocket) -> str:
    address = listener.sock.getsockname()
    if isinstance(address, tuple):
        return f"{address[0]}:{address[1]} ({listener.name})"
    return f"{address or '?'} ({listener.name})"


def _preload() -> None:
    """Load now what the standard library loads on first use: after the
    privilege drop the interpreter's own files may be unreadable (one under
    /root). json.loads of a body in UTF-16 or UTF-32 (which JSON allows)
    looks its codec up then, and failed with LookupError: a 500."""
    import codecs

    for name in ("utf-16", "utf-16-be", "utf-16-le", "utf-32", "utf-32-be", "utf-32-le", "ascii", "latin-1",
                 "idna", "punycode"):
        codecs.lookup(name)
    import _strptime  # type: ignore[import-not-found]  # noqa: F401  (datetime.strptime's, in any library)


def _hand_over(settings: Settings, user: str, created_dirs: Sequence[str] = ()) -> None:
    import pwd

    pw = pwd.getpwnam(user)
    paths = [*created_dirs, *([settings.audit_log] if settings.audit_log else [])]
    if settings.database.scheme == "sqlite":
        paths += [settings.database.path + suffix for suffix in ("", "-wal", "-shm")]
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.chown(path, pw.pw_uid, pw.pw_gid)


def daemon_user(settings: Settings) -> str | None:
    """The user a daemon started as root drops to, or None."""
    if os.geteuid() != 0:
        return None
    if settings.daemon_user:
        return settings.daemon_user
    return "kmsd" if user_exists("kmsd") else None


def apply_reload(app: web.Application, new: Settings) -> list[str]:
    """SIGHUP: take the settings that can change at run time (log level,
    peer policy, allowed hosts); the others need a restart. What changed."""
    state = app[STATE]
    old = state.settings
    reloadable = (
        "log_level", "admin_uids", "admin_gids", "allow_admin_over_tcp", "allowed_hosts",
        "client_uids", "client_gids", "allow_tcp_clients", "unbound_envelopes",
    )
    changed = [name for name in reloadable if getattr(old, name) != getattr(new, name)]
    # Secrets and the root key are re-read by a restart only (the reload may
    # run without access to them after the privilege drop): not compared.
    unseen = ("root_key", "legacy_jwt_secret")
    ignored = [
        f.name for f in dataclasses.fields(Settings)
        if f.name not in reloadable and f.name not in unseen and f.name != "database"
        and getattr(old, f.name) != getattr(new, f.name)
    ]
    if old.database.masked() != new.database.masked():
        ignored.append("database")
    state.settings = dataclasses.replace(old, **{name: getattr(new, name) for name in reloadable})
    state.policy = policy_from(state.settings)
    set_log_level(new.log_level)
    if ignored:
        state.log.warning("reload_needs_restart", settings=sorted(ignored))
    return changed


def _tune_gc() -> None:
    """A batch of a thousand DEKs makes tens of thousands of short-lived
    objects, none in a cycle: at the default threshold (700) the collector
    ran so often that it cost a third of the daemon's time (batch unwrap
    at c=4: 103k DEKs/s, 147k with this). What exists at startup (modules,
    settings, the app) is frozen: no collection scans it again."""
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


async def serve(
    settings: Settings,
    *,
    stop: asyncio.Event,
    reload: Callable[[], Settings] | None = None,
    hup: asyncio.Event | None = None,
) -> None:
    """Run until ``stop`` is set, then shut down gracefully: stop accepting,
    let in-flight requests finish, stop the rotation, the store, the vault.
    Each time ``hup`` is set, ``reload()`` gives new settings to apply."""
    log = get_logger(process="daemon")
    passed = listen_fds()
    notifier = Notifier()
    # Files kmsd creates (SQLite database, audit trail) are its own.
    os.umask(0o077)
    drop_to = daemon_user(settings)
    fds, wanted = raise_fd_limit(settings.max_connections)
    if fds < wanted:
        log.warning("open_files_limit_low", limit=fds, wanted=wanted, max_connections=settings.max_connections)
    app = create_app(settings)
    root_key_fd = settings.root_key.fd
    if drop_to is not None or root_key_fd is not None:
        # A launcher starts the vaults: one that stays root when the daemon
        # drops, and the one process besides the vaults that holds ROOT_KEY's
        # sealed memfd, so that the daemon can let go of it.
        app[STATE].vault.start_launcher()
        if root_key_fd is not None:
            os.close(root_key_fd)
    runner = await start_listeners(app, settings, passed)
    if drop_to is not None:
        await _drop_privileges(app, runner, settings, drop_to)
    elif os.geteuid() == 0:
        log.warning(
            "running_as_root",
            warning="no 'kmsd' user (make install creates it) and no daemon_user: the daemon keeps root",
        )
    server = runner.server
    if server is not None:
        app[STATE].metrics.open_connections.set_function(lambda: len(server.connections))
    if passed:
        addresses = [_describe(p) for p in passed]
    else:
        addresses = [settings.socket] + [f"{h}:{p}" for h, p in settings.listen]
    _warn_about(settings, log)
    _tune_gc()
    log.info(
        "kmsd_started",
        listen=addresses,
        socket_activated=bool(passed),
        database=settings.database.masked(),
        root_key_source=settings.root_key.describe(),
        vault_pid=app[STATE].vault.pid,
    )
    notifier.ready(f"serving on {', '.join(addresses)}")
    tasks = []
    interval = watchdog_interval()
    if interval and notifier.enabled:
        tasks.append(asyncio.create_task(_watchdog(notifier, interval), name="watchdog"))
    if hup is not None and reload is not None:
        tasks.append(asyncio.create_task(_reloader(app, notifier, hup, reload), name="reload"))
    try:
        await stop.wait()
    finally:
        log.info("kmsd_stopping")
        notifier.stopping("finishing in-flight requests")
        for task in tasks:
            task.cancel()
        await runner.cleanup()
        log.info("kmsd_stopped")
        notifier.close()


async def _drop_privileges(app: web.Application, runner: web.AppRunner, settings: Settings, user: str) -> None:
    """Sockets bound, database open, vault started: root is not needed any
    more. The files the daemon keeps writing become its own first, so that
    it can reopen them (the audit trail after logrotate)."""
    log = app[STATE].log
    _preload()
    audit = app[STATE].audit
    _hand_over(settings, user, audit.created_dirs if audit is not None else ())
    pw = switch_user(user)
    harden()
    log.info("privileges_dropped", user=user, uid=pw.pw_uid, launcher_pid=app[STATE].vault.launcher_pid)
    try:
        # The pool opens new connections as this user from now on: one that
        # authenticates as the OS user (unix_socket) fails now, clearly, and
        # not as 503s later.
        await app[STATE].store.check_access()
    except BaseException:
        await runner.cleanup()
        raise
    directory = os.path.dirname(os.path.abspath(settings.audit_log)) if settings.audit_log else None
    if directory is not None and not os.access(directory, os.W_OK | os.X_OK):
        log.warning(
            "audit_directory_not_writable", path=directory,
            warning=f"{user} cannot create the audit file anew after a logrotate: make the directory "
            f"{user}'s (systemd: LogsDirectory=kmsd) or rotate with copytruncate",
        )


def _warn_about(settings: Settings, log: Any) -> None:
    """The settings an operator must not overlook, at every start."""
    if settings.legacy_jwt_secret:
        log.warning(
            "legacy_tokens_accepted",
            warning="HS256 tokens of the original auth service are accepted (migration option)",
        )
    if settings.compat_original:
        log.warning(
            "compat_original",
            warning="compat = original: any TCP caller may get a token for ANY user id (POST /issue) "
            "and read the rotation status (GET /api/rotate-mk), as in the original system; anything "
            "that reaches the TCP listeners can then read every record. Only while original services "
            "still run; each such request is counted (kmsd_compat_requests_total) and audited",
        )


async def _watchdog(notifier: Notifier, interval: float) -> None:
    # Sent from the event loop itself: a loop that hangs stops sending, and
    # systemd restarts the service.
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)


def _reopen_files(app: web.Application) -> None:
    state = app[STATE]
    if state.audit is not None:
        try:
            state.audit.reopen()
        except OSError as exc:
            state.audit.healthy = False
            state.log.error("audit_reopen_failed", path=state.audit.path, error=exc.strerror)


async def _reloader(
    app: web.Application, notifier: Notifier, hup: asyncio.Event, reload: Callable[[], Settings]
) -> None:
    log = app[STATE].log
    while True:
        await hup.wait()
        hup.clear()
        notifier.reloading()
        # First, whatever the configuration says: logrotate moved the audit
        # file away, and the chain must go on in a new one.
        _reopen_files(app)
        try:
            changed = apply_reload(app, reload())
            log.info("config_reloaded", changed=changed)
        except KMSError as exc:
            # A broken file keeps the running settings.
            log.error("config_reload_failed", error=exc.message)
        except Exception as exc:  # noqa: BLE001 - the reloader must survive anything
            log.error("config_reload_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            # Always: systemd waits for READY=1 after RELOADING=1.
            notifier.ready("serving (reloaded)")
