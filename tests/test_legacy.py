"""kmsd started on a database the original Node.js system wrote.

The rows come from two places: real rows that system wrote
(tests/data/original-system-rows.json) and rows built here by an
independent writer of the byte layout in docs/legacy-format.md (plain
``cryptography`` CBC), never by kmsd's own code.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
import pytest
from conftest import API, Daemon, open_api, remember
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SAMPLE = json.loads((Path(__file__).parent / "data" / "original-system-rows.json").read_text())
ROOT_KEY = SAMPLE["root_key_env"]
HS256_SECRET = SAMPLE["original_jwt_hs256_secret"]

pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")


# -- an independent writer of the original format ----------------------------------


def _pad(data: bytes) -> bytes:
    padder = padding.PKCS7(128).padder()
    return padder.update(data) + padder.finalize()


def _unpad(data: bytes) -> bytes:
    unpadder = padding.PKCS7(128).unpadder()
    return unpadder.update(data) + unpadder.finalize()


def cbc_encrypt(key: bytes, plaintext: bytes, *, pads: int, iv: bytes | None = None) -> str:
    """base64(IV || AES-256-CBC(PKCS#7 applied ``pads`` times)); a random IV
    unless one is given (to reproduce a row byte for byte)."""
    for _ in range(pads):
        plaintext = _pad(plaintext)
    iv = iv or os.urandom(16)
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return base64.b64encode(iv + enc.update(plaintext) + enc.finalize()).decode()


def cbc_decrypt(key: bytes, text: str, *, pads: int) -> bytes:
    raw = base64.b64decode(text)
    dec = Cipher(algorithms.AES(key), modes.CBC(raw[:16])).decryptor()
    plain = dec.update(raw[16:]) + dec.finalize()
    for _ in range(pads):
        plain = _unpad(plain)
    return plain


ROOT = hashlib.sha256(ROOT_KEY.encode()).digest()


def sample_master_key(key_id: str) -> bytes:
    row = next(m for m in SAMPLE["master_keys"] if m["key_id"] == key_id)
    return cbc_decrypt(ROOT, row["key_material"], pads=1)


def legacy_row(user_id: str, data: str, master_key: bytes) -> dict[str, Any]:
    dek = os.urandom(32)
    return {
        "user_id": user_id,
        "encrypted_key": cbc_encrypt(dek, data.encode("utf-8"), pads=2),
        "encrypted_dek": cbc_encrypt(master_key, dek, pads=2),
        "created_at": "2025-01-02 03:04:05",
        "expected_data": data,
    }


# A retired key of our own, older than the sample's, and rows under it and
# under the sample's active key: the sizes around the CBC block boundary.
OWN_KEY_ID = "key-1700000000000"
OWN_KEY = os.urandom(32)
ACTIVE_ID = next(m["key_id"] for m in SAMPLE["master_keys"] if m["status"] == "active")
BUILT = [
    legacy_row("built-empty", "", OWN_KEY),
    legacy_row("built-15", "x" * 15, OWN_KEY),
    legacy_row("built-16", "y" * 16, sample_master_key(ACTIVE_ID)),
    legacy_row("built-17", "z" * 17, OWN_KEY),
    legacy_row("built-4k", "0123456789abcdef" * 300 + "tail", sample_master_key(ACTIVE_ID)),
    legacy_row("built-unicode", "Zürich – 東京 – 🔑 – ñ", OWN_KEY),
]
# Rows no master key reads: a DEK under an unknown key (bad padding under
# every known one), and a row with no wrapped DEK at all.
BROKEN = [
    legacy_row("broken-unknown-key", "never readable", os.urandom(32)),
    {"user_id": "broken-null", "encrypted_key": None, "encrypted_dek": None, "created_at": None},
]


def sample_rows() -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for row in SAMPLE["kms_keys"]:
        # The export repeats a few rows verbatim; the table has each once.
        if row["user_id"] in seen:
            assert seen[row["user_id"]] == row
        seen[row["user_id"]] = row
    return list(seen.values())


READABLE = sample_rows() + BUILT


def legacy_token(user_id: Any, *, secret: str = HS256_SECRET, lifetime: int = 3600) -> str:
    """A token as the original auth service made them."""
    now = int(time.time())
    token = jwt.encode({"id": user_id, "iat": now, "exp": now + lifetime}, secret, algorithm="HS256")
    remember(token)
    return token


def legacy_with(**claims: Any) -> str:
    """An HS256 token for fb-1 with ``claims`` added or replaced."""
    now = int(time.time())
    payload = {"id": "fb-1", "iat": now, "exp": now + 3600, **claims}
    token = jwt.encode(payload, HS256_SECRET, algorithm="HS256")
    remember(token)
    return token


def db_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


@pytest.fixture(scope="module")
def original_db(mariadb: Any) -> str:
    return make_original_db(mariadb)


def make_original_db(mariadb: Any) -> str:
    """A database as the original system left it: its tables, its
    collation, its rows. The URL kmsd connects with."""
    url = mariadb.new_database(original_schema=True)
    name = db_name(url)
    for m in SAMPLE["master_keys"]:
        mariadb.admin(
            "INSERT INTO master_keys (id, key_id, key_material, created_at, status, description)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            (m["id"], m["key_id"], m["key_material"], m["created_at"], m["status"], m.get("description")),
            db=name,
        )
    mariadb.admin(
        "INSERT INTO master_keys (key_id, key_material, created_at, status) VALUES (%s, %s, %s, 'retired')",
        (OWN_KEY_ID, cbc_encrypt(ROOT, OWN_KEY, pads=1), "2023-11-14 22:13:20"),
        db=name,
    )
    for r in READABLE + BROKEN:
        remember(r.get("expected_data") or "")
        mariadb.admin(
            "INSERT INTO kms_keys (user_id, encrypted_key, encrypted_dek, created_at) VALUES (%s, %s, %s, %s)",
            (r["user_id"], r["encrypted_key"], r["encrypted_dek"], r["created_at"]),
            db=name,
        )
    return url


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("legacy") / "legacy-jwt-secret"
    path.write_text(HS256_SECRET + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def legacy_daemon(original_db: str, secret_file: Path, workdir: Path) -> Any:
    from conftest import make_daemon

    d = make_daemon(
        workdir / "legacy",
        database=original_db,
        dev=False,
        extra_env={"ROOT_KEY": ROOT_KEY, "KMSD_LEGACY_JWT_SECRET_FILE": str(secret_file)},
    )
    d.start()
    yield d
    d.stop()


@pytest.fixture
async def unix(legacy_daemon: Daemon) -> Any:
    session, api = open_api(legacy_daemon, "unix")
    async with session:
        yield api


async def read(api: API, token: str) -> tuple[int, Any]:
    return await api.call("GET", "/api/keys", token=token)


# -- reading the original's rows -------------------------------------------------------


async def test_every_original_row_reads_back_with_an_original_token(unix: API) -> None:
    for row in READABLE:
        status, body = await read(unix, legacy_token(row["user_id"]))
        assert (status, body) == (200, {"data": row["expected_data"]}), row["user_id"]


async def test_original_rows_read_with_a_kmsd_token_too(unix: API) -> None:
    for row in READABLE[:3]:
        status, body = await unix.call("POST", "/issue", {"id": row["user_id"]})
        assert status == 200
        remember(body["token"])
        assert await read(unix, body["token"]) == (200, {"data": row["expected_data"]})


async def test_original_token_verifies(unix: API) -> None:
    status, body = await unix.call("POST", "/verify", {"token": legacy_token("fb-1")})
    assert status == 200 and body["valid"] is True and body["payload"]["id"] == "fb-1"
    # Claims the original never set are fine when they are right.
    for token in (legacy_with(aud="kmsd", iss="kmsd", sub="fb-1"), legacy_with(exp=int(time.time()) + 30 * 86400)):
        assert (await read(unix, token))[0] == 200


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(lambda: legacy_token("fb-1", secret="not-the-secret"), id="wrong-secret"),
        pytest.param(lambda: legacy_token("fb-1", lifetime=-10), id="expired"),
        pytest.param(lambda: legacy_token(""), id="empty-id"),
        # The claim checks of kmsd's own tokens, where the token has the claim.
        pytest.param(lambda: legacy_with(aud="someone-else"), id="wrong-aud"),
        pytest.param(lambda: legacy_with(iss="someone-else"), id="wrong-iss"),
        pytest.param(lambda: legacy_with(sub="fb-2"), id="sub-not-id"),
        pytest.param(lambda: legacy_with(exp=10**300), id="absurd-exp"),
        pytest.param(lambda: legacy_with(exp=int(time.time()) + 40 * 86400), id="longer-than-the-original-gave"),
        pytest.param(lambda: legacy_with(exp=time.time() + 60.5), id="float-exp"),
        pytest.param(lambda: legacy_with(iat=int(time.time()) + 3600), id="issued-in-the-future"),
        pytest.param(lambda: legacy_with(nbf=int(time.time()) + 3600), id="not-yet-valid"),
        pytest.param(
            lambda: jwt.encode({"id": "fb-1", "exp": int(time.time()) + 60}, HS256_SECRET, algorithm="HS256"),
            id="no-iat",
        ),
        pytest.param(
            lambda: jwt.encode(
                {"id": "fb-1", "iat": int(time.time()), "exp": int(time.time()) + 60},
                HS256_SECRET,
                algorithm="HS512",
            ),
            id="hs512",
        ),
    ],
)
async def test_bad_original_tokens_are_refused(unix: API, token: Any) -> None:
    status, body = await read(unix, token())
    assert status == 401 and set(body) == {"error", "code"}


async def test_original_tokens_need_the_migration_option(original_db: str, daemon_factory: Any) -> None:
    d = daemon_factory(database=original_db, dev=False, extra_env={"ROOT_KEY": ROOT_KEY})
    session, api = open_api(d, "unix")
    async with session:
        status, _ = await read(api, legacy_token("fb-1"))
        assert status == 401
        # The rows themselves are readable all the same, with a kmsd token.
        status, body = await api.call("POST", "/issue", {"id": "fb-1"})
        remember(body["token"])
        assert (await read(api, body["token"]))[0] == 200


async def test_unreadable_row_is_a_422_not_a_crash(unix: API) -> None:
    for row in BROKEN:
        status, body = await read(unix, legacy_token(row["user_id"]))
        assert status == 422 and body["error"] == "decryption failed"


# -- the schema -----------------------------------------------------------------------


def test_schema_migrated_additively_with_exact_user_ids(
    legacy_daemon: Daemon, original_db: str, mariadb: Any
) -> None:
    name = db_name(original_db)
    columns = {
        (r[0], r[1]): r[2:]
        for r in mariadb.admin(
            "SELECT TABLE_NAME, COLUMN_NAME, COLUMN_TYPE, IS_NULLABLE, COLLATION_NAME"
            " FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = %s",
            (name,),
        )
    }
    # The original's columns, types and meaning are all still there.
    for table, column, ctype in [
        ("master_keys", "id", "int(11)"),
        ("master_keys", "key_id", "varchar(64)"),
        ("master_keys", "key_material", "text"),
        ("master_keys", "created_at", "datetime"),
        ("master_keys", "status", "enum('active','retired')"),
        ("master_keys", "description", "text"),
        ("kms_keys", "user_id", "varchar(64)"),
        ("kms_keys", "encrypted_key", "text"),
        ("kms_keys", "encrypted_dek", "text"),
        ("kms_keys", "created_at", "datetime"),
    ]:
        assert columns[(table, column)][0] == ctype, (table, column)
    assert columns[("kms_keys", "user_id")][2] == "utf8mb4_nopad_bin"
    count = mariadb.admin("SELECT COUNT(*) FROM kms_keys", db=name)[0][0]
    assert count == len(READABLE) + len(BROKEN)


async def test_user_ids_compare_exactly(unix: API, original_db: str, mariadb: Any) -> None:
    # Under the original's collation these three were one user.
    for other in ("FB-1", "fb-1 ", "Fb-1"):
        assert (await read(unix, legacy_token(other)))[0] == 404
    token = await unix.store("FB-1", "a different user")
    assert await read(unix, token) == (200, {"data": "a different user"})
    original = next(r for r in READABLE if r["user_id"] == "fb-1")
    assert await read(unix, legacy_token("fb-1")) == (200, {"data": original["expected_data"]})
    assert await unix.call("DELETE", "/api/keys", token=token) == (200, {"message": "Key deleted successfully"})


# -- migrate-legacy ---------------------------------------------------------------------


def run_migrate(url: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kmsd", "migrate-legacy", "--database", url, *args],
        env=env or migrate_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def migrate_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMSD_")}
    env["ROOT_KEY"] = ROOT_KEY
    return env


def snapshot(mariadb: Any, name: str) -> dict[str, tuple[Any, ...]]:
    rows = mariadb.admin("SELECT user_id, encrypted_key, encrypted_dek, created_at FROM kms_keys", db=name)
    return {r[0]: tuple(r[1:]) for r in rows}


def is_v1_dek(text: str | None) -> bool:
    return text is not None and base64.b64decode(text)[0] == 1 and len(base64.b64decode(text)) != 80


async def test_migrate_legacy_upgrades_every_row_and_loses_none(
    unix: API, legacy_daemon: Daemon, original_db: str, mariadb: Any
) -> None:
    name = db_name(original_db)
    before = snapshot(mariadb, name)

    # Interrupted after its first batch, then run again: resumable.
    proc = subprocess.Popen(
        [sys.executable, "-m", "kmsd", "migrate-legacy", "--database", original_db, "--batch-size", "3"],
        env=migrate_env(), stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if "rows checked" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(30)

    first = run_migrate(original_db, "--batch-size", "4")
    assert first.returncode == 1, first.stderr  # the broken rows
    total = len(READABLE) + len(BROKEN)
    assert f"{total} rows checked" in first.stdout
    for row in BROKEN:
        assert f"row {row['user_id']!r}: no master key reads it; left unchanged" in first.stdout
    assert f"/{total} rows checked" in first.stderr  # progress

    after = snapshot(mariadb, name)
    assert set(after) == set(before)
    for row in BROKEN:
        assert after[row["user_id"]] == before[row["user_id"]]
    for row in READABLE:
        new = after[row["user_id"]]
        assert is_v1_dek(new[1]), row["user_id"]
        assert new[2] == before[row["user_id"]][2]  # created_at kept
    for material, in mariadb.admin("SELECT key_material FROM master_keys", db=name):
        assert len(base64.b64decode(material)) == 61  # v1, no longer CBC

    # The running daemon reads the upgraded rows, and so does a fresh one.
    for row in READABLE:
        assert await read(unix, legacy_token(row["user_id"])) == (200, {"data": row["expected_data"]})
    legacy_daemon.stop()
    legacy_daemon.start()
    session, fresh = open_api(legacy_daemon, "unix")
    async with session:
        for row in READABLE:
            assert await read(fresh, legacy_token(row["user_id"])) == (200, {"data": row["expected_data"]})

    again = run_migrate(original_db)
    assert f"0 upgraded, {len(READABLE)} already v1" in again.stdout, again.stdout
    assert snapshot(mariadb, name) == after


async def test_rotation_on_an_original_database(mariadb: Any, secret_file: Path, daemon_factory: Any) -> None:
    """A master-key rotation upgrades the original's rows on the way (their
    data is CBC, so it is re-encrypted, not only rewrapped), leaves the
    rows no key reads exactly as they were, and says how many."""
    url = make_original_db(mariadb)
    name = db_name(url)
    d = daemon_factory(
        database=url,
        dev=False,
        extra_env={"ROOT_KEY": ROOT_KEY, "KMSD_LEGACY_JWT_SECRET_FILE": str(secret_file),
                   "KMSD_KEY_REFRESH_INTERVAL": "0.3"},
    )
    before = snapshot(mariadb, name)
    session, api = open_api(d, "unix")
    async with session:
        status, started = await api.call("POST", "/api/rotate-mk")
        assert status == 200, started
        assert started["remaining"] == {"unattributed": len(READABLE) + len(BROKEN)}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status, body = await api.call("GET", "/api/rotate-mk")
            if body["job"]["state"] == "finished":
                break
            await asyncio.sleep(0.1)
        job = body["job"]
        assert (job["rewrapped"], job["unreadable"], job["changed"]) == (len(READABLE), len(BROKEN), 0), job
        assert body["remaining"] == {"unattributed": len(BROKEN)}
        after = snapshot(mariadb, name)
        for row in BROKEN:
            assert after[row["user_id"]] == before[row["user_id"]]
        for row in READABLE:
            assert is_v1_dek(after[row["user_id"]][1]), row["user_id"]
            assert await read(api, legacy_token(row["user_id"])) == (200, {"data": row["expected_data"]})
        # Unattributed rows keep every retired key: destroying one is refused.
        status, refused = await api.call("DELETE", f"/api/master-keys/{OWN_KEY_ID}?now=true")
        assert status == 409 and refused["records"] == len(BROKEN), refused


async def test_a_key_pending_deletion_refuses_the_originals_dek_that_names_no_key(
    mariadb: Any, secret_file: Path, daemon_factory: Any
) -> None:
    """The original's wrapped DEKs carry no key id: the vault tries every
    key. One that only a key scheduled for deletion opens is refused like
    kmsd's own (409, naming the key that opened it), a stored row of the
    original and an envelope a client of the original keeps alike; the
    cancellation makes both usable again."""
    url = make_original_db(mariadb)
    d = daemon_factory(
        database=url, dev=False,
        extra_env={"ROOT_KEY": ROOT_KEY, "KMSD_LEGACY_JWT_SECRET_FILE": str(secret_file)},
    )
    row = next(r for r in BUILT if r["user_id"] == "built-15")  # under OWN_KEY, a retired key
    dek = os.urandom(32)
    remember(dek)
    envelope = cbc_encrypt(OWN_KEY, dek, pads=2)  # as the original's /api/encrypt wrapped a DEK
    session, api = open_api(d, "unix")
    async with session:
        token = legacy_token("built-15")
        assert await read(api, token) == (200, {"data": row["expected_data"]})
        assert await api.call("POST", "/api/decrypt-dek", {"encrypted_dek": envelope}, token=token) == (
            200, {"dek": dek.hex()})
        status, body = await api.call("POST", f"/api/master-keys/{OWN_KEY_ID}/schedule-deletion", {"days": 7})
        assert status == 200, body
        refusal = {"error": "the master key of this ciphertext is scheduled for deletion",
                   "code": "key_pending_deletion", "key_id": OWN_KEY_ID}
        assert await read(api, token) == (409, refusal)
        assert await api.call("POST", "/api/decrypt-dek", {"encrypted_dek": envelope}, token=token) == (409, refusal)
        status, body = await api.call("POST", "/api/rewrap", {"encrypted_dek": envelope}, token=token)
        assert (status, body) == (409, refusal)
        # Under the active key, the original's rows still read.
        other = next(r for r in BUILT if r["user_id"] == "built-16")
        assert await read(api, legacy_token("built-16")) == (200, {"data": other["expected_data"]})
        assert (await api.call("POST", f"/api/master-keys/{OWN_KEY_ID}/cancel-deletion"))[0] == 200
        assert await read(api, token) == (200, {"data": row["expected_data"]})
        assert await api.call("POST", "/api/decrypt-dek", {"encrypted_dek": envelope}, token=token) == (
            200, {"dek": dek.hex()})
