"""A `torchrun` training job that uses shardcast on both ends of each epoch.

    torchrun --standalone --nproc_per_node=2 torchrun_train.py \
        --replicas node1:7071,node2:7071 --replica-roots /data/replica,/data/replica \
        --shards /datasets/train --epochs 2 --out /ckpt

- Before each epoch, rank 0 stages the epoch's dataset shards with `shardcast.stage` (the Python
  form of `shardcast stage --plan`): rank r's shards go to the node rank r runs on (replica r)
  and are published there as `dataset@<epoch>`; the other ranks wait at a barrier, then read
  their shards from their node's replica root (`<root>/dataset/current`).
- After each epoch, rank 0 serializes the model into memory and mirrors it from that buffer
  (no temporary file) as `ckpt@<epoch>` to every replica, keeping the last 2, while it also
  saves it to `--out` the usual way.

The job trains a small linear model with DDP over gloo on CPU: the point is the data movement,
not the model. ffi/python/tests/test_torchrun.py runs it with real `shardcast serve` processes
and loads the mirrored checkpoints with `torch.load` on the replica side.
"""

import argparse
import io
import os
from pathlib import Path
from typing import Dict, List

import torch
import torch.distributed as dist

import shardcast


def assignment(shards: List[Path], world: int, epoch: int) -> Dict[int, List[Path]]:
    """The epoch's shard assignment: a different rotation each epoch, like a shuffled sampler."""
    out: Dict[int, List[Path]] = {r: [] for r in range(world)}
    for i, s in enumerate(shards):
        out[(i + epoch) % world].append(s)
    return out


def stage(shards: Dict[int, List[Path]], root: Path, replicas: List[str], epoch: int) -> None:
    """One routed push: rank r's shards onto replica r (the node rank r runs on), and nothing
    else; a shard two ranks share travels once, as far down the chain as needed."""
    plan = {
        "name": "dataset",
        "version": epoch,
        "source": str(root),
        "node": [{"addr": replicas[r], "files": [f.name for f in files]} for r, files in sorted(shards.items())],
    }
    report = shardcast.stage(plan, keep=1)
    assert report.ok, report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replicas", required=True, help="replica addresses, one per rank")
    ap.add_argument("--replica-roots", required=True, help="each rank's replica root on its node")
    ap.add_argument("--shards", required=True, type=Path, help="directory of shard-*.pt files")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", required=True, type=Path, help="where checkpoints are saved locally")
    a = ap.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    replicas = a.replicas.split(",")
    roots = [Path(p) for p in a.replica_roots.split(",")]
    assert len(replicas) == world == len(roots), "one replica per rank"
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    shards = sorted(a.shards.glob("shard-*.pt"))

    for epoch in range(1, a.epochs + 1):
        if rank == 0:
            stage(assignment(shards, world, epoch), a.shards, replicas, epoch)
        dist.barrier()
        mine = roots[rank] / "dataset" / "current"
        for f in sorted(mine.iterdir()):
            x, y = torch.load(f)
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"rank {rank} epoch {epoch}: {len(list(mine.iterdir()))} shards, loss {loss.item():.4f}", flush=True)
        dist.barrier()
        if rank == 0:
            state = {"epoch": epoch, "model": model.module.state_dict(), "optim": opt.state_dict()}
            a.out.mkdir(parents=True, exist_ok=True)
            torch.save(state, a.out / f"epoch-{epoch}.pt")
            buf = io.BytesIO()
            torch.save(state, buf)
            report = shardcast.push({"checkpoint.pt": buf.getbuffer()}, to=replicas, name="ckpt", version=epoch, keep=2)
            print(f"epoch {epoch}: checkpoint mirrored to {[r.node for r in report.replicas]}", flush=True)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    main()
