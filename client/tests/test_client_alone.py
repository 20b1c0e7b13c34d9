"""The client's own tests: standard library only (unittest), so that they run
in a virtual environment holding nothing but kmsd-client, against a real
daemon named by ``KMSD_TEST_SOCKET`` (its Unix socket) and ``KMSD_TEST_URL``
(its TCP listener). The daemon's suite starts one and runs these in such an
environment (tests/test_client_distribution.py)."""

from __future__ import annotations

import importlib.util
import os
import unittest
import uuid

import kmsd_client
from kmsd_client import Conflict, DecryptionFailed, Forbidden, KMSClient, Unauthorized, Unavailable
from kmsd_client.errors import ERRORS_BY_CODE, error_for_code


def _clients() -> list[tuple[str, KMSClient]]:
    found = []
    if os.environ.get("KMSD_TEST_SOCKET"):
        found.append(("unix", KMSClient(os.environ["KMSD_TEST_SOCKET"])))
    if os.environ.get("KMSD_TEST_URL"):
        found.append(("tcp", KMSClient(url=os.environ["KMSD_TEST_URL"])))
    return found


@unittest.skipUnless(_clients(), "no daemon: set KMSD_TEST_SOCKET and/or KMSD_TEST_URL")
class AgainstTheDaemon(unittest.TestCase):
    def test_round_trip(self) -> None:
        for name, kms in _clients():
            with self.subTest(listener=name), kms:
                user = "alone-" + uuid.uuid4().hex[:10]
                token = kms.store(user, "kept-alone")
                self.assertEqual(kms.fetch(token), "kept-alone")
                self.assertEqual(kms.verify(token)["sub"], user)
                with self.assertRaises(Conflict):
                    kms.store(user, "again")
                dek = os.urandom(32)
                _, encrypted_dek = kms.encrypt(b"payload", dek, token=token)
                self.assertEqual(kms.decrypt_dek(encrypted_dek, token=token), dek)
                other = kms.store(user + "-x", "other-alone")
                with self.assertRaises(DecryptionFailed):
                    kms.decrypt_dek(encrypted_dek, token=other)
                new_dek, wrapped = kms.datakey(token=token)
                self.assertEqual(kms.decrypt_dek(wrapped, token=token), new_dek)
                with self.assertRaises(DecryptionFailed):
                    kms.decrypt_dek(wrapped, token=other)
                kms.delete(token)
                with self.assertRaises(Unauthorized):
                    kms.fetch(token)
                kms.delete(other)
                self.assertEqual(kms.health(), {"status": "ok"})

    def test_admin_routes_refused_over_tcp(self) -> None:
        if not os.environ.get("KMSD_TEST_URL"):
            self.skipTest("no TCP listener")
        with KMSClient(url=os.environ["KMSD_TEST_URL"]) as kms, self.assertRaises(Forbidden):
            kms.rotate()


class WithoutADaemon(unittest.TestCase):
    def test_missing_socket_is_unavailable(self) -> None:
        with self.assertRaises(Unavailable):
            KMSClient("/nonexistent/kmsd.sock").health()

    def test_errors_round_trip_their_codes(self) -> None:
        for code, cls in ERRORS_BY_CODE.items():
            self.assertIs(error_for_code(code, 599), cls)
            self.assertIs(getattr(kmsd_client, cls.__name__, cls), cls)

    def test_nothing_but_the_client(self) -> None:
        # Where the environment is the client's own (the distribution test
        # sets this), neither the daemon nor its dependencies are there.
        if not os.environ.get("KMSD_TEST_BARE"):
            self.skipTest("not a bare environment")
        for name in ("kmsd", "aiohttp", "cryptography", "jwt"):
            self.assertIsNone(importlib.util.find_spec(name), name)


if __name__ == "__main__":
    unittest.main()
