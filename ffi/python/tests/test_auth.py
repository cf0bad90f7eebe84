"""A node authenticates one way: a cluster key or mutual TLS, never both. The C ABI maps its
four file fields onto one choice and refuses both at once, for a server and for a push, before
anything listens or connects."""

import os
import shutil
import tempfile
import unittest
from pathlib import Path

import shardcast
from pki import make_test_ca


@unittest.skipUnless(shutil.which("openssl"), "no openssl to make a test CA")
class OneWayToAuthenticate(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory(prefix="shardcast-py-auth-")
        self.tmp = Path(self._tmp.name)
        self.key = self.tmp / "cluster.key"
        self.key.write_bytes(b"k" * 40)
        os.chmod(self.key, 0o600)
        self.tls = make_test_ca(self.tmp / "pki")
        self.src = self.tmp / "src"
        self.src.mkdir()
        (self.src / "a.bin").write_bytes(os.urandom(10_000))

    def tearDown(self):
        self._tmp.cleanup()

    def assert_two_ways(self, cm):
        self.assertEqual(cm.exception.kind, "invalid_argument")
        self.assertIn("two ways to authenticate", str(cm.exception))

    def test_serve_with_a_key_and_tls_is_refused(self):
        with self.assertRaises(shardcast.ShardcastError) as cm:
            shardcast.serve("127.0.0.1:0", root=self.tmp / "r", key_file=self.key, tls=self.tls)
        self.assert_two_ways(cm)
        self.assertFalse((self.tmp / "r").exists())

    def test_push_with_a_key_and_tls_is_refused(self):
        with shardcast.serve("127.0.0.1:0", root=self.tmp / "r", tls=self.tls) as srv:
            with self.assertRaises(shardcast.ShardcastError) as cm:
                shardcast.push(self.src, to=[srv.addr], name="x", version=1, key_file=self.key, tls=self.tls)
            self.assert_two_ways(cm)
            # Each way alone is accepted by the C ABI (TLS here, the server's way).
            self.assertTrue(shardcast.push(self.src, to=[srv.addr], name="x", version=1, tls=self.tls).ok)
        self.assertTrue((self.tmp / "r" / "x" / "1").is_dir())


if __name__ == "__main__":
    unittest.main()
