"""Typed settings and their one parser.

Precedence, lowest first: built-in defaults, the TOML file, ``KMSD_*``
environment variables, command-line flags. Nothing else in kmsd reads the
environment or a config file: the settings object is passed in. Each setting
is declared once, in ``OPTIONS``: its TOML key (and so its variable), its
converter, its bounds and its flag.

The root key itself is never part of the settings: only *where* it comes from
(``RootKeySource``). The vault process reads it; the daemon does not keep it.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from .settings_fields import (
    ConfigError,
    Option,
    as_bool,
    as_choice,
    as_float,
    as_int,
    as_int_list,
    as_mode,
    as_str,
    as_str_list,
    parse_duration,
)

if TYPE_CHECKING:
    import argparse

__all__ = [
    "OPTIONS",
    "ConfigError",
    "DatabaseURL",
    "Option",
    "RootKeySource",
    "Settings",
    "load_settings",
    "parse_database_url",
    "parse_duration",
    "format_server",
    "format_servers",
    "parse_listen",
    "settings_from_args",
]


@dataclass(frozen=True)
class DatabaseURL:
    scheme: str  # "sqlite" or "mysql"
    path: str = ""  # sqlite file
    host: str = "127.0.0.1"
    port: int = 3306
    user: str = ""
    password: str = dataclasses.field(default="", repr=False)
    database: str = "kms"
    unix_socket: str | None = None
    # Every server of a cluster, in the order they are tried (the first is
    # preferred); one entry, (host, port), for a single server.
    hosts: tuple[tuple[str, int], ...] = ()
    # wsrep_sync_wait on Galera sessions: 1 makes every read wait until the
    # node has applied what the cluster committed before it (read-your-writes
    # across nodes); 0 gives that up for speed.
    sync_wait: int = 1

    @property
    def servers(self) -> tuple[tuple[str, int], ...]:
        return self.hosts or ((self.host, self.port),)

    def masked(self) -> str:
        if self.scheme == "sqlite":
            return f"sqlite:///{self.path}"
        auth = f"{self.user}:***@" if self.user else ""
        tail = f"?unix_socket={self.unix_socket}" if self.unix_socket else ""
        return f"mysql://{auth}{format_servers(self.servers)}/{self.database}{tail}"


def format_server(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def format_servers(servers: tuple[tuple[str, int], ...]) -> str:
    return ",".join(format_server(h, p) for h, p in servers)


@dataclass(frozen=True)
class RootKeySource:
    """Where the vault finds the root key: a file; or an inherited sealed
    in-memory file descriptor holding what was ``ROOT_KEY`` (see
    ``kmsd.cli``: the daemon re-executes itself without that variable); or,
    under ``--dev`` only, a key generated into ``dev_file`` on first start."""

    file: str | None = None
    fd: int | None = None
    dev_file: str | None = None

    @property
    def configured(self) -> bool:
        return bool(self.file or self.fd is not None or self.dev_file)

    def describe(self) -> str:
        if self.file:
            return f"file {self.file}"
        if self.fd is not None:
            return "environment variable ROOT_KEY (moved out of the environment)"
        if self.dev_file:
            return f"development key file {self.dev_file}"
        return "none"


@dataclass(frozen=True)
class Settings:
    socket: str = "/run/kmsd/kmsd.sock"
    socket_mode: int = 0o660
    listen: tuple[tuple[str, int], ...] = (("127.0.0.1", 8000),)
    database: DatabaseURL = DatabaseURL("sqlite", path="/var/lib/kmsd/kmsd.db")
    dev: bool = False
    root_key: RootKeySource = RootKeySource()
    issuer: str = "kmsd"
    audience: str = "kmsd"
    token_lifetime: int = 3600
    # How long a session may be renewed from its first authentication (a
    # record's creation, an admin's /issue): renewals never pass it.
    max_session_age: int = 30 * 86400
    # Verified tokens remembered (by hash, with their claims, until they
    # expire) so that a token presented again costs no signature check; 0: off.
    token_cache_size: int = 50_000
    admin_uids: tuple[int, ...] = (0,)
    admin_gids: tuple[int, ...] = ()
    # Admin routes over TCP: callers there are anonymous, so this is off by
    # default, and --dev does not change it.
    allow_admin_over_tcp: bool = False
    allowed_hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
    # Who may store and read (Unix-socket peers by uid or group; empty:
    # anyone who can connect to the socket), and whether TCP callers may.
    client_uids: tuple[int, ...] = ()
    client_gids: tuple[int, ...] = ()
    allow_tcp_clients: bool = True
    # The audit trail (one hash-chained JSON line per key operation); off
    # when unset. With audit_fail_closed, a request whose line cannot be
    # written fails with 503 instead.
    audit_log: str | None = None
    audit_fail_closed: bool = False
    vault_user: str | None = None  # None: "kmsd-vault" if it exists, else "nobody"
    # Started as root, the daemon drops to this user once it serves. None:
    # "kmsd" if it exists (make install creates it), else it stays root.
    daemon_user: str | None = None
    vault_timeout: float = 2.0
    max_body_size: int = 1024 * 1024
    # Slow and idle clients (seconds): a request head must be complete this
    # long after a connection opens or after its first byte; a body must
    # have arrived this long after its head (else 408 and the connection is
    # closed); a connection idle between requests is closed after this.
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    idle_timeout: float = 75.0
    # Open connections, Unix socket and TCP together. At the cap, the least
    # recently active connection that waits for a request is closed to make
    # room; if every one is busy, the newcomer is answered 503.
    max_connections: int = 4096
    # At most this share of max_connections per peer (a uid on the Unix
    # socket; the TCP side as a whole), so TCP callers never take the Unix
    # socket's capacity. Admin peers always get in.
    connection_share: float = 0.5
    # A client that reads none of its answers for this long is disconnected.
    send_timeout: float = 10.0
    # Rate limits per peer (events a second, and the burst; 0: off). Over
    # one, a request is answered 429 with Retry-After, and the peer's
    # connections are paused until then. Admin peers are not limited.
    invalid_token_rate: float = 20.0
    invalid_token_burst: int = 100
    record_creation_rate: float = 100.0
    record_creation_burst: int = 1000
    log_level: str = "info"
    database_pool_size: int = 10
    # One time budget per database call: an unreachable or hung server is
    # a 503 within it.
    database_timeout: float = 3.0
    # The original auth service's HS256 secret. Set only while migrating from
    # that system: tokens it issued are then accepted (never issued).
    legacy_jwt_secret: str | None = dataclasses.field(default=None, repr=False)
    # Master-key lifecycle. Every daemon re-reads the key rows this often:
    # it bounds how long a daemon keeps wrapping under a key another daemon
    # retired.
    key_refresh_interval: float = 2.0
    # One daemon at a time runs a rewrap, under a lease in the database that
    # it renews; if it dies, another takes over once this has run out.
    rotation_lease_ttl: float = 15.0
    rotation_batch_size: int = 1000
    # Rotate automatically once the active key is this old (seconds; off
    # when None). Config accepts "90d", "12h", "30m", "45s" or seconds.
    rotation_period: float | None = None
    # "original": the original system's weaker rules, for a deployment where
    # some of its services keep running (POST /issue for any id over TCP,
    # GET /api/rotate-mk over TCP). None: off. Loud at every start.
    compat: str | None = None
    # "allow": an envelope with no owner (the original's /api/encrypt, or one
    # the original itself wrapped) unwraps for any valid token, as in the
    # original. "refuse": once every client has rewrapped its envelopes
    # with an owner, decrypt-dek refuses them (and /api/encrypt needs one).
    unbound_envelopes: str = "allow"

    @property
    def compat_original(self) -> bool:
        return self.compat == "original"


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host:
        raise ConfigError(f"listen address must be HOST:PORT, got {value!r}")
    host = host.strip("[]")
    try:
        port_num = int(port)
    except ValueError:
        raise ConfigError(f"listen port must be a number, got {value!r}") from None
    if not 0 <= port_num <= 65535:
        raise ConfigError(f"listen port out of range in {value!r}")
    return host, port_num


def _parse_server(text: str) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port``."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = text.partition(":")
    if not host:
        raise ConfigError("database URL names an empty host")
    if not port:
        return host, 3306
    if not port.isdigit() or not 0 < int(port) <= 65535:
        raise ConfigError("database port must be a number between 1 and 65535")
    return host, int(port)


def parse_database_url(url: str) -> DatabaseURL:
    """``sqlite:///relative.db``, ``sqlite:////absolute.db``,
    ``mysql://user:pass@host:port/db[?unix_socket=/path]``, or a cluster:
    ``mysql://user:pass@h1:3306,h2:3306,h3:3306/db`` (tried in order)."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else ""
        if not path:
            raise ConfigError("sqlite URL needs a path: sqlite:///file.db or sqlite:////abs/file.db")
        return DatabaseURL("sqlite", path=path)
    if parts.scheme in ("mysql", "mariadb"):
        query = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p)
        userinfo, _, hostlist = parts.netloc.rpartition("@")
        user, _, password = userinfo.partition(":")
        servers = tuple(_parse_server(h) for h in hostlist.split(",")) if hostlist else (("127.0.0.1", 3306),)
        if len(set(servers)) != len(servers):
            raise ConfigError("database URL names the same server twice")
        unix_socket = unquote(query["unix_socket"]) if "unix_socket" in query else None
        if unix_socket and len(servers) > 1:
            raise ConfigError("a database URL with unix_socket names one server only")
        sync_wait = query.get("wsrep_sync_wait", "1")
        if not sync_wait.isdigit() or int(sync_wait) > 15:
            raise ConfigError("wsrep_sync_wait must be a number between 0 and 15")
        return DatabaseURL(
            "mysql",
            host=servers[0][0],
            port=servers[0][1],
            user=unquote(user),
            password=unquote(password),
            database=parts.path.lstrip("/") or "kms",
            unix_socket=unix_socket,
            hosts=servers,
            sync_wait=int(sync_wait),
        )
    raise ConfigError(f"unsupported database URL scheme {parts.scheme!r}")


def _as_compat(value: Any, name: str) -> str | None:
    choice = as_choice(value, name, ("original", "none"), empty="none")
    return None if choice == "none" else choice


# A value is refused unless its bound holds, so NaN (every comparison false) is refused.
_CLIENT_TIMEOUT: tuple[Callable[[float], bool], str] = (lambda t: 0 < t <= 3600, "must be between 0 and 3600 seconds")
_RATE: tuple[Callable[[float], bool], str] = (
    lambda r: 0 <= r <= 1_000_000, "must be between 0 (off) and 1000000 a second"
)
_BURST: tuple[Callable[[int], bool], str] = (lambda n: 1 <= n <= 1_000_000, "must be between 1 and 1000000")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Every setting, once. The order is the order in which values are read from
# the environment and range-checked, so it decides which of several bad
# values is reported.
OPTIONS: tuple[Option[Any], ...] = (
    Option("socket", as_str, flag="socket"),
    Option("socket_mode", as_mode, lambda m: 0 <= m <= 0o777, "must be an octal file mode such as 0660"),
    Option("listen", lambda v, n: tuple(parse_listen(x) for x in as_str_list(v, n)), flag="listen"),
    Option("database_url", lambda v, n: parse_database_url(str(v)), attr="database", flag="database"),
    Option("dev", as_bool, flag="dev"),
    Option("root_key_file", as_str, attr=None),
    Option("issuer", as_str),
    Option("audience", as_str),
    Option("token_lifetime", as_int, lambda t: t > 0, "must be positive"),
    Option("max_session_age", as_int),  # at least token_lifetime: see _check_combinations
    Option("token_cache_size", as_int, lambda n: 0 <= n <= 10_000_000, "must be between 0 and 10000000"),
    Option("admin_uids", as_int_list),
    Option("admin_gids", as_int_list),
    Option("allow_admin_over_tcp", as_bool),
    Option("allowed_hosts", lambda v, n: tuple(as_str_list(v, n))),
    Option("client_uids", as_int_list),
    Option("client_gids", as_int_list),
    Option("allow_tcp_clients", as_bool),
    Option("audit_log", as_str),
    Option("audit_fail_closed", as_bool),
    Option("vault_user", as_str),
    Option("daemon_user", as_str),
    Option("vault_timeout", as_float, lambda t: 0 < t <= 300, "must be between 0 and 300 seconds"),
    Option("max_body_size", as_int, lambda n: n > 0, "must be positive"),
    Option("header_timeout", as_float, *_CLIENT_TIMEOUT),
    Option("body_timeout", as_float, *_CLIENT_TIMEOUT),
    Option("idle_timeout", as_float, *_CLIENT_TIMEOUT),
    Option("max_connections", as_int, lambda n: 1 <= n <= 1_000_000, "must be between 1 and 1000000"),
    Option(
        "connection_share", as_float, lambda s: 0.05 <= s <= 0.9,
        "must be between 0.05 and 0.9 (the rest is kept for other peers)",
    ),
    Option("send_timeout", as_float, *_CLIENT_TIMEOUT),
    Option("invalid_token_rate", as_float, *_RATE),
    Option("invalid_token_burst", as_int, *_BURST),
    Option("record_creation_rate", as_float, *_RATE),
    Option("record_creation_burst", as_int, *_BURST),
    Option(
        "log_level", as_str, lambda level: level.upper() in _LOG_LEVELS,
        "must be one of debug, info, warning, error, critical",
    ),
    Option("database_pool_size", as_int, lambda n: 1 <= n <= 1000, "must be between 1 and 1000"),
    Option("database_timeout", as_float, lambda t: 0 < t <= 300, "must be between 0 and 300 seconds"),
    # Settings that name a file whose content is the value, so that secrets
    # stay out of the config file, the URL and the environment.
    Option("database_password_file", as_str, attr=None),
    Option("legacy_jwt_secret_file", as_str, attr=None),
    Option("key_refresh_interval", as_float, lambda t: 0.05 <= t <= 3600, "must be between 0.05 and 3600 seconds"),
    Option("rotation_lease_ttl", as_float, lambda t: 1 <= t <= 3600, "must be between 1 and 3600 seconds"),
    Option("rotation_batch_size", as_int, lambda n: 1 <= n <= 100_000, "must be between 1 and 100000"),
    # Written as "not below 60" so that NaN passes, as it always has.
    Option(
        "rotation_period", parse_duration, lambda p: p is None or not p < 60, "must be at least 60 seconds (or off)"
    ),
    Option("compat", _as_compat),
    Option("unbound_envelopes", lambda v, n: as_choice(v, n, ("allow", "refuse"))),
)
_BY_KEY: dict[str, Option[Any]] = {opt.key: opt for opt in OPTIONS}


def _exists(path: Path) -> bool:
    """Like ``Path.exists``, but a directory this process may not search
    (a credentials directory after the privilege drop) holds nothing."""
    try:
        return path.exists()
    except OSError:
        return False


def _read_secret_file(path: str | None, creds: str | None, credential: str) -> str | None:
    """A secret from its configured file, else from the systemd credential
    of that name, else None. One trailing newline is not part of it."""
    if path is None and creds and _exists(Path(creds, credential)):
        path = str(Path(creds, credential))
    if path is None:
        return None
    try:
        value = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise ConfigError(f"cannot read secret file {path}: {reason}") from None
    value = value[:-1] if value.endswith("\n") else value
    if not value:
        raise ConfigError(f"secret file {path} is empty")
    return value


def _read_config_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    unknown = set(doc) - set(_BY_KEY)
    if unknown:
        raise ConfigError(f"unknown settings in {path}: {', '.join(sorted(unknown))}")
    return doc


def _raw_values(config_file: str | None, overrides: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """Each setting given anywhere, by key, from its strongest source. The
    keys keep the order they were first given in: values are converted in
    it, so it decides which of several unconvertible ones is reported."""
    raw: dict[str, Any] = {}
    config_file = config_file or env.get("KMSD_CONFIG")
    if config_file:
        raw.update(_read_config_file(config_file))
    raw.update((opt.key, env[opt.env]) for opt in OPTIONS if opt.env in env)
    raw.update((key, value) for key, value in overrides.items() if value is not None)
    return raw


def _check_combinations(settings: Settings) -> None:
    if settings.max_session_age < settings.token_lifetime:
        raise ConfigError("max_session_age must be at least token_lifetime")
    if settings.compat_original and settings.unbound_envelopes == "refuse":
        raise ConfigError(
            'compat = "original" and unbound_envelopes = "refuse" contradict each other: the original'
            " key-server's /api/encrypt names no owner"
        )
    if settings.compat_original and settings.rotation_period is not None:
        raise ConfigError(
            'compat = "original" and rotation_period: a rotation upgrades the rows the original'
            " key-server wrote into kmsd's format, which it cannot read; rotate by hand once it is gone"
        )


def _with_secrets(settings: Settings, files: Mapping[str, Any], creds: str | None) -> Settings:
    """The database password and the legacy JWT secret, from their files."""
    if settings.database.scheme == "mysql":
        password = _read_secret_file(files.get("database_password_file"), creds, "db-password")
        if password is not None and settings.database.password:
            raise ConfigError("the database password is set both in the URL and in a file; keep one")
        if password is not None:
            settings = dataclasses.replace(settings, database=dataclasses.replace(settings.database, password=password))
    elif files.get("database_password_file"):
        raise ConfigError("database_password_file is only for a mysql:// database")
    legacy_secret = _read_secret_file(files.get("legacy_jwt_secret_file"), creds, "legacy-jwt-secret")
    if legacy_secret is not None:
        settings = dataclasses.replace(settings, legacy_jwt_secret=legacy_secret)
    return settings


def _root_key_source(
    settings: Settings, key_file: str | None, env: Mapping[str, str], *, require_root_key: bool
) -> RootKeySource:
    """Where the vault gets the root key, most explicit first."""
    creds = env.get("CREDENTIALS_DIRECTORY")
    if key_file:
        return RootKeySource(file=key_file)
    if env.get("KMSD_ROOT_KEY_FD"):
        return RootKeySource(fd=as_int(env["KMSD_ROOT_KEY_FD"], "KMSD_ROOT_KEY_FD"))
    if env.get("ROOT_KEY"):
        raise ConfigError("ROOT_KEY must be moved out of the environment first (kmsd serve does this)")
    if creds and _exists(Path(creds, "root-key")):
        return RootKeySource(file=str(Path(creds, "root-key")))
    if settings.dev:
        base = Path(settings.database.path if settings.database.scheme == "sqlite" else settings.socket).parent
        return RootKeySource(dev_file=str(base / "root-key.dev"))
    if not require_root_key:
        return RootKeySource()
    raise ConfigError(
        "no root key configured: set KMSD_ROOT_KEY_FILE, ROOT_KEY or a systemd "
        "credential 'root-key' (or use --dev to generate a development key)"
    )


def load_settings(
    *,
    config_file: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    require_root_key: bool = True,
    read_secrets: bool = True,
) -> Settings:
    """Build the settings from defaults, file, environment and flags.
    ``overrides`` are by TOML key; None stands for a flag not given.
    Without ``require_root_key`` a missing root key leaves ``root_key``
    empty (admin commands that talk to a running daemon need none).
    Without ``read_secrets`` the secret files (database password, legacy
    JWT secret) are not read and those settings stay empty: a reload after
    the privilege drop, which may not read them and never applies them."""
    env = os.environ if environ is None else environ
    raw = _raw_values(config_file, overrides or {}, env)
    # Every value is converted before any is range-checked: an unconvertible
    # one is reported before an out-of-range one.
    values = {key: _BY_KEY[key].parse(value) for key, value in raw.items()}
    settings = Settings(**{opt.target: values[opt.key] for opt in OPTIONS if opt.target and opt.key in values})
    for opt in OPTIONS:
        opt.check(settings)
    _check_combinations(settings)
    if read_secrets:
        settings = _with_secrets(settings, values, env.get("CREDENTIALS_DIRECTORY"))
    source = _root_key_source(settings, values.get("root_key_file"), env, require_root_key=require_root_key)
    return dataclasses.replace(settings, root_key=source)


def settings_from_args(
    args: argparse.Namespace, *, require_root_key: bool = True, read_secrets: bool = True
) -> Settings:
    """The settings of a ``kmsd`` command: its ``--config``, and the flags
    it has (``Option.flag``; one it lacks counts as not given) over the rest."""
    return load_settings(
        config_file=args.config,
        overrides={opt.key: getattr(args, opt.flag, None) for opt in OPTIONS if opt.flag},
        require_root_key=require_root_key,
        read_secrets=read_secrets,
    )
