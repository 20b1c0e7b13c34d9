"""kmsd as a drop-in for the original system's *clients*.

Two independent clients of the original's wire contract, written here from
that contract (http.client and plain ``cryptography``; no kmsd code):

- ``OriginalKeyServer`` does what the original key-server does. Write:
  ``POST /api/encrypt {data, dek}`` on the vault port, the ``kms_keys`` row
  inserted by itself, ``POST /issue {id}`` on the auth port. Read:
  ``POST /verify``, the row selected by itself, ``POST /api/decrypt-dek
  {encrypted_dek, user_id}`` with the owner's token, then AES-256-CBC of
  ``encrypted_key`` by itself.
- ``DocumentStore`` keeps envelopes in a table of its own, as the original's
  document manager does: a document encrypted by itself (AES-256-GCM) under
  a DEK it made, the ``encrypted_dek`` that ``/api/encrypt`` answered stored
  beside it, ``encrypted_key`` thrown away.

Both run against real daemons on SQLite and MariaDB databases that hold the
original's master keys and rows (the sample, plus rows and envelopes from the
independent writer in test_legacy.py).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, _UnixHTTPConnection, free_port, make_daemon, remember, remember_fields
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from support.ci import skip_or_fail
from test_legacy import (
    ACTIVE_ID,
    BROKEN,
    HS256_SECRET,
    OWN_KEY,
    OWN_KEY_ID,
    READABLE,
    ROOT,
    ROOT_KEY,
    SAMPLE,
    cbc_decrypt,
    cbc_encrypt,
    db_name,
    legacy_token,
    make_original_db,
    sample_master_key,
    sample_rows,
)

pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")

# Every master key the original left: the sample's (one active, two
# retired) and an older one of our own.
MASTER_KEYS = {m["key_id"]: sample_master_key(m["key_id"]) for m in SAMPLE["master_keys"]} | {OWN_KEY_ID: OWN_KEY}


# -- the wire, as the original's clients speak it ------------------------------------


class Wire:
    """JSON over HTTP/1.1 to one listener: a TCP port, or the Unix socket."""

    def __init__(self, *, port: int | None = None, unix: str | None = None) -> None:
        self.port, self.unix = port, unix

    def call(
        self, method: str, path: str, body: Any = None, *, token: str | None = None, bearer: bool = True
    ) -> tuple[int, Any]:
        conn: http.client.HTTPConnection
        if self.unix:
            conn = _UnixHTTPConnection(self.unix, timeout=10)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        headers = {"Host": "localhost" if self.unix else f"127.0.0.1:{self.port}"}
        if token is not None:
            remember(token)
            headers["Authorization"] = f"Bearer {token}" if bearer else token
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
            remember_fields(body)
        try:
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        try:
            answer = json.loads(raw)
        except ValueError:
            return resp.status, raw
        remember_fields(answer)
        return resp.status, answer


def keyserver_decrypt(dek: bytes, encrypted_key: str) -> bytes:
    """What the original key-server does with ``encrypted_key``: AES-256-CBC
    with the IV in front (the cipher strips the library's pad), then one
    more PKCS#7 pad stripped by hand."""
    raw = base64.b64decode(encrypted_key)
    decryptor = Cipher(algorithms.AES(dek), modes.CBC(raw[:16])).decryptor()
    plain = decryptor.update(raw[16:]) + decryptor.finalize()
    for _ in range(2):
        unpadder = padding.PKCS7(128).unpadder()
        plain = unpadder.update(plain) + unpadder.finalize()
    return plain


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def original_envelope(key_id: str, dek: bytes) -> str:
    """An ``encrypted_dek`` as the original's ``/api/encrypt`` made it under
    the master key ``key_id``."""
    return cbc_encrypt(MASTER_KEYS[key_id], dek, pads=2)


def respell(text: str) -> str:
    """The same bytes in another base64 spelling: the unused low bits of the
    last character before the padding set (a lax decoder ignores them)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    stripped = text.rstrip("=")
    assert len(stripped) < len(text), "needs padding to have unused bits"
    last = alphabet.index(stripped[-1])
    other = alphabet[last | (0b11 if text.endswith("=") and not text.endswith("==") else 0b1111)]
    assert other != stripped[-1]
    changed = stripped[:-1] + other + text[len(stripped):]
    assert base64.b64decode(changed) == base64.b64decode(text)
    return changed


# -- the tables the clients write and read themselves --------------------------------


class Table:
    """``kms_keys`` as the original key-server reaches it: its own
    connection to the database."""

    def __init__(self, url: str, mariadb: Any = None) -> None:
        self.url, self.mariadb = url, mariadb

    def _sql(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        if self.mariadb is not None:
            return self.mariadb.admin(sql, params, db=db_name(self.url))
        with sqlite3.connect(self.url.removeprefix("sqlite:///"), timeout=10) as conn:
            return conn.execute(sql.replace("%s", "?"), params).fetchall()

    def insert(self, user_id: str, encrypted_key: str, encrypted_dek: str) -> None:
        self._sql(
            "INSERT INTO kms_keys (user_id, encrypted_key, encrypted_dek, created_at) VALUES (%s, %s, %s, %s)",
            (user_id, encrypted_key, encrypted_dek, "2026-12-01 10:00:00"),
        )

    def select(self, user_id: str) -> tuple[str, str] | None:
        rows = self._sql("SELECT encrypted_key, encrypted_dek FROM kms_keys WHERE user_id = %s", (user_id,))
        return (rows[0][0], rows[0][1]) if rows else None

    def row(self, user_id: str) -> tuple[str, str, str | None]:
        rows = self._sql(
            "SELECT encrypted_key, encrypted_dek, master_key_id FROM kms_keys WHERE user_id = %s", (user_id,)
        )
        return rows[0]


class OriginalKeyServer:
    """The original key-server's two flows, with kmsd as its vault (port
    8001 in the original's layout) and its auth service (port 8002)."""

    def __init__(self, vault: Wire, auth: Wire, table: Table) -> None:
        self.vault, self.auth, self.table = vault, auth, table

    def store(self, user_id: str, data: str) -> str:
        remember(data)
        dek = os.urandom(32)
        remember(dek)
        status, enc = self.vault.call("POST", "/api/encrypt", {"data": b64(data.encode()), "dek": dek.hex()})
        assert status == 200, enc
        self.table.insert(user_id, enc["encrypted_key"], enc["encrypted_dek"])
        status, issued = self.auth.call("POST", "/issue", {"id": user_id})
        assert status == 200, issued
        return str(issued["token"])

    def read(self, token: str) -> str:
        status, verified = self.auth.call("POST", "/verify", {"token": token})
        assert status == 200 and verified["valid"] is True, verified
        user_id = verified["payload"]["id"]
        row = self.table.select(str(user_id))
        assert row is not None, user_id
        encrypted_key, encrypted_dek = row
        status, opened = self.vault.call(
            "POST", "/api/decrypt-dek", {"encrypted_dek": encrypted_dek, "user_id": user_id}, token=token
        )
        assert status == 200, opened
        return keyserver_decrypt(bytes.fromhex(opened["dek"]), encrypted_key).decode()


class DocumentStore:
    """Documents in a table of their own, each under its own DEK, with the
    wrapped DEK that ``/api/encrypt`` answered (``encrypted_key`` dropped)."""

    def __init__(self, path: Path, vault: Wire) -> None:
        self.db = sqlite3.connect(path)
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS documents (id TEXT PRIMARY KEY, nonce BLOB, body BLOB, encrypted_dek TEXT)"
        )
        self.vault = vault

    def put(self, doc_id: str, document: bytes, *, encrypted_dek: str | None = None, dek: bytes | None = None) -> None:
        dek = dek or os.urandom(32)
        remember(dek, document.decode(errors="replace"))
        if encrypted_dek is None:
            status, enc = self.vault.call("POST", "/api/encrypt", {"data": b64(b"document"), "dek": dek.hex()})
            assert status == 200, enc
            encrypted_dek = enc["encrypted_dek"]
        nonce = os.urandom(12)
        body = AESGCM(dek).encrypt(nonce, document, doc_id.encode())
        self.db.execute("INSERT OR REPLACE INTO documents VALUES (?, ?, ?, ?)", (doc_id, nonce, body, encrypted_dek))

    def envelope(self, doc_id: str) -> str:
        return str(self.db.execute("SELECT encrypted_dek FROM documents WHERE id = ?", (doc_id,)).fetchone()[0])

    def set_envelope(self, doc_id: str, encrypted_dek: str) -> None:
        self.db.execute("UPDATE documents SET encrypted_dek = ? WHERE id = ?", (encrypted_dek, doc_id))

    def get(self, doc_id: str, token: str, *, bearer: bool = True) -> tuple[int, bytes | Any]:
        nonce, body, encrypted_dek = self.db.execute(
            "SELECT nonce, body, encrypted_dek FROM documents WHERE id = ?", (doc_id,)
        ).fetchone()
        status, opened = self.vault.call(
            "POST", "/api/decrypt-dek", {"encrypted_dek": encrypted_dek}, token=token, bearer=bearer
        )
        if status != 200:
            return status, opened
        return 200, AESGCM(bytes.fromhex(opened["dek"])).decrypt(nonce, body, doc_id.encode())


# -- databases as the original left them, and daemons on them --------------------------


_SQLITE_ORIGINAL_SCHEMA = """
CREATE TABLE master_keys (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id VARCHAR(64) UNIQUE NOT NULL,
    key_material TEXT NOT NULL,
    created_at DATETIME NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'retired')),
    description TEXT
);
CREATE TABLE kms_keys (
    user_id VARCHAR(64) PRIMARY KEY,
    encrypted_key TEXT,
    encrypted_dek TEXT,
    created_at DATETIME
);
"""


def make_original_sqlite(path: Path) -> str:
    """The original's tables and rows in an SQLite file (the same rows
    ``make_original_db`` puts in MariaDB)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as conn:
        conn.executescript(_SQLITE_ORIGINAL_SCHEMA)
        for m in SAMPLE["master_keys"]:
            conn.execute(
                "INSERT INTO master_keys (id, key_id, key_material, created_at, status) VALUES (?, ?, ?, ?, ?)",
                (m["id"], m["key_id"], m["key_material"], m["created_at"], m["status"]),
            )
        conn.execute(
            "INSERT INTO master_keys (key_id, key_material, created_at, status) VALUES (?, ?, ?, 'retired')",
            (OWN_KEY_ID, cbc_encrypt(ROOT, OWN_KEY, pads=1), "2023-11-14 22:13:20"),
        )
        for r in READABLE + BROKEN:
            remember(r.get("expected_data") or "")
            conn.execute(
                "INSERT INTO kms_keys (user_id, encrypted_key, encrypted_dek, created_at) VALUES (?, ?, ?, ?)",
                (r["user_id"], r["encrypted_key"], r["encrypted_dek"], r["created_at"]),
            )
    return f"sqlite:///{path}"


@dataclass
class Site:
    """A daemon on a database the original wrote, its listeners in the
    original's three-port layout, and the key-server's view of its table."""

    backend: str
    daemon: Daemon
    table: Table
    vault_port: int
    auth_port: int
    audit: Path

    @property
    def tcp(self) -> Wire:
        return Wire(port=self.daemon.port)

    @property
    def unix(self) -> Wire:
        return Wire(unix=self.daemon.socket)

    @property
    def keyserver(self) -> OriginalKeyServer:
        return OriginalKeyServer(Wire(port=self.vault_port), Wire(port=self.auth_port), self.table)

    def token(self, user_id: str) -> str:
        """A token for ``user_id`` from an admin peer (root on the socket)."""
        status, body = self.unix.call("POST", "/issue", {"id": user_id})
        assert status == 200, body
        return str(body["token"])

    def metric(self, name: str, **labels: str) -> float:
        """A sample of /metrics (0 when the series does not exist yet)."""
        status, text = self.tcp.call("GET", "/metrics")
        assert status == 200
        for line in text.decode().splitlines():
            series, _, value = line.rpartition(" ")
            metric, _, rest = series.partition("{")
            found = dict(re.findall(r'(\w+)="([^"]*)"', rest))
            if metric == name and found == labels:
                return float(value)
        return 0.0

    def audit_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit.read_text().splitlines() if line.strip()]


def _site(request: pytest.FixtureRequest, workdir: Path, name: str, backend: str, **env: str) -> Iterator[Site]:
    mariadb = None
    base = workdir / f"dropin-{name}-{backend}"
    if backend == "mysql":
        mariadb = request.getfixturevalue("mariadb")
        url = make_original_db(mariadb)
    else:
        url = make_original_sqlite(base / "original.db")
    secret = base / "legacy-jwt-secret"
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_text(HS256_SECRET + "\n")
    audit = base / "audit.log"
    d = make_daemon(
        base,
        database=url,
        dev=False,
        extra_env={
            "ROOT_KEY": ROOT_KEY,
            "KMSD_LEGACY_JWT_SECRET_FILE": str(secret),
            "KMSD_AUDIT_LOG": str(audit),
            **env,
        },
    )
    vault_port, auth_port = free_port(), free_port()
    d.args += ["--listen", f"127.0.0.1:{vault_port}", "--listen", f"127.0.0.1:{auth_port}"]
    d.start()
    try:
        yield Site(backend, d, Table(url, mariadb), vault_port, auth_port, audit)
    finally:
        d.stop()


@pytest.fixture(scope="module", params=["sqlite", "mysql"])
def site(request: pytest.FixtureRequest, workdir: Path) -> Iterator[Site]:
    """Default settings: the original's documented contract, nothing more."""
    yield from _site(request, workdir, "default", request.param)


@pytest.fixture(scope="module", params=["sqlite", "mysql"])
def compat(request: pytest.FixtureRequest, workdir: Path) -> Iterator[Site]:
    """compat = "original": the original's weaker rules, for its services."""
    yield from _site(request, workdir, "compat", request.param, KMSD_COMPAT="original")


def needs_root() -> None:
    if os.geteuid() != 0:
        skip_or_fail("needs root: the admin peer is root on the Unix socket")


# -- the independent writer, cross-checked against the original's own rows --------------


def test_the_independent_writer_reproduces_the_originals_rows_byte_for_byte() -> None:
    for row in sample_rows():
        mk = MASTER_KEYS[row["wrapped_under"]]
        dek = cbc_decrypt(mk, row["encrypted_dek"], pads=2)
        assert len(dek) == 32
        dek_iv = base64.b64decode(row["encrypted_dek"])[:16]
        key_iv = base64.b64decode(row["encrypted_key"])[:16]
        assert cbc_encrypt(mk, dek, pads=2, iv=dek_iv) == row["encrypted_dek"]
        assert cbc_encrypt(dek, row["expected_data"].encode(), pads=2, iv=key_iv) == row["encrypted_key"]
        # The key-server's way of reading encrypted_key gives the data too.
        assert keyserver_decrypt(dek, row["encrypted_key"]).decode() == row["expected_data"]


# -- /api/encrypt without an owner: the original's answer, byte for byte -----------------


@pytest.mark.parametrize("data", [b"x" * 15, b"y" * 16, b"z" * 17, os.urandom(4096), "Zürich 東京 🔑".encode()],
                         ids=["15", "16", "17", "4k", "unicode"])
def test_encrypt_without_owner_answers_exactly_what_the_original_did(site: Site, data: bytes) -> None:
    dek = os.urandom(32)
    remember(dek)
    status, enc = site.tcp.call("POST", "/api/encrypt", {"data": b64(data), "dek": dek.hex()})
    assert status == 200, enc
    assert set(enc) == {"encrypted_key", "encrypted_dek"}
    raw = base64.b64decode(enc["encrypted_key"], validate=True)
    assert len(raw) == 16 + 16 * (len(data) // 16 + 1) + 16
    # The original's clients read it with their own DEK...
    assert keyserver_decrypt(dek, enc["encrypted_key"]) == data
    # ...and it is the original's layout exactly: the independent writer,
    # given the same IV, writes the same bytes.
    assert cbc_encrypt(dek, data, pads=2, iv=raw[:16]) == enc["encrypted_key"]
    # Any valid token unwraps the DEK (the original's rule for such envelopes).
    token = site.token("dropin-anyone")
    assert site.tcp.call("POST", "/api/decrypt-dek", {"encrypted_dek": enc["encrypted_dek"]}, token=token) == (
        200, {"dek": dek.hex()}
    )


def test_document_store_keeps_unbound_envelopes_in_its_own_table(site: Site, tmp_path: Path) -> None:
    docs = DocumentStore(tmp_path / "docs.db", site.tcp)
    docs.put("doc-1", b"the first document")
    docs.put("doc-2", b"the second one, longer " * 40)
    reader, writer = site.token("dropin-reader"), site.token("dropin-writer")
    assert docs.get("doc-1", reader) == (200, b"the first document")
    assert docs.get("doc-2", writer) == (200, b"the second one, longer " * 40)
    # The original's services took a token without the Bearer scheme too.
    assert docs.get("doc-1", reader, bearer=False) == (200, b"the first document")
    # A token is still needed, and it must be valid.
    status, body = site.tcp.call("POST", "/api/decrypt-dek", {"encrypted_dek": docs.envelope("doc-1")})
    assert status == 401
    assert docs.get("doc-1", "not-a-token")[0] == 401
    assert docs.get("doc-1", "Basic " + reader, bearer=False)[0] == 401


@pytest.mark.parametrize("key_id", list(MASTER_KEYS), ids=["retired-1", "retired-2", "active", "own-old"])
def test_every_envelope_the_original_wrapped_unwraps_and_rewraps(site: Site, key_id: str, tmp_path: Path) -> None:
    """Envelopes the original's document manager keeps, wrapped under each
    of the original's master keys (active and retired)."""
    docs = DocumentStore(tmp_path / "docs.db", site.tcp)
    dek = os.urandom(32)
    docs.put("kept", b"a document from before kmsd", encrypted_dek=original_envelope(key_id, dek), dek=dek)
    alice, bob = site.token("dropin-alice"), site.token("dropin-bob")
    assert docs.get("kept", alice) == (200, b"a document from before kmsd")
    assert docs.get("kept", bob) == (200, b"a document from before kmsd")
    # Rewrapped with an owner, it becomes kmsd's authenticated format, bound
    # to alice: hers only from then on.
    status, out = site.tcp.call(
        "POST", "/api/rewrap", {"encrypted_dek": docs.envelope("kept"), "user_id": "dropin-alice"}, token=alice
    )
    assert status == 200, out
    assert base64.b64decode(out["encrypted_dek"])[0] == 0x01
    docs.set_envelope("kept", out["encrypted_dek"])
    assert docs.get("kept", alice) == (200, b"a document from before kmsd")
    assert docs.get("kept", bob)[0] == 422
    # Every kind of envelope is counted and audited with how it opened.
    assert site.metric("kmsd_unbound_envelopes_total", operation="decrypt_dek", kind="original") >= 2


def test_an_unbound_envelope_rewraps_unbound_or_to_its_caller(site: Site) -> None:
    dek = os.urandom(32)
    remember(dek)
    _, enc = site.tcp.call("POST", "/api/encrypt", {"data": b64(b"d"), "dek": dek.hex()})
    carol, dave = site.token("dropin-carol"), site.token("dropin-dave")
    # Without user_id it stays unbound, under the active master key: anyone's.
    status, same = site.tcp.call("POST", "/api/rewrap", {"encrypted_dek": enc["encrypted_dek"]}, token=carol)
    assert status == 200 and same["encrypted_dek"] != enc["encrypted_dek"]
    assert site.tcp.call("POST", "/api/decrypt-dek", same, token=dave) == (200, {"dek": dek.hex()})
    # Bound to the caller itself: fine; to someone else: an admin peer only.
    status, mine = site.tcp.call(
        "POST", "/api/rewrap", {"encrypted_dek": enc["encrypted_dek"], "user_id": "dropin-carol"}, token=carol
    )
    assert status == 200
    assert site.tcp.call("POST", "/api/decrypt-dek", mine, token=dave)[0] == 422
    assert site.tcp.call("POST", "/api/decrypt-dek", mine, token=carol) == (200, {"dek": dek.hex()})
    status, body = site.tcp.call(
        "POST", "/api/rewrap", {"encrypted_dek": enc["encrypted_dek"], "user_id": "dropin-dave"}, token=carol
    )
    assert status == 403 and body["code"] == "forbidden"
    # A bound envelope does not rewrap for anyone but its owner.
    assert site.tcp.call("POST", "/api/rewrap", mine, token=dave)[0] == 422
    # Rewrapping a bound one again keeps it bound to its owner.
    status, again = site.tcp.call("POST", "/api/rewrap", mine, token=carol)
    assert status == 200
    assert site.tcp.call("POST", "/api/decrypt-dek", again, token=dave)[0] == 422
    assert site.tcp.call("POST", "/api/decrypt-dek", again, token=carol) == (200, {"dek": dek.hex()})


def test_an_admin_peer_binds_an_envelope_to_any_subject(site: Site) -> None:
    needs_root()
    dek = os.urandom(32)
    remember(dek)
    _, enc = site.tcp.call("POST", "/api/encrypt", {"data": b64(b"d"), "dek": dek.hex()})
    admin_token = site.token("dropin-ops")
    status, out = site.unix.call(
        "POST", "/api/rewrap", {"encrypted_dek": enc["encrypted_dek"], "user_id": "dropin-erin"}, token=admin_token
    )
    assert status == 200, out
    assert site.tcp.call("POST", "/api/decrypt-dek", out, token=site.token("dropin-erin")) == (200, {"dek": dek.hex()})
    assert site.tcp.call("POST", "/api/decrypt-dek", out, token=admin_token)[0] == 422


def test_envelopes_made_with_an_owner_stay_owner_only(site: Site) -> None:
    dek = os.urandom(32)
    remember(dek)
    frank = site.token("dropin-frank")
    _, by_token = site.tcp.call("POST", "/api/encrypt", {"data": b64(b"d"), "dek": dek.hex()}, token=frank)
    _, by_body = site.tcp.call("POST", "/api/encrypt", {"data": b64(b"d"), "dek": dek.hex(), "user_id": "dropin-frank"})
    other = site.token("dropin-grace")
    for enc in (by_token, by_body):
        body = {"encrypted_dek": enc["encrypted_dek"]}
        assert site.tcp.call("POST", "/api/decrypt-dek", body, token=other)[0] == 422
        assert site.tcp.call("POST", "/api/decrypt-dek", body, token=frank) == (200, {"dek": dek.hex()})
        assert site.tcp.call("POST", "/api/rewrap", body, token=other)[0] == 422


# -- stored records: their DEK is their owner's only -------------------------------------


def test_the_key_server_read_flow_works_on_the_originals_rows(site: Site) -> None:
    """The original's read flow, unchanged, on rows the original wrote
    (under every one of its master keys), with the original's tokens."""
    ks = site.keyserver
    for row in READABLE:
        assert ks.read(legacy_token(row["user_id"])) == row["expected_data"], row["user_id"]


def test_a_stored_records_dek_is_refused_to_anyone_else(site: Site) -> None:
    intruder = site.token("dropin-intruder")
    row = READABLE[0]
    encrypted_dek = site.table.select(row["user_id"])[1]  # type: ignore[index]
    for text in (encrypted_dek, respell(encrypted_dek)):
        status, body = site.tcp.call("POST", "/api/decrypt-dek", {"encrypted_dek": text}, token=intruder)
        assert (status, body["code"]) == (422, "decryption_failed")
        assert site.tcp.call("POST", "/api/rewrap", {"encrypted_dek": text}, token=intruder)[0] == 422
        # Naming the owner in the body changes nothing: the token decides.
        body = {"encrypted_dek": text, "user_id": row["user_id"]}
        assert site.tcp.call("POST", "/api/decrypt-dek", body, token=intruder)[0] == 422
    # A record kmsd wrote itself (v1, owner-bound) is its owner's too.
    status, stored = site.tcp.call("POST", "/api/keys", {"user_id": "dropin-henry", "data": "henry's card"})
    assert status == 200
    v1_dek = site.table.select("dropin-henry")[1]  # type: ignore[index]
    assert site.tcp.call("POST", "/api/decrypt-dek", {"encrypted_dek": v1_dek}, token=intruder)[0] == 422
    status, opened = site.tcp.call("POST", "/api/decrypt-dek", {"encrypted_dek": v1_dek}, token=stored["access_token"])
    assert status == 200 and len(bytes.fromhex(opened["dek"])) == 32


def test_a_batch_of_unbound_envelopes_keeps_each_records_dek_to_its_owner(site: Site) -> None:
    """In a batch, every envelope with no owner is checked against the
    stored records on its own (a few at a time): the original's rows' DEKs
    stay their owners', the unbound envelopes of the original's clients open
    for any token, in order."""
    intruder = site.token("dropin-batch-intruder")
    rows = [site.table.select(row["user_id"])[1] for row in READABLE[:6]]  # type: ignore[index]
    deks = [os.urandom(32) for _ in range(6)]
    remember(*deks)
    made = [site.tcp.call("POST", "/api/encrypt", {"data": b64(b"x"), "dek": d.hex()})[1]["encrypted_dek"] for d in deks]
    mixed = [text for pair in zip(rows, made, strict=True) for text in pair]
    for route in ("/api/decrypt-dek", "/api/rewrap"):
        status, body = site.tcp.call("POST", route, {"batch": [{"encrypted_dek": t} for t in mixed]}, token=intruder)
        assert status == 200, body
        got = body["batch"]
        assert [e.get("code") for e in got[0::2]] == ["decryption_failed"] * 6, (route, got)
        if route == "/api/decrypt-dek":
            assert [e["dek"] for e in got[1::2]] == [d.hex() for d in deks]
        else:
            assert all(set(e) == {"encrypted_dek"} for e in got[1::2])


def test_a_records_dek_stays_its_owners_after_the_row_is_replaced_or_deleted(site: Site) -> None:
    """A copy of an old row (a backup) still has the data its wrapped DEK
    opens: the DEK must not become anyone's once kmsd replaces the row."""
    intruder = site.token("dropin-backup-reader")
    owners = {}
    for how in ("replaced", "deleted"):
        user = f"released-{how}-{site.backend}"
        # The key-server's write flow; its token from an admin (no compat here).
        data, dek = f"value before it was {how}", os.urandom(32)
        remember(dek, data)
        _, enc = Wire(port=site.vault_port).call("POST", "/api/encrypt", {"data": b64(data.encode()), "dek": dek.hex()})
        site.table.insert(user, enc["encrypted_key"], enc["encrypted_dek"])
        owners[how] = (user, site.token(user))
    before = {how: site.table.select(user) for how, (user, _) in owners.items()}
    user, token = owners["replaced"]
    assert site.tcp.call("POST", "/api/keys", {"user_id": user, "data": "new value"}, token=token)[0] == 200
    user, token = owners["deleted"]
    assert site.tcp.call("DELETE", "/api/keys", token=token)[0] == 200
    # The deleted record's tokens died with it: the owner comes back with a new one.
    owners["deleted"] = (owners["deleted"][0], site.token(owners["deleted"][0]))
    for how, (user, token) in owners.items():
        old_key, old_dek = before[how]  # type: ignore[misc]
        assert site.table.select(user) != (old_key, old_dek)
        assert site.tcp.call("POST", "/api/decrypt-dek", {"encrypted_dek": old_dek}, token=intruder)[0] == 422
        status, opened = site.tcp.call("POST", "/api/decrypt-dek", {"encrypted_dek": old_dek}, token=token)
        assert status == 200
        assert keyserver_decrypt(bytes.fromhex(opened["dek"]), old_key).decode() == f"value before it was {how}"


def test_bad_user_ids_and_envelopes_are_4xx(site: Site) -> None:
    token = site.token("dropin-ivan")
    for body in ({"encrypted_dek": "AAAA", "user_id": 1.5}, {"encrypted_dek": "AAAA", "user_id": True},
                 {"encrypted_dek": "AAAA", "user_id": ["x"]}, {"encrypted_dek": 12}):
        status, answer = site.tcp.call("POST", "/api/decrypt-dek", body, token=token)
        assert status == 400, (body, answer)
        assert site.tcp.call("POST", "/api/rewrap", body, token=token)[0] == 400
    for text in ("AAAA", "!!", base64.b64encode(os.urandom(80)).decode(), "Ag" + "A" * 102):
        assert site.tcp.call("POST", "/api/rewrap", {"encrypted_dek": text}, token=token)[0] == 422
    assert site.tcp.call("POST", "/api/rewrap", {"encrypted_dek": "AAAA"})[0] == 401


# -- integer ids ------------------------------------------------------------------------


def test_an_integer_user_id_is_its_decimal_string(site: Site) -> None:
    user = int.from_bytes(os.urandom(4), "big")
    status, stored = site.tcp.call("POST", "/api/keys", {"user_id": user, "data": "numbered"})
    assert status == 200, stored
    token = stored["access_token"]
    assert site.tcp.call("GET", "/api/keys", token=token) == (200, {"data": "numbered"})
    # The token says it as the caller did (id a number, sub its string).
    status, verified = site.tcp.call("POST", "/verify", {"token": token})
    assert verified["payload"]["id"] == user and verified["payload"]["sub"] == str(user)
    # The same user as its decimal string: taken.
    assert site.tcp.call("POST", "/api/keys", {"user_id": str(user), "data": "x"})[0] == 409
    # An original token whose id is that number is that user, but only for
    # records as the original left them: this one kmsd created afterwards.
    assert site.tcp.call("GET", "/api/keys", token=legacy_token(user))[0] == 401
    older = user + 1
    dek = os.urandom(32)
    _, enc = Wire(port=site.vault_port).call("POST", "/api/encrypt", {"data": b64(b"written-before-kmsd"), "dek": dek.hex()})
    site.table.insert(str(older), enc["encrypted_key"], enc["encrypted_dek"])  # the original's row
    assert site.tcp.call("GET", "/api/keys", token=legacy_token(older)) == (200, {"data": "written-before-kmsd"})
    # /issue with an integer id (admin peer), and an envelope bound to it.
    status, issued = site.unix.call("POST", "/issue", {"id": user})
    assert status == 200
    assert site.tcp.call("GET", "/api/keys", token=issued["token"]) == (200, {"data": "numbered"})
    dek = os.urandom(32)
    remember(dek)
    _, enc = site.tcp.call("POST", "/api/encrypt", {"data": b64(b"n"), "dek": dek.hex(), "user_id": user})
    assert site.tcp.call("POST", "/api/decrypt-dek", {"encrypted_dek": enc["encrypted_dek"]}, token=token) == (
        200, {"dek": dek.hex()}
    )
    assert site.tcp.call("DELETE", "/api/keys", token=token)[0] == 200


# -- without compat, the original's weaker rules stay closed ---------------------------------


def test_without_compat_tcp_may_not_issue_for_any_id_or_read_the_rotation(site: Site) -> None:
    status, body = Wire(port=site.auth_port).call("POST", "/issue", {"id": "dropin-victim"})
    assert (status, body["code"]) == (403, "forbidden")
    assert site.tcp.call("GET", "/api/rotate-mk")[0] == 403
    assert site.metric("kmsd_compat_requests_total", route="/issue") == 0


# -- compat = "original": the original key-server, unchanged, against kmsd -------------------


def test_compat_key_server_stores_and_reads_end_to_end(compat: Site) -> None:
    ks = compat.keyserver
    before = compat.metric("kmsd_compat_requests_total", route="/issue")
    tokens = {f"ks-{compat.backend}-{i}": f"card {i} " + "é" * i for i in range(5)}
    issued = {user: ks.store(user, data) for user, data in tokens.items()}
    for user, data in tokens.items():
        assert ks.read(issued[user]) == data
        # kmsd's own read path serves the row the key-server wrote itself.
        assert compat.tcp.call("GET", "/api/keys", token=issued[user]) == (200, {"data": data})
    # Rows the original wrote before, read through the same flows.
    for row in READABLE[:4]:
        assert ks.read(legacy_token(row["user_id"])) == row["expected_data"]
    # Another user's token gets neither the row's DEK nor its data.
    first, second = list(issued)[:2]
    encrypted_dek = compat.table.select(first)[1]  # type: ignore[index]
    for text in (encrypted_dek, respell(encrypted_dek)):
        assert compat.tcp.call("POST", "/api/decrypt-dek", {"encrypted_dek": text}, token=issued[second])[0] == 422
    # Each /issue for another id over TCP is counted, and marked in its audit line.
    assert compat.metric("kmsd_compat_requests_total", route="/issue") == before + len(tokens)
    marked = [a for a in compat.audit_lines() if a["operation"] == "issue" and a.get("detail", {}).get("compat")]
    assert {a["subject"] for a in marked} >= set(tokens)
    assert all(a["detail"]["compat"] == "original" and a["caller"]["transport"] == "tcp" for a in marked)


def test_compat_rotation_status_over_tcp_and_loud_start(compat: Site) -> None:
    before = compat.metric("kmsd_compat_requests_total", route="/api/rotate-mk")
    status, body = compat.tcp.call("GET", "/api/rotate-mk")
    assert status == 200 and "state" in body
    assert compat.metric("kmsd_compat_requests_total", route="/api/rotate-mk") == before + 1
    assert any(a["operation"] == "rotation_status" and a.get("detail", {}).get("compat") == "original"
               for a in compat.audit_lines())
    # POST stays an admin's: compat does not open rotation itself.
    assert compat.tcp.call("POST", "/api/rotate-mk")[0] == 403
    assert '"compat_original"' in compat.daemon.logs()


def test_compat_check_config_shows_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMSD_") and k != "ROOT_KEY"}
    env.update(KMSD_COMPAT="original")
    out = subprocess.run([sys.executable, "-m", "kmsd", "check-config", "--database", f"sqlite:///{tmp_path}/x.db"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    effective = json.loads(out.stdout)
    assert (effective["compat"], effective["unbound_envelopes"]) == ("original", "allow")
    env["KMSD_COMPAT"] = "everything"
    out = subprocess.run([sys.executable, "-m", "kmsd", "check-config"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "compat must be one of" in out.stderr and "everything" not in out.stderr


def test_rows_the_key_server_wrote_are_upgraded_by_rotation(compat: Site) -> None:
    needs_root()
    ks = compat.keyserver
    data = {f"rot-{compat.backend}-{i}": f"rotated {i}" for i in range(3)}
    tokens = {user: ks.store(user, value) for user, value in data.items()}
    before = {user: compat.table.row(user)[1] for user in data}
    for user in data:
        assert base64.b64decode(before[user])[0] == 0x02  # unbound, as /api/encrypt made it
    status, job = compat.unix.call("POST", "/api/rotate-mk")
    assert status == 200, job
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status, state = compat.unix.call("GET", "/api/rotate-mk")
        if state["state"] != "running":
            break
        time.sleep(0.2)
    assert state["state"] != "running", state
    intruder = compat.token("dropin-rotation-intruder")
    for user, value in data.items():
        encrypted_key, encrypted_dek, key_id = compat.table.row(user)
        assert base64.b64decode(encrypted_dek)[0] == 0x01 and key_id == state["active_key_id"]
        assert compat.tcp.call("GET", "/api/keys", token=tokens[user]) == (200, {"data": value})
        old = {"encrypted_dek": before[user]}
        assert compat.tcp.call("POST", "/api/decrypt-dek", old, token=intruder)[0] == 422
        assert compat.tcp.call("POST", "/api/decrypt-dek", old, token=tokens[user])[0] == 200


def test_rows_the_key_server_wrote_are_upgraded_by_migrate_legacy(site: Site, tmp_path: Path) -> None:
    """Without compat the key-server gets its tokens from an admin; the
    rows it wrote through /api/encrypt are upgraded like the original's."""
    ks = site.keyserver
    user = f"mig-{site.backend}"
    dek = os.urandom(32)
    remember(dek, "migrated value")
    _, enc = Wire(port=site.vault_port).call("POST", "/api/encrypt", {"data": b64(b"migrated value"), "dek": dek.hex()})
    site.table.insert(user, enc["encrypted_key"], enc["encrypted_dek"])
    token = site.token(user)
    assert ks.read(token) == "migrated value"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMSD_")}
    env["ROOT_KEY"] = ROOT_KEY
    out = subprocess.run([sys.executable, "-m", "kmsd", "migrate-legacy", "--database", site.table.url],
                         env=env, capture_output=True, text=True, timeout=120)
    # Exit 1: the original's broken rows are listed and left alone.
    assert out.returncode == 1, out.stderr
    assert all(r["user_id"] in out.stdout + out.stderr for r in BROKEN if r["user_id"])
    _, encrypted_dek, _ = site.table.row(user)
    assert base64.b64decode(encrypted_dek)[0] == 0x01
    assert site.tcp.call("GET", "/api/keys", token=token) == (200, {"data": "migrated value"})
    # The row's old wrapped DEK (in any copy of the old row) is still its
    # owner's only; so are the original's rows' old ones.
    intruder = site.token("dropin-migration-intruder")
    for old, owner in ((enc["encrypted_dek"], token), (READABLE[0]["encrypted_dek"], legacy_token(READABLE[0]["user_id"]))):
        assert site.tcp.call("POST", "/api/decrypt-dek", {"encrypted_dek": old}, token=intruder)[0] == 422
        assert site.tcp.call("POST", "/api/decrypt-dek", {"encrypted_dek": old}, token=owner)[0] == 200


# -- unbound_envelopes = "refuse": leaving the original's rule behind --------------------------


def test_refuse_unbound_envelopes_once_every_client_has_upgraded(daemon_factory: Any, tmp_path: Path) -> None:
    needs_root()
    url = make_original_sqlite(tmp_path / "original.db")
    d = daemon_factory(database=url, dev=False, extra_env={"ROOT_KEY": ROOT_KEY})
    tcp, unix = Wire(port=d.port), Wire(unix=d.socket)
    dek = os.urandom(32)
    remember(dek)
    _, unbound = tcp.call("POST", "/api/encrypt", {"data": b64(b"u"), "dek": dek.hex()})
    _, issued = unix.call("POST", "/issue", {"id": "refuse-owner"})
    owner = issued["token"]
    _, bound = tcp.call("POST", "/api/encrypt", {"data": b64(b"b"), "dek": dek.hex()}, token=owner)
    _, stored = tcp.call("POST", "/api/keys", {"user_id": "refuse-rec", "data": "still readable"})
    original = original_envelope(ACTIVE_ID, dek)
    assert tcp.call("POST", "/api/decrypt-dek", {"encrypted_dek": original}, token=owner) == (200, {"dek": dek.hex()})
    d.stop()
    d.env["KMSD_UNBOUND_ENVELOPES"] = "refuse"
    d.start()
    status, body = tcp.call("POST", "/api/encrypt", {"data": b64(b"u"), "dek": dek.hex()})
    assert status == 400 and "unbound_envelopes" in body["error"]
    status, body = tcp.call("POST", "/api/decrypt-dek", {"encrypted_dek": unbound["encrypted_dek"]}, token=owner)
    assert (status, body["code"]) == (403, "forbidden") and "refuse" in body["error"]
    assert tcp.call("POST", "/api/rewrap", {"encrypted_dek": unbound["encrypted_dek"]}, token=owner)[0] == 403
    assert tcp.call("POST", "/api/decrypt-dek", {"encrypted_dek": original}, token=owner)[0] == 403
    # Bound envelopes and stored records are not affected.
    assert tcp.call("POST", "/api/decrypt-dek", {"encrypted_dek": bound["encrypted_dek"]}, token=owner) == (
        200, {"dek": dek.hex()}
    )
    assert tcp.call("GET", "/api/keys", token=stored["access_token"]) == (200, {"data": "still readable"})
    # An admin peer can still upgrade a straggler, with an owner.
    status, upgraded = unix.call(
        "POST", "/api/rewrap", {"encrypted_dek": unbound["encrypted_dek"], "user_id": "refuse-owner"}, token=owner
    )
    assert status == 200
    assert tcp.call("POST", "/api/decrypt-dek", upgraded, token=owner) == (200, {"dek": dek.hex()})


@pytest.mark.parametrize("other", [{"KMSD_UNBOUND_ENVELOPES": "refuse"}, {"KMSD_ROTATION_PERIOD": "90d"}])
def test_compat_refuses_settings_that_contradict_it(tmp_path: Path, other: dict[str, str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMSD_") and k != "ROOT_KEY"}
    env.update(KMSD_COMPAT="original", **other)
    out = subprocess.run([sys.executable, "-m", "kmsd", "check-config", "--database", f"sqlite:///{tmp_path}/x.db"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "compat" in out.stderr, out.stderr
