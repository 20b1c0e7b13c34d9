"""Typed settings and their one parser.

Precedence, lowest first: built-in defaults, the TOML file, ``KMSD_*``
environment variables, command-line flags. Nothing else in kmsd reads the
environment or a config file: the settings object is passed in.

The root key itself is never part of the settings: only *where* it comes from
(``RootKeySource``). The vault process reads it; the daemon does not keep it.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from .errors import KMSError

__all__ = [
    "ConfigError",
    "DatabaseURL",
    "RootKeySource",
    "Settings",
    "load_settings",
    "parse_database_url",
    "parse_listen",
]


class ConfigError(KMSError):
    """Invalid configuration: reported at startup, never over HTTP."""

    code = "config"
    default_message = "invalid configuration"


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

    def masked(self) -> str:
        if self.scheme == "sqlite":
            return f"sqlite:///{self.path}"
        auth = f"{self.user}:***@" if self.user else ""
        tail = f"?unix_socket={self.unix_socket}" if self.unix_socket else ""
        return f"mysql://{auth}{self.host}:{self.port}/{self.database}{tail}"


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


def parse_database_url(url: str) -> DatabaseURL:
    """``sqlite:///relative.db``, ``sqlite:////absolute.db``, or
    ``mysql://user:pass@host:port/db[?unix_socket=/path]``."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else ""
        if not path:
            raise ConfigError("sqlite URL needs a path: sqlite:///file.db or sqlite:////abs/file.db")
        return DatabaseURL("sqlite", path=path)
    if parts.scheme in ("mysql", "mariadb"):
        query = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p)
        try:
            port = parts.port or 3306
        except ValueError:
            raise ConfigError("database port must be a number") from None
        return DatabaseURL(
            "mysql",
            host=parts.hostname or "127.0.0.1",
            port=port,
            user=unquote(parts.username or ""),
            password=unquote(parts.password or ""),
            database=parts.path.lstrip("/") or "kms",
            unix_socket=unquote(query["unix_socket"]) if "unix_socket" in query else None,
        )
    raise ConfigError(f"unsupported database URL scheme {parts.scheme!r}")


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name} must be a boolean")


def _as_choice(value: Any, name: str, choices: tuple[str, ...], *, empty: str | None = None) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be one of {', '.join(choices)}")
    text = value.strip().lower() or (empty or "")
    if text not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}")
    return text


def _as_int(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be an integer") from None


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: Any, name: str) -> float | None:
    """Seconds from a number or "90d", "12h", "30m", "45s"; "off", "" and 0: None."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "off", "none", "0"):
            return None
        unit = _DURATION_UNITS.get(text[-1])
        try:
            seconds = float(text[:-1]) * unit if unit else float(text)
        except ValueError:
            raise ConfigError(f"{name} must be a duration like 90d, 12h, 30m or seconds") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ConfigError(f"{name} must be a duration like 90d, 12h, 30m or seconds")
    if seconds < 0:
        raise ConfigError(f"{name} must not be negative")
    return seconds or None


def _as_int_list(value: Any, name: str) -> tuple[int, ...]:
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, list):
        raise ConfigError(f"{name} must be a list of integers")
    return tuple(_as_int(v, name) for v in value)


def _as_str_list(value: Any, name: str) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"{name} must be a list of strings")


# Setting name -> (converter). Every one also reads KMSD_<NAME upper-cased>.
_CONVERTERS: dict[str, Any] = {
    "socket": str,
    "socket_mode": lambda v, n: int(v, 8) if isinstance(v, str) else _as_int(v, n),
    "listen": lambda v, n: tuple(parse_listen(x) for x in _as_str_list(v, n)),
    "database_url": lambda v, n: parse_database_url(str(v)),
    "dev": _as_bool,
    "root_key_file": str,
    "issuer": str,
    "audience": str,
    "token_lifetime": _as_int,
    "max_session_age": _as_int,
    "token_cache_size": _as_int,
    "admin_uids": _as_int_list,
    "admin_gids": _as_int_list,
    "allow_admin_over_tcp": _as_bool,
    "allowed_hosts": lambda v, n: tuple(_as_str_list(v, n)),
    "client_uids": _as_int_list,
    "client_gids": _as_int_list,
    "allow_tcp_clients": _as_bool,
    "audit_log": str,
    "audit_fail_closed": _as_bool,
    "vault_user": str,
    "daemon_user": str,
    "vault_timeout": lambda v, n: float(v),
    "max_body_size": _as_int,
    "header_timeout": lambda v, n: float(v),
    "body_timeout": lambda v, n: float(v),
    "idle_timeout": lambda v, n: float(v),
    "max_connections": _as_int,
    "connection_share": lambda v, n: float(v),
    "send_timeout": lambda v, n: float(v),
    "invalid_token_rate": lambda v, n: float(v),
    "invalid_token_burst": _as_int,
    "record_creation_rate": lambda v, n: float(v),
    "record_creation_burst": _as_int,
    "log_level": str,
    "database_pool_size": _as_int,
    "database_timeout": lambda v, n: float(v),
    "database_password_file": str,
    "legacy_jwt_secret_file": str,
    "key_refresh_interval": lambda v, n: float(v),
    "rotation_lease_ttl": lambda v, n: float(v),
    "rotation_batch_size": _as_int,
    "rotation_period": parse_duration,
    "compat": lambda v, n: _as_choice(v, n, ("original", "none"), empty="none"),
    "unbound_envelopes": lambda v, n: _as_choice(v, n, ("allow", "refuse")),
}

# Settings that name a file whose content is the value, so that secrets stay
# out of the config file, the URL and the environment.
_SECRET_FILES = ("database_password_file", "legacy_jwt_secret_file")


def _convert(name: str, value: Any) -> Any:
    conv = _CONVERTERS[name]
    if conv is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string")
        return value
    try:
        return conv(value, name)
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(f"invalid value for {name}") from None


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


def load_settings(
    *,
    config_file: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    require_root_key: bool = True,
    read_secrets: bool = True,
) -> Settings:
    """Build the settings from defaults, file, environment and flags.
    Without ``require_root_key`` a missing root key leaves ``root_key``
    empty (admin commands that talk to a running daemon need none).
    Without ``read_secrets`` the secret files (database password, legacy
    JWT secret) are not read and those settings stay empty: a reload after
    the privilege drop, which may not read them and never applies them."""
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    config_file = config_file or env.get("KMSD_CONFIG")
    if config_file:
        try:
            with open(config_file, "rb") as fh:
                doc = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {config_file} is not valid TOML: {exc}") from None
        unknown = set(doc) - set(_CONVERTERS)
        if unknown:
            raise ConfigError(f"unknown settings in {config_file}: {', '.join(sorted(unknown))}")
        raw.update(doc)
    for name in _CONVERTERS:
        env_name = "KMSD_" + name.upper()
        if env_name in env:
            raw[name] = env[env_name]
    for name, value in (overrides or {}).items():
        if value is not None:
            raw[name] = value

    values = {name: _convert(name, value) for name, value in raw.items()}
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        if name == "database_url":
            kwargs["database"] = value
        elif name == "root_key_file" or name in _SECRET_FILES:
            continue
        elif name == "compat":
            kwargs[name] = None if value == "none" else value
        else:
            kwargs[name] = value
    settings = Settings(**kwargs)

    if settings.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError("log_level must be one of debug, info, warning, error, critical")
    if not 0 < settings.vault_timeout <= 300:
        raise ConfigError("vault_timeout must be between 0 and 300 seconds")
    if not 0 <= settings.socket_mode <= 0o777:
        raise ConfigError("socket_mode must be an octal file mode such as 0660")
    if not 0 <= settings.token_cache_size <= 10_000_000:
        raise ConfigError("token_cache_size must be between 0 and 10000000")
    if settings.token_lifetime <= 0:
        raise ConfigError("token_lifetime must be positive")
    if settings.max_session_age < settings.token_lifetime:
        raise ConfigError("max_session_age must be at least token_lifetime")
    if settings.max_body_size <= 0:
        raise ConfigError("max_body_size must be positive")
    for name in ("header_timeout", "body_timeout", "idle_timeout", "send_timeout"):
        if not 0 < getattr(settings, name) <= 3600:
            raise ConfigError(f"{name} must be between 0 and 3600 seconds")
    if not 1 <= settings.max_connections <= 1_000_000:
        raise ConfigError("max_connections must be between 1 and 1000000")
    if not 0.05 <= settings.connection_share <= 0.9:
        raise ConfigError("connection_share must be between 0.05 and 0.9 (the rest is kept for other peers)")
    for name in ("invalid_token_rate", "record_creation_rate"):
        if not 0 <= getattr(settings, name) <= 1_000_000:
            raise ConfigError(f"{name} must be between 0 (off) and 1000000 a second")
    for name in ("invalid_token_burst", "record_creation_burst"):
        if not 1 <= getattr(settings, name) <= 1_000_000:
            raise ConfigError(f"{name} must be between 1 and 1000000")
    if not 1 <= settings.database_pool_size <= 1000:
        raise ConfigError("database_pool_size must be between 1 and 1000")
    if not 0 < settings.database_timeout <= 300:
        raise ConfigError("database_timeout must be between 0 and 300 seconds")
    if not 0.05 <= settings.key_refresh_interval <= 3600:
        raise ConfigError("key_refresh_interval must be between 0.05 and 3600 seconds")
    if not 1 <= settings.rotation_lease_ttl <= 3600:
        raise ConfigError("rotation_lease_ttl must be between 1 and 3600 seconds")
    if not 1 <= settings.rotation_batch_size <= 100_000:
        raise ConfigError("rotation_batch_size must be between 1 and 100000")
    if settings.rotation_period is not None and settings.rotation_period < 60:
        raise ConfigError("rotation_period must be at least 60 seconds (or off)")
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

    creds = env.get("CREDENTIALS_DIRECTORY")
    if not read_secrets:
        pass
    elif settings.database.scheme == "mysql":
        password = _read_secret_file(values.get("database_password_file"), creds, "db-password")
        if password is not None and settings.database.password:
            raise ConfigError("the database password is set both in the URL and in a file; keep one")
        if password is not None:
            settings = dataclasses.replace(
                settings, database=dataclasses.replace(settings.database, password=password)
            )
    elif values.get("database_password_file"):
        raise ConfigError("database_password_file is only for a mysql:// database")
    legacy_secret = (
        _read_secret_file(values.get("legacy_jwt_secret_file"), creds, "legacy-jwt-secret") if read_secrets else None
    )
    if legacy_secret is not None:
        settings = dataclasses.replace(settings, legacy_jwt_secret=legacy_secret)

    # Where the vault gets the root key, most explicit first.
    key_file = values.get("root_key_file")
    if key_file:
        source = RootKeySource(file=key_file)
    elif env.get("KMSD_ROOT_KEY_FD"):
        source = RootKeySource(fd=_as_int(env["KMSD_ROOT_KEY_FD"], "KMSD_ROOT_KEY_FD"))
    elif env.get("ROOT_KEY"):
        raise ConfigError("ROOT_KEY must be moved out of the environment first (kmsd serve does this)")
    elif creds and _exists(Path(creds, "root-key")):
        source = RootKeySource(file=str(Path(creds, "root-key")))
    elif settings.dev:
        base = (
            Path(settings.database.path).parent
            if settings.database.scheme == "sqlite"
            else Path(settings.socket).parent
        )
        source = RootKeySource(dev_file=str(base / "root-key.dev"))
    elif not require_root_key:
        source = RootKeySource()
    else:
        raise ConfigError(
            "no root key configured: set KMSD_ROOT_KEY_FILE, ROOT_KEY or a systemd "
            "credential 'root-key' (or use --dev to generate a development key)"
        )
    return dataclasses.replace(settings, root_key=source)
