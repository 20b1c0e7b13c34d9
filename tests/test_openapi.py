"""docs/openapi.yaml describes exactly what kmsd serves.

- The document parses and is valid OpenAPI (when openapi-spec-validator is
  installed) and every ``$ref`` in it resolves.
- Every route the app registers is documented and every documented
  operation is registered (walked from ``create_app``, nothing started).
- The real daemon, over both listeners, answers a set of valid and invalid
  requests per route only with statuses that the document lists for that
  operation, with bodies that match the documented schemas; and request
  bodies it accepts match the documented request schemas, while bodies the
  document calls invalid are refused.
"""

from __future__ import annotations

import base64
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import API, Daemon, open_api, remember
from support.ci import skip_or_fail

from kmsd.auth import MAX_USER_ID
from kmsd.config import load_settings
from kmsd.errors import ERRORS_BY_CODE
from kmsd.http_input import DEK_HEX_LENGTH
from kmsd.server import create_app

DOCUMENT = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_TO_JSON = "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin.read()), sys.stdout)"


# -- loading the document -------------------------------------------------------------


def _load_yaml(text: str) -> Any:
    """PyYAML when the test environment has it; otherwise a conversion to
    JSON by another interpreter on the machine that has it (the base Python
    of the venv, Debian's python3-yaml), so that the route checks still run."""
    try:
        import yaml
    except ImportError:
        pass
    else:
        return yaml.safe_load(text)
    candidates = [getattr(sys, "_base_executable", None), "/usr/bin/python3", shutil.which("python3")]
    tried = []
    for exe in dict.fromkeys(c for c in candidates if c and os.path.exists(c)):
        tried.append(exe)
        proc = subprocess.run([exe, "-c", _TO_JSON], input=text, capture_output=True, text=True, timeout=30)
        if proc.returncode == 0:
            return json.loads(proc.stdout)
    reason = (
        "PyYAML is not installed in the test environment (add 'pyyaml' to the test extras) "
        f"and no other interpreter could convert the document (tried: {', '.join(tried) or 'none'})"
    )
    skip_or_fail(reason)


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    loaded = _load_yaml(DOCUMENT.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict), "docs/openapi.yaml is not a mapping"
    return loaded


def resolve(doc: dict[str, Any], node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/"), f"only local references are used: {ref}"
        target: Any = doc
        for part in ref[2:].split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        node = target
    return node


def operations(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(METHOD, path) -> operation object."""
    return {
        (method.upper(), path): op
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if method in HTTP_METHODS
    }


# -- a small checker for the schema subset the document uses -----------------------------


def schema_errors(doc: dict[str, Any], schema: Any, value: Any, where: str = "$") -> list[str]:
    """Why ``value`` does not match an OpenAPI 3.0 ``schema`` (empty: it
    does). Covers what docs/openapi.yaml uses: $ref, allOf, oneOf, anyOf,
    nullable, type, enum, required, properties, additionalProperties, items,
    minLength, maxLength, pattern, minimum, maximum, min/maxItems,
    min/maxProperties."""
    schema = resolve(doc, schema)
    if value is None and schema.get("nullable"):
        return []
    errors: list[str] = []
    for part in schema.get("allOf", ()):
        errors += schema_errors(doc, part, value, where)
    if "oneOf" in schema:
        matching = [part for part in schema["oneOf"] if not schema_errors(doc, part, value, where)]
        if len(matching) != 1:
            errors.append(f"{where}: {value!r:.60} matches {len(matching)} of oneOf, not exactly one")
    if "anyOf" in schema and all(schema_errors(doc, part, value, where) for part in schema["anyOf"]):
        errors.append(f"{where}: {value!r:.60} matches none of anyOf")
    kind = schema.get("type")
    checks = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
    }
    if kind is not None and not checks[kind](value):
        return errors + [f"{where}: expected {kind}, got {type(value).__name__} {value!r:.60}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r:.60} not one of {schema['enum']}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{where}: shorter than {schema['minLength']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{where}: longer than {schema['maxLength']}")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{where}: {value!r:.60} does not match {schema['pattern']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{where}: below {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{where}: above {schema['maximum']}")
    if isinstance(value, (dict, list)):
        least, most = ("minProperties", "maxProperties") if isinstance(value, dict) else ("minItems", "maxItems")
        if len(value) < schema.get(least, 0) or len(value) > schema.get(most, len(value)):
            errors.append(f"{where}: {len(value)} entries, not within {least}/{most}")
    if isinstance(value, dict):
        for name in schema.get("required", ()):
            if name not in value:
                errors.append(f"{where}: missing required {name!r}")
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            if name in properties:
                errors += schema_errors(doc, properties[name], item, f"{where}.{name}")
            elif extra is False:
                errors.append(f"{where}: unexpected property {name!r}")
            elif isinstance(extra, dict):
                errors += schema_errors(doc, extra, item, f"{where}.{name}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += schema_errors(doc, schema["items"], item, f"{where}[{i}]")
    return errors


def test_checker_is_not_vacuous(doc: dict[str, Any]) -> None:
    error = {"$ref": "#/components/schemas/Error"}
    assert schema_errors(doc, error, {"error": "x", "code": "conflict"}) == []
    assert schema_errors(doc, error, {"error": "x"})
    assert schema_errors(doc, error, {"error": 1, "code": "conflict"})
    assert schema_errors(doc, error, {"error": "x", "code": "nope"})
    assert schema_errors(doc, error, ["error"])
    status = {"$ref": "#/components/schemas/RotationStatus"}
    good = {"state": "idle", "active_key_id": "key-1", "master_keys": [], "remaining": {},
            "remaining_total": 0, "job": None, "lease": None}
    assert schema_errors(doc, status, good) == []
    assert schema_errors(doc, status, {**good, "remaining": {"key-0": "3"}})
    assert schema_errors(doc, status, {**good, "lease": {"holder": "h"}})
    batch = {"$ref": "#/components/schemas/DecryptDekBatchRequest"}
    assert schema_errors(doc, batch, {"batch": [{"encrypted_dek": "AAAA"}]}) == []
    assert schema_errors(doc, batch, {"batch": []})
    assert schema_errors(doc, batch, {"batch": [{"encrypted_dek": "AAAA"}], "context": {}})
    entry = {"$ref": "#/components/schemas/DecryptDekBatchResponse"}
    assert schema_errors(doc, entry, {"batch": [{"dek": "0" * 64}, {"error": "x", "code": "conflict", "status": 409}]}) == []
    assert schema_errors(doc, entry, {"batch": [{"error": "x"}]})
    context = {"$ref": "#/components/schemas/Context"}
    assert schema_errors(doc, context, {"a": "b"}) == []
    assert schema_errors(doc, context, {"a": 1})
    assert schema_errors(doc, context, {f"k{n}": "v" for n in range(33)})
    user = {"$ref": "#/components/schemas/UserId"}
    assert schema_errors(doc, user, "a" * MAX_USER_ID) == []
    for bad in ("", "a" * (MAX_USER_ID + 1), "a\x00b", "a\x7fb", "a\x85b", 5):
        assert schema_errors(doc, user, bad), bad


# -- the document itself -------------------------------------------------------------


def _walk(node: Any, path: str = "#") -> Iterator[tuple[str, Any]]:
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}/{i}")


def test_document_parses_and_references_resolve(doc: dict[str, Any]) -> None:
    assert str(doc["openapi"]).startswith("3."), doc.get("openapi")
    assert doc["info"]["title"] and doc["info"]["version"]
    assert doc["paths"]
    for where, node in _walk(doc):
        if isinstance(node, dict) and "$ref" in node:
            try:
                resolve(doc, node)
            except (KeyError, TypeError):
                pytest.fail(f"{where}: $ref {node['$ref']} does not resolve")
    for (method, path), op in operations(doc).items():
        assert op.get("operationId"), f"{method} {path} has no operationId"
        assert op.get("description"), f"{method} {path} has no description"
        for status in op["responses"]:
            # Quoted, as OpenAPI asks: YAML would read 200 as an integer.
            assert isinstance(status, str) and re.fullmatch(r"[1-5]\d\d", status), (method, path, status)
    ids = [op["operationId"] for op in operations(doc).values()]
    assert len(ids) == len(set(ids)), "duplicate operationId"


def test_document_is_valid_openapi(doc: dict[str, Any]) -> None:
    try:
        from openapi_spec_validator import validate
    except ImportError:
        pytest.skip("openapi-spec-validator is not installed: the document was not validated as OpenAPI")
    validate(doc)


def test_servers_and_security(doc: dict[str, Any]) -> None:
    urls = [s["url"] for s in doc["servers"]]
    assert "http://localhost" in urls, "the Unix-socket server"
    tcp = next(s for s in doc["servers"] if s["url"].startswith("http://127.0.0.1"))
    assert tcp["variables"]["port"]["default"] == "8000"
    scheme = doc["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"], scheme["bearerFormat"]) == ("http", "bearer", "JWT")


def _app_routes(tmp_path: Path) -> dict[tuple[str, str], Any]:
    settings = load_settings(
        overrides={"dev": True, "database_url": f"sqlite:///{tmp_path / 'kmsd.db'}", "socket": str(tmp_path / "s")},
        environ={},
    )
    app = create_app(settings)  # builds the app only: no store, vault or listener is started
    routes = {(r.method, r.resource.canonical): r.handler for r in app.router.routes() if r.resource is not None}
    # aiohttp adds HEAD beside every GET; a HEAD route of its own would count.
    return {k: h for k, h in routes.items() if not (k[0] == "HEAD" and ("GET", k[1]) in routes)}


def test_documented_routes_are_the_registered_routes(doc: dict[str, Any], tmp_path: Path) -> None:
    registered = set(_app_routes(tmp_path))
    documented = set(operations(doc))
    assert registered - documented == set(), "registered but not documented"
    assert documented - registered == set(), "documented but not registered"


def test_document_follows_the_code(doc: dict[str, Any], tmp_path: Path) -> None:
    schemas = doc["components"]["schemas"]
    assert set(schemas["ErrorCode"]["enum"]) == set(ERRORS_BY_CODE)
    assert schemas["UserId"]["maxLength"] == MAX_USER_ID
    # An integer user id is at most MAX_USER_ID characters as a string.
    number = schemas["UserIdOrNumber"]["oneOf"][1]
    assert len(str(number["minimum"])) == len(str(number["maximum"])) == MAX_USER_ID
    assert schemas["Dek"]["minLength"] == schemas["Dek"]["maxLength"] == DEK_HEX_LENGTH
    documented_statuses = {cls.status for cls in ERRORS_BY_CODE.values()}
    handlers = _app_routes(tmp_path)
    ops = operations(doc)
    for key, op in ops.items():
        statuses = set(op["responses"])
        source = inspect.getsource(handlers[key])
        # Any request may be refused (peer policy, Host) or hit a bug.
        assert {"403", "500"} <= statuses, key
        if "read_json(" in source:
            assert "requestBody" in op and {"400", "413", "415"} <= statuses, key
        if "require_admin(" in source:
            assert op.get("x-kmsd-admin-peer") is True, f"{key}: admin route not marked"
        else:
            assert "x-kmsd-admin-peer" not in op, key
        # A route that takes a token in some of its forms only documents it as optional.
        if "caller_claims(request, required=False)" in source:
            assert {} in op["security"] and {"bearerAuth": []} in op["security"] and "401" in statuses, key
        elif "caller_claims(request, required=True)" in source:
            assert op.get("security") == [{"bearerAuth": []}] and "401" in statuses, key
        for status in statuses - {"200"}:
            assert int(status) in documented_statuses, (key, status)


# -- the real daemon answers what the document says ---------------------------------------


class Checker:
    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.ops = operations(doc)
        self.seen: set[tuple[str, str, str]] = set()
        self.failures: list[str] = []

    def _fail(self, what: str) -> None:
        self.failures.append(what)

    async def call(
        self,
        api: API,
        method: str,
        template: str,
        body: Any = None,
        *,
        path: str | None = None,
        token: str | None = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        expect: int | None = None,
        valid_request: bool | None = None,
    ) -> tuple[int, Any]:
        """One request; records every way the answer strays from the
        document. ``valid_request``: whether the document's request schema
        must accept (True) or refuse (False) ``body``."""
        label = f"{api.transport} {method} {path or template} {json.dumps(body)[:80] if body is not None else ''}"
        status, answer = await api.call(method, path or template, body, token=token, raw=raw, headers=headers)
        if expect is not None and status != expect:
            self._fail(f"{label}: expected {expect}, got {status} {answer!r:.200}")
        op = self.ops.get((method, template))
        if op is None:
            self._fail(f"{label}: {method} {template} is not documented")
            return status, answer
        response = op["responses"].get(str(status))
        if response is None:
            self._fail(f"{label}: status {status} not documented (documented: {sorted(op['responses'])})")
            return status, answer
        self.seen.add((method, template, str(status)))
        self.check_body(label, resolve(self.doc, response), answer)
        if body is not None and valid_request is not None:
            schema = op["requestBody"]["content"]["application/json"]["schema"]
            errors = schema_errors(self.doc, schema, body)
            if valid_request and errors:
                self._fail(f"{label}: the document refuses a request the test calls valid: {errors}")
            if not valid_request and not errors:
                self._fail(f"{label}: the document accepts a request the test calls invalid")
        if status == 200 and body is not None and op.get("requestBody"):
            schema = op["requestBody"]["content"]["application/json"]["schema"]
            errors = schema_errors(self.doc, schema, body)
            if errors:
                self._fail(f"{label}: accepted by the server, refused by the document: {errors}")
        return status, answer

    def check_body(self, label: str, response: dict[str, Any], answer: Any) -> None:
        content = response.get("content", {})
        if isinstance(answer, bytes):
            if not set(content) - {"application/json"}:  # text/plain, application/yaml
                self._fail(f"{label}: a non-JSON body where the document has {sorted(content)}")
            return
        if "application/json" not in content:
            self._fail(f"{label}: a JSON body where the document has {sorted(content)}")
            return
        errors = schema_errors(self.doc, content["application/json"]["schema"], answer)
        if errors:
            self._fail(f"{label}: body does not match the document: {errors}")

    def check_component(self, label: str, name: str, answer: Any) -> None:
        self.check_body(label, resolve(self.doc, {"$ref": f"#/components/responses/{name}"}), answer)


B64 = base64.b64encode(b"hello, envelope").decode()
DEK = os.urandom(32).hex()


@pytest.mark.parametrize("admin_on_unix", [True, False], ids=["admin-peer", "plain-peer"])
async def test_live_daemon_answers_as_documented(doc: dict[str, Any], daemon_factory: Any, admin_on_unix: bool) -> None:
    # Whether this process is an admin peer is set here, not left to the
    # default (root only): each run checks both the admin routes' answers
    # and their refusals, whoever runs the suite.
    admin_uids = str(os.geteuid()) if admin_on_unix else ""
    d: Daemon = daemon_factory(extra_env={"KMSD_ADMIN_UIDS": admin_uids, "KMSD_ADMIN_GIDS": ""})

    def admin(code: int) -> int:
        return code if admin_on_unix else 403

    c = Checker(doc)
    unix_session, unix = open_api(d, "unix")
    tcp_session, tcp = open_api(d, "tcp")
    remember(DEK)
    async with unix_session, tcp_session:
        # -- records -----------------------------------------------------------------
        _, stored = await c.call(tcp, "POST", "/api/keys", {"user_id": "oa-alice", "data": "4111 1111"},
                                 expect=200, valid_request=True)
        alice = stored["access_token"]
        remember(alice, "4111 1111")
        await c.call(unix, "POST", "/api/keys", {"user_id": "oa-alice", "data": "again"}, expect=409, valid_request=True)
        await c.call(unix, "POST", "/api/keys", {"user_id": "oa-alice", "data": "4000 0002"}, token=alice,
                     expect=200, valid_request=True)
        remember("4000 0002")
        await c.call(tcp, "POST", "/api/keys", {"user_id": "oa-alice"}, expect=400, valid_request=False)
        await c.call(tcp, "POST", "/api/keys", {"user_id": "oa-alice", "data": ""}, expect=400, valid_request=False)
        await c.call(tcp, "POST", "/api/keys", {"user_id": "", "data": "x"}, expect=400, valid_request=False)
        await c.call(tcp, "POST", "/api/keys", {"user_id": "u" * 65, "data": "x"}, expect=400, valid_request=False)
        await c.call(tcp, "POST", "/api/keys", {"user_id": "a\tb", "data": "x"}, expect=400, valid_request=False)
        await c.call(tcp, "POST", "/api/keys", {"user_id": 7.5, "data": "x"}, expect=400, valid_request=False)
        await c.call(tcp, "POST", "/api/keys", {"user_id": 10**64, "data": "x"}, expect=400, valid_request=False)
        number = int.from_bytes(os.urandom(6), "big")
        await c.call(tcp, "POST", "/api/keys", {"user_id": number, "data": "x"}, expect=200, valid_request=True)
        await c.call(tcp, "POST", "/api/keys", {"user_id": "oa-bob", "data": ["x"]}, expect=400, valid_request=False)
        await c.call(tcp, "POST", "/api/keys", raw=b"[1, 2]", expect=400)
        await c.call(tcp, "POST", "/api/keys", raw=b"{not json", expect=400)
        await c.call(tcp, "POST", "/api/keys", {"user_id": "oa-carol", "data": "x"},
                     headers={"Authorization": "Basic abc"}, expect=401, valid_request=True)
        await c.call(tcp, "POST", "/api/keys", raw=b'{"user_id": "x", "data": "' + b"a" * (1 << 20) + b'"}',
                     expect=413)
        await c.call(tcp, "GET", "/api/keys", token=alice, expect=200)
        await c.call(unix, "GET", "/api/keys", expect=401)
        await c.call(tcp, "GET", "/api/keys", token="not.a.token", expect=401)
        _, dropped = await c.call(unix, "POST", "/api/keys", {"user_id": "oa-dave", "data": "gone"}, expect=200)
        remember(dropped["access_token"], "gone")
        await c.call(tcp, "DELETE", "/api/keys", token=dropped["access_token"], expect=200)
        # The record's tokens died with it; an admin's new one finds nothing.
        await c.call(tcp, "DELETE", "/api/keys", token=dropped["access_token"], expect=401)
        _, fresh = await c.call(unix, "POST", "/issue", {"id": "oa-dave"}, expect=admin(200))
        if admin_on_unix:
            remember(fresh["token"])
            await c.call(tcp, "DELETE", "/api/keys", token=fresh["token"], expect=404)
            await c.call(unix, "GET", "/api/keys", token=fresh["token"], expect=404)
        # Revocation: one token, a subject, refused forms.
        # (A session of its own: revoking a renewal of alice's would end hers.)
        _, spare = await c.call(tcp, "POST", "/api/keys", {"user_id": "oa-erin", "data": "x"}, expect=200)
        remember(spare["access_token"])
        await c.call(tcp, "POST", "/api/tokens/revoke", {}, token=spare["access_token"], expect=200,
                     valid_request=True)
        await c.call(tcp, "POST", "/api/tokens/revoke", {"token": spare["access_token"]}, expect=401,
                     valid_request=True)
        await c.call(tcp, "POST", "/api/tokens/revoke", {"user_id": "oa-nobody"}, token=alice, expect=403,
                     valid_request=True)
        await c.call(tcp, "POST", "/api/tokens/revoke", {"all": 3}, token=alice, expect=400, valid_request=False)
        await c.call(unix, "POST", "/api/tokens/revoke", {"user_id": "oa-dave"}, expect=admin(200), valid_request=True)
        await c.call(tcp, "DELETE", "/api/keys", expect=401)

        # -- tokens ------------------------------------------------------------------
        await c.call(tcp, "POST", "/issue", {"id": "oa-alice"}, token=alice, expect=200, valid_request=True)
        await c.call(tcp, "POST", "/issue", {"id": "oa-bob"}, token=alice, expect=403, valid_request=True)
        await c.call(tcp, "POST", "/issue", {"id": "oa-bob"}, expect=403, valid_request=True)
        await c.call(tcp, "POST", "/issue", {"id": "oa-alice"}, token="garbage", expect=401)
        await c.call(unix, "POST", "/issue", {"id": "oa-bob"}, expect=admin(200), valid_request=True)
        await c.call(unix, "POST", "/issue", {}, expect=400, valid_request=False)
        await c.call(unix, "POST", "/issue", {"id": "a\x07b"}, expect=400, valid_request=False)
        await c.call(unix, "POST", "/issue", {"id": "x" * 65}, expect=400, valid_request=False)
        await c.call(unix, "POST", "/issue", raw=b'"oa-bob"', expect=400)
        await c.call(unix, "POST", "/issue", raw=b'{"id": "' + b"a" * (1 << 20) + b'"}', expect=413)
        _, verified = await c.call(tcp, "POST", "/verify", {"token": alice}, expect=200, valid_request=True)
        assert verified["payload"]["id"] == verified["payload"]["sub"] == "oa-alice"
        _, invalid = await c.call(unix, "POST", "/verify", {"token": alice[:-4] + "AAAA"}, expect=401)
        assert invalid["valid"] is False
        _, missing = await c.call(tcp, "POST", "/verify", {}, expect=400, valid_request=False)
        assert missing["valid"] is False
        await c.call(tcp, "POST", "/verify", {"token": 5}, expect=400, valid_request=False)
        await c.call(tcp, "POST", "/verify", raw=b"null", expect=400)

        # -- envelope ----------------------------------------------------------------
        _, sealed = await c.call(tcp, "POST", "/api/encrypt", {"data": B64, "dek": DEK}, token=alice,
                                 expect=200, valid_request=True)
        await c.call(unix, "POST", "/api/encrypt", {"data": B64, "dek": DEK.upper(), "user_id": "oa-erin"},
                     expect=200, valid_request=True)
        _, unbound = await c.call(tcp, "POST", "/api/encrypt", {"data": B64, "dek": DEK}, expect=200,
                                  valid_request=True)
        await c.call(tcp, "POST", "/api/encrypt", {"data": B64, "dek": DEK[:-2]}, token=alice,
                     expect=400, valid_request=False)
        await c.call(tcp, "POST", "/api/encrypt", {"data": B64, "dek": "zz" * 32}, token=alice,
                     expect=400, valid_request=False)
        await c.call(tcp, "POST", "/api/encrypt", {"data": "aGVsbG8", "dek": DEK}, token=alice,
                     expect=400, valid_request=False)
        await c.call(tcp, "POST", "/api/encrypt", {"data": "", "dek": DEK}, token=alice,
                     expect=400, valid_request=False)
        await c.call(tcp, "POST", "/api/encrypt", {"data": B64, "dek": DEK, "user_id": "a\nb"},
                     expect=400, valid_request=False)
        await c.call(tcp, "POST", "/api/encrypt", {"data": B64, "dek": DEK, "user_id": "oa-x"}, token="garbage",
                     expect=401)
        _, opened = await c.call(tcp, "POST", "/api/decrypt-dek", {"encrypted_dek": sealed["encrypted_dek"]},
                                 token=alice, expect=200, valid_request=True)
        assert opened["dek"] == DEK
        _, generated = await c.call(unix, "POST", "/api/datakey", {}, token=alice, expect=200, valid_request=True)
        remember(generated["dek"])
        _, wrapped_only = await c.call(tcp, "POST", "/api/datakey", {"user_id": "oa-alice", "plaintext": False},
                                       expect=200, valid_request=True)
        assert set(wrapped_only) == {"encrypted_dek"}
        await c.call(tcp, "POST", "/api/datakey", {}, expect=400, valid_request=True)
        await c.call(tcp, "POST", "/api/datakey", {"plaintext": "yes"}, token=alice, expect=400, valid_request=False)
        await c.call(tcp, "POST", "/api/datakey", {"user_id": "oa-x"}, token="garbage", expect=401)
        if admin_on_unix:
            _, bob = await unix.call("POST", "/issue", {"id": "oa-bob"})
            remember(bob["token"])
            await c.call(unix, "POST", "/api/decrypt-dek", {"encrypted_dek": sealed["encrypted_dek"]},
                         token=bob["token"], expect=422)
        await c.call(tcp, "POST", "/api/decrypt-dek", {"encrypted_dek": "!!not base64"}, token=alice, expect=422)
        await c.call(tcp, "POST", "/api/decrypt-dek", {"encrypted_dek": sealed["encrypted_dek"]}, expect=401)
        await c.call(tcp, "POST", "/api/decrypt-dek", {}, token=alice, expect=400, valid_request=False)
        _, rewrapped = await c.call(tcp, "POST", "/api/rewrap", {"encrypted_dek": unbound["encrypted_dek"],
                                    "user_id": "oa-alice"}, token=alice, expect=200, valid_request=True)
        await c.call(tcp, "POST", "/api/rewrap", {"encrypted_dek": sealed["encrypted_dek"], "user_id": "oa-bob"},
                     token=alice, expect=403)
        await c.call(tcp, "POST", "/api/rewrap", {"encrypted_dek": "AAAA"}, token=alice, expect=422)
        await c.call(tcp, "POST", "/api/rewrap", {"encrypted_dek": "AAAA"}, expect=401)
        await c.call(tcp, "POST", "/api/rewrap", {"encrypted_dek": 5}, token=alice, expect=400, valid_request=False)
        _, opened = await c.call(tcp, "POST", "/api/decrypt-dek", rewrapped, token=alice, expect=200)
        assert opened["dek"] == DEK

        # -- operations ----------------------------------------------------------------
        for api in (unix, tcp):
            await c.call(api, "GET", "/healthz", expect=200)
            await c.call(api, "GET", "/readyz", expect=200)
            status, text = await c.call(api, "GET", "/metrics", expect=200)
            assert isinstance(text, bytes) and b"kmsd_http_requests" in text
            _, served = await c.call(api, "GET", "/openapi.yaml", expect=200)
            assert served == DOCUMENT.read_bytes()
            _, keys = await c.call(api, "GET", "/.well-known/jwks.json", expect=200)
            assert keys["keys"]
        for template in ("/healthz", "/readyz", "/metrics", "/openapi.yaml", "/.well-known/jwks.json", "/api/keys",
                         "/issue"):
            method = "GET" if ("GET", template) in c.ops else "POST"
            await c.call(tcp, method, template, {"id": "x"} if method == "POST" else None,
                         headers={"Host": "evil.example"}, expect=403)

        # -- master keys: never for a TCP caller (allow_admin_over_tcp is off) ------------
        for method, template in [("GET", "/api/rotate-mk"), ("POST", "/api/rotate-mk"), ("GET", "/api/master-keys"),
                                 ("POST", "/api/master-keys")]:
            await c.call(tcp, method, template, expect=403)
        await c.call(tcp, "DELETE", "/api/master-keys/{key_id}", path="/api/master-keys/key-1?now=true", expect=403)
        for action in ("schedule-deletion", "cancel-deletion"):
            await c.call(tcp, "POST", f"/api/master-keys/{{key_id}}/{action}", path=f"/api/master-keys/key-1/{action}",
                         expect=403)

        destroy = "/api/master-keys/{key_id}"
        _, listed = await c.call(unix, "GET", "/api/master-keys", expect=admin(200))
        await c.call(unix, "POST", "/api/master-keys", {"description": 5}, expect=admin(400), valid_request=False)
        await c.call(unix, "POST", "/api/master-keys", {"description": "d" * 256}, expect=admin(400),
                     valid_request=False)
        await c.call(unix, "POST", "/api/master-keys", raw=b"[]", expect=admin(400))
        await c.call(unix, "POST", "/api/master-keys", expect=admin(200))  # no body at all
        _, added = await c.call(unix, "POST", "/api/master-keys", {"description": "openapi test"}, expect=admin(200),
                                valid_request=True)
        schedule = "/api/master-keys/{key_id}/schedule-deletion"
        cancel = "/api/master-keys/{key_id}/cancel-deletion"
        if admin_on_unix:
            first = listed["master_keys"][0]["key_id"]
            spare = added["previous_key_id"]  # retired just now, wraps nothing
            active_id = added["active_key_id"]
            # Scheduled deletion: listed as pending, cancelled; refusals.
            _, pending = await c.call(unix, "POST", schedule, {"days": 7}, path=f"/api/master-keys/{spare}/"
                                      "schedule-deletion", expect=200, valid_request=True)
            assert pending["status"] == "pending_deletion"
            await c.call(unix, "POST", schedule, {"days": 7}, path=f"/api/master-keys/{spare}/schedule-deletion",
                         expect=409)
            _, keys = await c.call(unix, "GET", "/api/master-keys", expect=200)
            assert {k["key_id"]: k["status"] for k in keys["master_keys"]}[spare] == "pending_deletion"
            await c.call(unix, "POST", cancel, path=f"/api/master-keys/{spare}/cancel-deletion", expect=200)
            await c.call(unix, "POST", cancel, path=f"/api/master-keys/{spare}/cancel-deletion", expect=409)
            await c.call(unix, "POST", schedule, path=f"/api/master-keys/{active_id}/schedule-deletion", expect=409)
            await c.call(unix, "POST", cancel, path="/api/master-keys/key-0/cancel-deletion", expect=404)
            await c.call(unix, "POST", schedule, path="/api/master-keys/key-0/schedule-deletion", expect=404)
            await c.call(unix, "DELETE", destroy, path=f"/api/master-keys/{spare}", expect=400)
            await c.call(unix, "DELETE", destroy, path=f"/api/master-keys/{spare}?now=true", expect=200)
            await c.call(unix, "DELETE", destroy, path=f"/api/master-keys/{spare}?now=true", expect=404)
            _, active = await c.call(unix, "DELETE", destroy, path=f"/api/master-keys/{active_id}?now=true",
                                     expect=409)
            assert "records" in active
            _, used = await c.call(unix, "DELETE", destroy, path=f"/api/master-keys/{first}?now=true", expect=409)
            assert used["records"] >= 1
        for days in (6, 31, "x"):
            await c.call(unix, "POST", schedule, {"days": days}, path="/api/master-keys/key-0/schedule-deletion",
                         expect=admin(400), valid_request=False)
        await c.call(unix, "DELETE", destroy, path="/api/master-keys/" + "k" * 65 + "?now=true", expect=admin(400))
        await c.call(unix, "DELETE", destroy, path="/api/master-keys/%09tab?now=true", expect=admin(400))
        await c.call(unix, "POST", cancel, path="/api/master-keys/%09tab/cancel-deletion", expect=admin(400))
        await c.call(unix, "GET", "/api/rotate-mk", expect=admin(200))
        await c.call(unix, "POST", "/api/rotate-mk", expect=admin(200))
        # The rewrap stays open for twice key_refresh_interval plus a second at least.
        await c.call(unix, "POST", "/api/rotate-mk", expect=admin(409))
        await c.call(unix, "POST", "/api/master-keys", {}, expect=admin(409), valid_request=True)
        await c.call(unix, "GET", "/api/rotate-mk", expect=admin(200))
        await c.call(unix, "GET", "/api/master-keys", expect=admin(200))
        await c.call(tcp, "GET", "/api/keys", token=alice, expect=200)

        # -- what no path documents: other methods, other paths --------------------------
        for template in doc["paths"]:
            concrete = template.replace("{key_id}", "key-1")
            for method in ("PUT", "PATCH"):
                status, answer = await tcp.call(method, concrete)
                if status != 405:
                    c._fail(f"{method} {concrete}: expected 405, got {status}")
                c.check_component(f"{method} {concrete}", "MethodNotAllowed", answer)
                assert answer.get("code") == "method_not_allowed"
        status, answer = await unix.call("GET", "/no/such/route")
        assert status == 404
        c.check_component("GET /no/such/route", "NotFound", answer)

    assert not c.failures, "\n".join(c.failures)
    # Every operation was exercised, with its success status.
    for method, template in c.ops:
        assert (method, template, "200") in c.seen or not admin_on_unix, f"{method} {template}: no 200 seen"
    if not admin_on_unix:
        # TCP never gets past an admin route: a 200 there came from the plain peer.
        admitted = [key for key, op in c.ops.items() if op.get("x-kmsd-admin-peer") and (*key, "200") in c.seen]
        assert not admitted, f"admin routes answered a plain Unix peer with 200: {admitted}"


async def test_dek_with_whitespace_is_a_400(doc: dict[str, Any], shared_daemon: Daemon) -> None:
    dek = "ab" * 31 + "  "
    assert schema_errors(doc, {"$ref": "#/components/schemas/Dek"}, dek), "the document refuses it"
    session, tcp = open_api(shared_daemon, "tcp")
    async with session:
        status, _ = await tcp.call("POST", "/api/encrypt", {"data": B64, "dek": dek, "user_id": "oa-frank"})
    assert status == 400


async def test_head_of_a_key_operation_is_audited_and_405_says_what_is_allowed(
    daemon_factory: Any, workdir: Any
) -> None:
    import os

    trail = workdir / f"audit-head-{os.urandom(3).hex()}.jsonl"
    d = daemon_factory(extra_env={"KMSD_AUDIT_LOG": str(trail)})
    session, tcp = open_api(d, "tcp")
    async with session:
        token = await tcp.store("oa-head", "head is a read too")
        async with tcp.session.head(tcp.base + "/api/keys", headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 200
        async with tcp.session.put(tcp.base + "/api/keys") as r:
            assert r.status == 405 and "GET" in r.headers.get("Allow", "")
        async with tcp.session.get(tcp.base + "/api/keys") as r:
            assert r.status == 401 and r.headers.get("WWW-Authenticate") == "Bearer"
    fetches = [line for line in trail.read_text().splitlines() if '"operation":"fetch"' in line]
    # The HEAD (the only authenticated fetch), and the refused GET.
    assert sum('"subject":"oa-head"' in line and '"status":200' in line for line in fetches) == 1
    assert sum('"status":401' in line for line in fetches) == 1


def test_the_document_ships_in_the_wheel(tmp_path: Path) -> None:
    """GET /openapi.yaml reads it from the installed package."""
    root = DOCUMENT.resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(root)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("kmsd-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read("kmsd/openapi.yaml") == DOCUMENT.read_bytes()
        # The repository's own tools stay out of what an install puts on sys.path.
        tops = {name.split("/")[0] for name in zf.namelist()}
        assert not tops & {"devtools", "tests", "bench"}, sorted(tops)
