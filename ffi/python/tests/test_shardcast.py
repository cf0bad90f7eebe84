"""Tests of the installed Python package against real shardcast servers (in-process and a
`shardcast serve` process). Run by scripts/test.sh after `pip install ./ffi/python` into a venv."""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import unittest
from pathlib import Path

import shardcast
from pki import make_test_ca

BIN = os.environ.get("SHARDCAST_BIN")


def write_tree(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "weights.bin").write_bytes(os.urandom(3 * (1 << 20) + 5))
    (root / "sub" / "opt.bin").write_bytes(os.urandom(4096))


def same_tree(a: Path, b: Path) -> bool:
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return fa == fb and all((a / f).read_bytes() == (b / f).read_bytes() for f in fa)


def start_serves(roots):
    """A `shardcast serve` process (SHARDCAST_BIN) on loopback for each root: (processes, addresses).
    Their logs are drained so that they never block on a full pipe."""
    procs, addrs = [], []
    for root in roots:
        p = subprocess.Popen(
            [BIN, "serve", "--listen", "127.0.0.1:0", "--root", str(root)],
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "NO_COLOR": "1"},
        )
        procs.append(p)
        line = p.stderr.readline()
        while line and "listening on" not in line:  # serve may log other lines first
            line = p.stderr.readline()
        addrs.append(line.split("listening on ")[1].split()[0])
        threading.Thread(target=lambda p=p: [None for _ in p.stderr], daemon=True).start()
    return procs, addrs


def stop_serves(procs):
    for p in procs:
        p.send_signal(signal.SIGCONT)
        p.kill()
        p.wait()


class PushTests(unittest.TestCase):
    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp())
        self.src = self.tmp / "src"
        write_tree(self.src)

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def test_push_to_in_process_server(self):
        with shardcast.serve("127.0.0.1:0", root=self.tmp / "r0") as srv:
            report = shardcast.push(self.src, to=[srv.addr], name="ckpt", version=1)
            self.assertTrue(report.ok)
            self.assertEqual([r.node for r in report.replicas], [srv.addr])
        self.assertTrue(same_tree(self.src, self.tmp / "r0" / "ckpt" / "1"))

    def test_push_through_a_serve_process_chain(self):
        if not BIN:
            self.skipTest("SHARDCAST_BIN not set")
        procs, addrs = start_serves([self.tmp / f"p{i}" for i in range(2)])
        try:
            h = shardcast.push_async(self.src, to=addrs, name="ckpt", version=7, chunk_size=1 << 20)
            seen = []
            while h.wait(timeout=0.05) is None:
                seen.append(h.progress())
            report = h.wait()
            self.assertTrue(report.ok)
            self.assertEqual(h.progress().state, "done")
            self.assertEqual(h.progress().acked_bytes, h.progress().total_bytes)
            h.close()
            for i in range(2):
                self.assertTrue(same_tree(self.src, self.tmp / f"p{i}" / "ckpt" / "7"))
        finally:
            stop_serves(procs)

    def test_a_replica_killed_mid_push_is_repaired_around_and_the_report_counts_it(self):
        if not BIN:
            self.skipTest("SHARDCAST_BIN not set")
        (self.src / "big.bin").write_bytes(os.urandom(128 << 20))
        procs, addrs = start_serves([self.tmp / f"k{i}" for i in range(3)])
        try:
            h = shardcast.push_async(self.src, to=addrs, name="ckpt", version=1, chunk_size=1 << 20)
            while h.progress().sent_chunks == 0 and h.wait(timeout=0.005) is None:
                pass
            # The tail stops taking anything, so the push cannot end; the middle replica dies;
            # the tail goes on, and the primary repairs the chain to it.
            procs[2].send_signal(signal.SIGSTOP)
            time.sleep(0.3)
            procs[1].kill()
            procs[2].send_signal(signal.SIGCONT)
            with self.assertRaises(shardcast.PartialPush) as caught:
                h.wait()
            h.close()
            report = caught.exception.report
            self.assertEqual([r.published for r in report.replicas], [True, False, True], report)
            self.assertEqual(report.replicas[1].kind, "connection_lost", report)
            self.assertGreaterEqual(report.repairs, 1, report)
            for i in (0, 2):
                self.assertTrue(same_tree(self.src, self.tmp / f"k{i}" / "ckpt" / "1"))
        finally:
            stop_serves(procs)

    def test_push_over_two_lanes(self):
        # 16 MiB in 64 KiB chunks: 257 chunks, enough that both lanes of each hop carry some.
        (self.src / "big.bin").write_bytes(os.urandom(16 << 20))
        with shardcast.serve("127.0.0.1:0", root=self.tmp / "l0") as a, shardcast.serve(
            "127.0.0.1:0", root=self.tmp / "l1"
        ) as b:
            report = shardcast.push(self.src, to=[a.addr, b.addr], name="ckpt", version=1, chunk_size=1 << 16, lanes=2)
            self.assertTrue(report.ok)
            self.assertEqual(len(report.lane_chunks), 2, report.lane_chunks)
            # No RDMA device has a GID of 127.0.0.1: both lanes ran TCP, and the report says so.
            self.assertEqual(report.lane_transports, ["tcp", "tcp"], report)
            self.assertEqual(report.repairs, 0, report)
            self.assertTrue(all(n > 0 for n in report.lane_chunks), report.lane_chunks)
            one = shardcast.push(self.src, to=[a.addr, b.addr], name="ckpt", version=2, chunk_size=1 << 16)
            self.assertEqual(len(one.lane_chunks), 1, one.lane_chunks)
            self.assertEqual(sum(report.lane_chunks), one.lane_chunks[0])
            with self.assertRaises(ValueError):
                shardcast.push(self.src, to=[a.addr], name="ckpt", version=3, lanes=17)
        for r in ("l0", "l1"):
            self.assertTrue(same_tree(self.src, self.tmp / r / "ckpt" / "1"))

    def test_push_over_rails(self):
        # The whole of 127/8 is this host's: two rails per node, lanes bound to them.
        (self.src / "big.bin").write_bytes(os.urandom(8 << 20))
        with shardcast.serve("127.0.0.1:0", root=self.tmp / "rr", rails=["127.0.0.2", "127.0.0.3"]) as srv:
            report = shardcast.push(
                self.src, to=[srv.addr], name="ckpt", version=1, chunk_size=1 << 16, lanes=2, rails=["127.0.0.4", "127.0.0.5"]
            )
            self.assertTrue(report.ok)
            self.assertTrue(all(n > 0 for n in report.lane_chunks), report.lane_chunks)
            # A rail that is not this host's is refused before anything moves, on either side.
            with self.assertRaises(shardcast.ShardcastError) as cm:
                shardcast.push(self.src, to=[srv.addr], name="ckpt", version=2, lanes=2, rails=["192.0.2.1"])
            self.assertIn("192.0.2.1: not an address of this host", str(cm.exception))
            self.assertEqual(cm.exception.kind, "invalid_argument", cm.exception)
            self.assertFalse((self.tmp / "rr" / "ckpt" / "2").exists())
        with self.assertRaises(shardcast.ShardcastError) as cm:
            shardcast.serve("127.0.0.1:0", root=self.tmp / "bad", rails=["192.0.2.1"])
        self.assertEqual(cm.exception.kind, "invalid_argument", cm.exception)
        self.assertIn("192.0.2.1", str(cm.exception))
        self.assertTrue(same_tree(self.src, self.tmp / "rr" / "ckpt" / "1"))

    def test_errors_carry_node_and_kind(self):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        dead = "127.0.0.1:%d" % s.getsockname()[1]
        s.close()
        with self.assertRaises(shardcast.ShardcastError) as cm:
            shardcast.push(self.src, to=[dead], name="ckpt", version=1)
        self.assertEqual(cm.exception.kind, "unreachable")
        self.assertEqual(cm.exception.node, dead)
        with shardcast.serve("127.0.0.1:0", root=self.tmp / "r1") as srv:
            shardcast.push(self.src, to=[srv.addr], name="ckpt", version=3)
            # Pushes are idempotent: the same bytes again are "already held", not an error...
            shardcast.push(self.src, to=[srv.addr], name="ckpt", version=3)
            # ...but other bytes under a published version are refused.
            with self.assertRaises(shardcast.ShardcastError) as cm:
                shardcast.push({"other.bin": b"not the same bytes"}, to=[srv.addr], name="ckpt", version=3)
            self.assertEqual(cm.exception.kind, "version_exists")

    def test_push_from_memory_buffers(self):
        import array

        weights = os.urandom(5 * (1 << 20) + 3)
        state = bytearray(os.urandom(70_000))
        words = array.array("I", range(50_000))
        backing = os.urandom(1 << 20)
        bufs = {
            "model/weights.bin": weights,
            "model/optim/state.bin": state,
            "words.u32": words,
            "slice.bin": memoryview(backing)[1000:300_000],
            "empty.bin": b"",
        }
        try:
            import numpy as np

            arr = np.arange(300_000, dtype=np.float32).reshape(600, 500)
            bufs["tensor.f32"] = arr
        except ImportError:
            arr = None
        with shardcast.serve("127.0.0.1:0", root=self.tmp / "rb") as srv:
            h = shardcast.push_async(bufs, to=[srv.addr], name="mem", version=7, chunk_size=1 << 20)
            # The bytearray is exported while the push reads it: it cannot be resized under it.
            with self.assertRaises(BufferError):
                state.extend(b"more")
            report = h.wait(timeout=60)
            self.assertIsNotNone(report)
            self.assertTrue(report.ok)
            h.close()
        state.extend(b"more")  # released once the push is closed
        out = self.tmp / "rb" / "mem" / "7"
        self.assertEqual((out / "model" / "weights.bin").read_bytes(), weights)
        self.assertEqual((out / "model" / "optim" / "state.bin").read_bytes(), bytes(state[:-4]))
        self.assertEqual((out / "words.u32").read_bytes(), words.tobytes())
        self.assertEqual((out / "slice.bin").read_bytes(), backing[1000:300_000])
        self.assertEqual((out / "empty.bin").read_bytes(), b"")
        if arr is not None:
            self.assertEqual((out / "tensor.f32").read_bytes(), arr.tobytes())

    def test_incremental_push_from_memory(self):
        data = bytearray(os.urandom((3 << 20) + 11))
        with shardcast.serve("127.0.0.1:0", root=self.tmp / "ri") as srv:
            shardcast.push({"w.bin": bytes(data)}, to=[srv.addr], name="inc", version=1, chunk_size=1 << 20)
            data[(2 << 20) + 5] ^= 0xFF
            report = shardcast.push(
                {"w.bin": data}, to=[srv.addr], name="inc", version=2, chunk_size=1 << 20, incremental=True
            )
            self.assertTrue(report.ok)
        self.assertEqual((self.tmp / "ri" / "inc" / "2" / "w.bin").read_bytes(), bytes(data))

    def test_delta_push_against_the_previous_version(self):
        with shardcast.serve("127.0.0.1:0", root=self.tmp / "r0") as srv:
            self.assertTrue(shardcast.push(self.src, to=[srv.addr], name="ckpt", version=1).ok)
            v2 = self.tmp / "v2"
            shutil.copytree(self.src, v2)
            w = bytearray((v2 / "weights.bin").read_bytes())
            for i in range(0, len(w), 100_000):
                w[i] ^= 1
            (v2 / "weights.bin").write_bytes(bytes(w))
            report = shardcast.push(v2, to=[srv.addr], name="ckpt", version=2, delta_base=self.src)
            self.assertTrue(report.ok)
            # The base reaches the push: one that does not exist fails it.
            with self.assertRaises(shardcast.ShardcastError):
                shardcast.push(self.src, to=[srv.addr], name="ckpt", version=3, delta_base=self.tmp / "none")
        self.assertTrue(same_tree(v2, self.tmp / "r0" / "ckpt" / "2"))

    def test_async_push_returns_after_the_first_replica(self):
        big = self.tmp / "big"
        big.mkdir()
        (big / "w.bin").write_bytes(os.urandom(64 << 20))
        with shardcast.serve("127.0.0.1:0", root=self.tmp / "a0") as s0, shardcast.serve(
            "127.0.0.1:0", root=self.tmp / "a1"
        ) as s1:
            report = shardcast.push(big, to=[s0.addr, s1.addr], name="as", version=1, mode="async", timeout=60)
            self.assertTrue(report.ok)
            self.assertTrue(report.replicas[0].published)
            self.assertTrue(report.replicas[1].published or report.replicas[1].behind)
            self.assertEqual((self.tmp / "a0" / "as" / "1" / "w.bin").read_bytes(), (big / "w.bin").read_bytes())
            deadline = time.monotonic() + 60
            while not (self.tmp / "a1" / "as" / "1.manifest").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        self.assertTrue(same_tree(big, self.tmp / "a1" / "as" / "1"))

    def test_cluster_key(self):
        good, bad = self.tmp / "good.key", self.tmp / "bad.key"
        good.write_bytes(b"k" * 40)
        bad.write_bytes(b"x" * 40)
        os.chmod(good, 0o600)
        os.chmod(bad, 0o600)
        with shardcast.serve("127.0.0.1:0", root=self.tmp / "k0", key_file=good) as srv:
            with self.assertRaises(shardcast.ShardcastError) as cm:
                shardcast.push(self.src, to=[srv.addr], name="k", version=1, key_file=bad)
            self.assertEqual(cm.exception.kind, "unauthorized")
            with self.assertRaises(shardcast.ShardcastError) as cm:
                shardcast.push(self.src, to=[srv.addr], name="k", version=1)
            self.assertEqual(cm.exception.kind, "unauthorized")
            self.assertTrue(shardcast.push(self.src, to=[srv.addr], name="k", version=1, key_file=good).ok)
        self.assertTrue(same_tree(self.src, self.tmp / "k0" / "k" / "1"))

    def test_encrypted_push(self):
        key = self.tmp / "enc.key"
        key.write_bytes(b"e" * 40)
        os.chmod(key, 0o600)
        with shardcast.serve("127.0.0.1:0", root=self.tmp / "e0", key_file=key, require_encrypt=True) as srv:
            with self.assertRaises(shardcast.ShardcastError) as cm:
                shardcast.push(self.src, to=[srv.addr], name="e", version=1, key_file=key)
            self.assertEqual(cm.exception.kind, "unauthorized")
            self.assertIn("only encrypted", str(cm.exception))
            with self.assertRaises(shardcast.ShardcastError):
                shardcast.push(self.src, to=[srv.addr], name="e", version=1, encrypt=True)  # no key
            report = shardcast.push(self.src, to=[srv.addr], name="e", version=1, key_file=key, encrypt=True)
            self.assertTrue(report.ok)
        self.assertTrue(same_tree(self.src, self.tmp / "e0" / "e" / "1"))

    @unittest.skipUnless(shutil.which("openssl"), "no openssl to make a test CA")
    def test_mutual_tls(self):
        tls = make_test_ca(self.tmp / "pki")
        with shardcast.serve("127.0.0.1:0", root=self.tmp / "t0", tls=tls) as srv:
            with self.assertRaises(shardcast.ShardcastError) as cm:
                shardcast.push(self.src, to=[srv.addr], name="t", version=1)
            self.assertEqual(cm.exception.kind, "unauthorized")
            self.assertTrue(shardcast.push(self.src, to=[srv.addr], name="t", version=1, tls=tls, encrypt=True).ok)
        self.assertTrue(same_tree(self.src, self.tmp / "t0" / "t" / "1"))

    def test_stage_gives_each_node_its_files(self):
        with shardcast.serve("127.0.0.1:0", root=self.tmp / "s0") as s0, shardcast.serve(
            "127.0.0.1:0", root=self.tmp / "s1"
        ) as s1:
            plan = {
                "name": "shards",
                "version": 4,
                "source": self.src,
                "chunk_size": "1MiB",
                "node": [
                    {"addr": s0.addr, "files": ["weights.bin"]},
                    {"addr": s1.addr, "files": ["sub/opt.bin", "weights.bin"]},
                ],
            }
            report = shardcast.stage(plan, timeout=60)
            self.assertTrue(report.ok)
            self.assertEqual([r.node for r in report.replicas], [s0.addr, s1.addr])
            with self.assertRaises(shardcast.ShardcastError) as cm:
                shardcast.stage({**plan, "version": 5, "node": [{"addr": s0.addr, "files": ["nope.bin"]}]})
            self.assertIn("nope.bin", str(cm.exception))
        n0, n1 = self.tmp / "s0" / "shards" / "4", self.tmp / "s1" / "shards" / "4"
        self.assertEqual(sorted(p.name for p in n0.rglob("*") if p.is_file()), ["weights.bin"])
        self.assertEqual((n0 / "weights.bin").read_bytes(), (self.src / "weights.bin").read_bytes())
        self.assertTrue(same_tree(self.src, n1))

    def test_bad_buffers_are_refused_before_anything_moves(self):
        with shardcast.serve("127.0.0.1:0", root=self.tmp / "rx") as srv:
            strided = memoryview(bytes(100))[::2]
            with self.assertRaises(TypeError):
                shardcast.push({"x": strided}, to=[srv.addr], name="bad", version=1)
            with self.assertRaises(TypeError):
                shardcast.push({"x": "not bytes"}, to=[srv.addr], name="bad", version=1)
            with self.assertRaises(shardcast.ShardcastError) as cm:
                shardcast.push({"../escape": b"x"}, to=[srv.addr], name="bad", version=1)
            self.assertEqual(cm.exception.kind, "bad_manifest")
            with self.assertRaises(shardcast.ShardcastError):
                shardcast.push({}, to=[srv.addr], name="bad", version=1)
        self.assertFalse((self.tmp / "rx" / "bad").exists())
        self.assertFalse((self.tmp / "escape").exists())

    def test_cancel_publishes_nothing_and_wait_releases_the_gil(self):
        big = self.tmp / "big"
        big.mkdir()
        with open(big / "big.bin", "wb") as f:
            f.write(os.urandom(256 << 20))
        ticks = []
        stop = threading.Event()

        def ticker():
            while not stop.is_set():
                ticks.append(time.monotonic())
                time.sleep(0.01)

        t = threading.Thread(target=ticker)
        t.start()
        with shardcast.serve("127.0.0.1:0", root=self.tmp / "r2") as srv:
            h = shardcast.push_async(big, to=[srv.addr], name="big", version=1)
            while h.progress().sent_chunks == 0:
                time.sleep(0.005)
            # While this thread waits inside the C call, the ticker thread keeps running: the
            # GIL is released.
            n0, t0 = len(ticks), time.monotonic()
            h.wait(timeout=0.1)
            waited, ticked = time.monotonic() - t0, len(ticks) - n0
            h.cancel()
            with self.assertRaises(shardcast.PushCancelled):
                h.wait()
            h.close()
        stop.set()
        t.join()
        self.assertFalse((self.tmp / "r2" / "big" / "1").exists())
        self.assertGreaterEqual(ticked, int(waited / 0.01 * 0.3), f"{ticked} ticks in {waited:.3f} s of wait")


if __name__ == "__main__":
    unittest.main()
