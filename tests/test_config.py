"""Settings: defaults, TOML file, KMSD_* environment, flags; the root-key source."""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from pathlib import Path

import pytest

from kmsd.config import (
    OPTIONS,
    ConfigError,
    Settings,
    load_settings,
    parse_database_url,
    parse_listen,
    settings_from_args,
)


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "kmsd.toml"
    cfg.write_text('socket = "/from/file.sock"\nlisten = ["127.0.0.1:9001"]\ntoken_lifetime = 60\n'
                   'root_key_file = "/etc/kmsd/root-key"\n')
    env = {"KMSD_SOCKET": "/from/env.sock", "KMSD_ADMIN_UIDS": "0,1000"}
    s = load_settings(config_file=str(cfg), environ=env, overrides={"listen": ["127.0.0.1:9002", "[::1]:9003"]})
    assert s.socket == "/from/env.sock"
    assert s.listen == (("127.0.0.1", 9002), ("::1", 9003))
    assert s.token_lifetime == 60
    assert s.admin_uids == (0, 1000)
    assert s.root_key.file == "/etc/kmsd/root-key"


def test_listen_env_is_comma_separated() -> None:
    s = load_settings(environ={"KMSD_LISTEN": "127.0.0.1:8000,127.0.0.1:8001,127.0.0.1:8002",
                               "KMSD_ROOT_KEY_FILE": "/k"})
    assert [p for _, p in s.listen] == [8000, 8001, 8002]


def test_database_urls() -> None:
    assert parse_database_url("sqlite:///var/kmsd.db").path == "var/kmsd.db"
    assert parse_database_url("sqlite:////var/lib/kmsd.db").path == "/var/lib/kmsd.db"
    m = parse_database_url("mysql://kms:p%40ss@db.local:3307/kms?unix_socket=/run/mysqld/mysqld.sock")
    assert (m.user, m.password, m.host, m.port, m.database, m.unix_socket) == (
        "kms", "p@ss", "db.local", 3307, "kms", "/run/mysqld/mysqld.sock")
    assert "p@ss" not in m.masked() and "p@ss" not in repr(m)
    for bad in ("postgres://x", "sqlite://", "mysql://h:notaport/db"):
        with pytest.raises(ConfigError):
            parse_database_url(bad)


def test_cluster_database_urls() -> None:
    c = parse_database_url("mysql://kms:p%40ss@db1:3306,db2:3307,[fd00::3]/kms")
    assert c.servers == (("db1", 3306), ("db2", 3307), ("fd00::3", 3306))
    assert (c.host, c.port, c.user, c.password, c.database, c.sync_wait) == ("db1", 3306, "kms", "p@ss", "kms", 1)
    assert c.masked() == "mysql://kms:***@db1:3306,db2:3307,[fd00::3]:3306/kms"
    assert parse_database_url("mysql://u@h1,h2/db?wsrep_sync_wait=0").sync_wait == 0
    assert parse_database_url("mysql://u@h/db").servers == (("h", 3306),)
    for bad, why in [
        ("mysql://u@h1,h1:3306/db", "same server twice"),
        ("mysql://u@h1,h2/db?unix_socket=/run/s.sock", "one server only"),
        ("mysql://u@h1,/db", "empty host"),
        ("mysql://u@h1:0/db", "between 1 and 65535"),
        ("mysql://u@h1:99999,h2/db", "between 1 and 65535"),
        ("mysql://u@h1/db?wsrep_sync_wait=x", "wsrep_sync_wait"),
    ]:
        with pytest.raises(ConfigError, match=why):
            parse_database_url(bad)


def test_root_key_sources(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no root key configured"):
        load_settings(environ={})
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "root-key").write_text("x" * 64)
    assert load_settings(environ={"CREDENTIALS_DIRECTORY": str(creds)}).root_key.file == str(creds / "root-key")
    assert load_settings(environ={"KMSD_ROOT_KEY_FD": "7"}).root_key.fd == 7
    dev = load_settings(environ={}, overrides={"dev": True, "database_url": "sqlite:////tmp/x/k.db"})
    assert dev.root_key.dev_file == "/tmp/x/root-key.dev"
    with pytest.raises(ConfigError, match="ROOT_KEY"):
        load_settings(environ={"ROOT_KEY": "abc"})


@pytest.mark.parametrize(
    "text, message",
    [("socket = 5", "socket"), ("bogus = 1", "unknown settings"), ("token_lifetime = -1", "positive"),
     ("listen = ['nope']", "HOST:PORT"), ("dev = 'maybe'", "boolean"), ("[[[", "not valid TOML")],
)
def test_bad_config_files(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_settings(config_file=str(cfg), environ={"KMSD_ROOT_KEY_FILE": "/k"})


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(config_file="/nonexistent/kmsd.toml", environ={})


def test_parse_listen() -> None:
    assert parse_listen("localhost:80") == ("localhost", 80)
    with pytest.raises(ConfigError):
        parse_listen("127.0.0.1:99999")


def test_database_settings_and_password_file(tmp_path: Path) -> None:
    secret = tmp_path / "db-password"
    secret.write_text("p@ss word\n")
    base = {"KMSD_ROOT_KEY_FILE": "/k", "KMSD_DATABASE_URL": "mysql://kmsd@db.local/kms"}
    s = load_settings(environ={**base, "KMSD_DATABASE_PASSWORD_FILE": str(secret),
                               "KMSD_DATABASE_POOL_SIZE": "4", "KMSD_DATABASE_TIMEOUT": "1.5"})
    assert (s.database.password, s.database_pool_size, s.database_timeout) == ("p@ss word", 4, 1.5)
    assert "p@ss" not in repr(s)
    # The systemd credential, when no file is configured.
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "db-password").write_text("from-credential")
    assert load_settings(environ={**base, "CREDENTIALS_DIRECTORY": str(creds)}).database.password == "from-credential"
    with pytest.raises(ConfigError, match="both in the URL and in a file"):
        load_settings(environ={**base, "KMSD_DATABASE_URL": "mysql://kmsd:x@db/kms",
                               "KMSD_DATABASE_PASSWORD_FILE": str(secret)})
    with pytest.raises(ConfigError, match="only for a mysql"):
        load_settings(environ={"KMSD_ROOT_KEY_FILE": "/k", "KMSD_DATABASE_PASSWORD_FILE": str(secret)})
    with pytest.raises(ConfigError, match="cannot read secret file"):
        load_settings(environ={**base, "KMSD_DATABASE_PASSWORD_FILE": str(tmp_path / "missing")})
    for name, value in (("KMSD_DATABASE_POOL_SIZE", "0"), ("KMSD_DATABASE_TIMEOUT", "-1")):
        with pytest.raises(ConfigError, match=name.lower()[5:]):
            load_settings(environ={**base, name: value})


def test_legacy_jwt_secret_is_off_unless_configured(tmp_path: Path) -> None:
    base = {"KMSD_ROOT_KEY_FILE": "/k"}
    assert load_settings(environ=base).legacy_jwt_secret is None
    secret = tmp_path / "legacy"
    secret.write_text("your-very-secure-secret\n")
    s = load_settings(environ={**base, "KMSD_LEGACY_JWT_SECRET_FILE": str(secret)})
    assert s.legacy_jwt_secret == "your-very-secure-secret"
    assert "your-very" not in repr(s)
    secret.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        load_settings(environ={**base, "KMSD_LEGACY_JWT_SECRET_FILE": str(secret)})


def test_slow_client_and_connection_settings() -> None:
    env = {"KMSD_ROOT_KEY_FILE": "/k"}
    s = load_settings(environ=env)
    assert (s.header_timeout, s.body_timeout, s.idle_timeout, s.max_connections) == (10.0, 30.0, 75.0, 4096)
    # Above the load test's burst of 2,000 simultaneous writes, with room to spare.
    assert s.max_connections > 2000 + 256
    s = load_settings(environ={**env, "KMSD_HEADER_TIMEOUT": "0.5", "KMSD_MAX_CONNECTIONS": "16"})
    assert (s.header_timeout, s.max_connections) == (0.5, 16)
    for name, value in [("header_timeout", 0), ("body_timeout", -1), ("idle_timeout", 4000),
                        ("header_timeout", "nan"), ("max_connections", 0), ("max_connections", "many")]:
        with pytest.raises(ConfigError, match=name):
            load_settings(environ=env, overrides={name: value})


# -- the declarations (kmsd.config.OPTIONS) against Settings, the environment and the example file --

EXAMPLE_CONFIG = Path(__file__).resolve().parent.parent / "docs" / "kmsd.toml"
# Settings fields that no option sets directly: load_settings derives them
# from root_key_file and legacy_jwt_secret_file (and the credentials).
DERIVED = {"root_key", "legacy_jwt_secret"}


def test_every_settings_field_is_declared_once() -> None:
    targets = [opt.target for opt in OPTIONS if opt.target is not None]
    assert len(targets) == len(set(targets)), "a field set by two options"
    fields = {f.name for f in dataclasses.fields(Settings)}
    assert set(targets) <= fields, f"options for no field: {set(targets) - fields}"
    assert fields - set(targets) == DERIVED, "a Settings field without its option"


def test_keys_and_environment_names_are_unique() -> None:
    keys = [opt.key for opt in OPTIONS]
    assert len(keys) == len(set(keys))
    envs = [opt.env for opt in OPTIONS]
    assert len(envs) == len(set(envs))
    assert all(env.startswith("KMSD_") and env == "KMSD_" + key.upper() for env, key in zip(envs, keys, strict=True))
    # Read by load_settings itself, so no setting may be called like them.
    assert not {"KMSD_CONFIG", "KMSD_ROOT_KEY_FD"} & set(envs)


def test_the_defaults_are_within_their_bounds() -> None:
    defaults = Settings()
    for opt in OPTIONS:
        opt.check(defaults)
        assert (opt.valid is None) == (opt.rule == ""), f"{opt.key}: a bound needs its message, and the reverse"


def test_the_example_config_names_every_setting_and_loads() -> None:
    text = EXAMPLE_CONFIG.read_text()
    given = set(tomllib.loads(text))
    commented = set(re.findall(r"^#\s*([a-z_]+)\s*=", text, flags=re.MULTILINE))
    keys = {opt.key for opt in OPTIONS}
    assert given | commented <= keys, f"undeclared keys in docs/kmsd.toml: {(given | commented) - keys}"
    # Only the development switch is left out of the production example.
    assert keys - given - commented == {"dev"}
    s = load_settings(config_file=str(EXAMPLE_CONFIG), environ={"KMSD_ROOT_KEY_FILE": "/k"}, read_secrets=False)
    assert s.database.path == "/var/lib/kmsd/kmsd.db" and s.socket_mode == 0o660


def test_flags_override_through_their_options(monkeypatch: pytest.MonkeyPatch) -> None:
    from kmsd.cli import _parser

    for name in [n for n in os.environ if n.startswith("KMSD_") or n in ("ROOT_KEY", "CREDENTIALS_DIRECTORY")]:
        monkeypatch.delenv(name)
    args = _parser().parse_args(["serve", "--socket", "/flag.sock", "--listen", "127.0.0.1:9", "--dev",
                                 "--database", "sqlite:////flag/k.db"])
    assert {opt.flag for opt in OPTIONS if opt.flag} <= set(vars(args))
    s = settings_from_args(args)
    assert (s.socket, s.listen, s.dev, s.database.path) == ("/flag.sock", (("127.0.0.1", 9),), True, "/flag/k.db")
    assert s.root_key.dev_file == "/flag/root-key.dev"
    # A command without some of the flags (mk has no --listen or --dev) leaves those to the rest.
    args = _parser().parse_args(["mk", "list", "--socket", "/mk.sock"])
    s = settings_from_args(args, require_root_key=False)
    assert (s.socket, s.listen, s.dev) == ("/mk.sock", Settings.listen, False)
