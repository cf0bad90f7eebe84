"""Mirror PyTorch checkpoints to replica nodes after each save, two ways.

1. No change to how the training script saves, as long as it writes then renames (most
   trainers do; `save_checkpoint` below shows the pattern): run next to the job

       shardcast mirror --watch /ckpt --name llm-7b --to node2:7071,node3:7071

   and every completed `/ckpt/step-<N>` becomes version N on every replica.

2. From the launcher, right after the save, without blocking training: `push_async` returns at
   once, the data moves in shardcast's threads (the GIL is released), and the next save waits
   for the previous mirror to finish.
"""

import os
import shutil

import torch

import shardcast

REPLICAS = os.environ.get("SHARDCAST_REPLICAS", "node2:7071,node3:7071").split(",")
_pending = None


def save_checkpoint(model, optimizer, step: int, root: str = "/ckpt") -> str:
    """Write-then-rename: readers (and `shardcast mirror`) never see a half-written checkpoint."""
    final = os.path.join(root, f"step-{step}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    torch.save(model.state_dict(), os.path.join(tmp, "model.pt"))
    torch.save(optimizer.state_dict(), os.path.join(tmp, "optim.pt"))
    os.rename(tmp, final)
    return final


def mirror_after_save(path: str, step: int, name: str = "llm-7b") -> None:
    """Way 2: push the checkpoint in the background; wait for the previous one first."""
    global _pending
    if _pending is not None:
        _pending.wait()  # raises shardcast.ShardcastError (with .node and .kind) on failure
        _pending.close()
    _pending = shardcast.push_async(path, to=REPLICAS, name=name, version=step)


# In the training loop:
#     if step % 1000 == 0:
#         path = save_checkpoint(model, optimizer, step)
#         mirror_after_save(path, step)
# On a replica, the newest mirrored checkpoint is /data/replica/llm-7b/current/model.pt:
#     state = torch.load("/data/replica/llm-7b/current/model.pt")
