"""Runs examples/torchrun_train.py under torchrun (CPU, gloo, 2 ranks) against two real
`shardcast serve` processes, then loads the mirrored checkpoints on the replica side with
torch.load and compares every tensor with the checkpoint the job saved locally.

Needs PyTorch (scripts/test.sh installs it into its own venv when the package index has it) and
SHARDCAST_BIN; skipped with the reason otherwise."""

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import unittest
from pathlib import Path

try:
    import torch
except ImportError as e:  # pragma: no cover - depends on the environment
    torch = None
    TORCH_MISSING = f"PyTorch is not installed here ({e})"

BIN = os.environ.get("SHARDCAST_BIN")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "torchrun_train.py"


def start_server(root: Path) -> "tuple[subprocess.Popen, str]":
    p = subprocess.Popen(
        [BIN, "serve", "--listen", "127.0.0.1:0", "--root", str(root)],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "NO_COLOR": "1"},
    )
    for line in p.stderr:
        if "listening on" in line:
            # Keep draining its log so the server never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
            return p, line.split("listening on ", 1)[1].split()[0]
    raise RuntimeError(f"serve for {root} did not start")


@unittest.skipIf(torch is None, TORCH_MISSING if torch is None else "")
@unittest.skipIf(not BIN, "SHARDCAST_BIN not set")
class TorchrunTests(unittest.TestCase):
    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp())
        self.procs = []

    def tearDown(self):
        for p in self.procs:
            p.terminate()
            p.wait()
            p.stderr.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def test_torchrun_stages_shards_and_mirrors_checkpoints(self):
        shards = self.tmp / "shards"
        shards.mkdir()
        g = torch.Generator().manual_seed(1)
        for i in range(6):
            x = torch.randn(64, 16, generator=g)
            torch.save((x, x[:, :4] * 0.5 + 1.0), shards / f"shard-{i:03d}.pt")
        roots, addrs = [], []
        for i in range(2):
            root = self.tmp / f"node{i}"
            p, addr = start_server(root)
            self.procs.append(p)
            roots.append(str(root))
            addrs.append(addr)
        out = self.tmp / "ckpt"
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(EXAMPLE), "--replicas", ",".join(addrs), "--replica-roots", ",".join(roots),
            "--shards", str(shards), "--epochs", "2", "--out", str(out),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        self.assertEqual(r.returncode, 0, f"torchrun failed:\n{r.stdout}\n{r.stderr}")
        self.assertIn("epoch 2: checkpoint mirrored", r.stdout)

        for i, root in enumerate(roots):
            # Staging: this node holds exactly its rank's shards of the last epoch, byte for byte.
            staged = sorted(p.name for p in (Path(root) / "dataset" / "current").iterdir())
            want = [f"shard-{j:03d}.pt" for j in range(6) if (j + 2) % 2 == i]
            self.assertEqual(staged, want, f"node {i}")
            for name in staged:
                self.assertEqual((Path(root) / "dataset/current" / name).read_bytes(), (shards / name).read_bytes())
            # Mirroring: each epoch's checkpoint, loaded on the replica, equals the local save.
            for epoch in (1, 2):
                local = torch.load(out / f"epoch-{epoch}.pt")
                mirrored = torch.load(Path(root) / "ckpt" / str(epoch) / "checkpoint.pt")
                self.assertEqual(mirrored["epoch"], epoch)
                self.assertEqual(local["model"].keys(), mirrored["model"].keys())
                for k, t in local["model"].items():
                    self.assertTrue(torch.equal(t, mirrored["model"][k]), f"node {i} epoch {epoch} {k}")
            self.assertEqual(os.readlink(Path(root) / "ckpt" / "current"), "2")


if __name__ == "__main__":
    unittest.main()
