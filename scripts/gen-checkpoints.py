#!/usr/bin/env python3
"""Real model checkpoints for the compression and delta benchmarks (issue 17): trains a small
GPT-style transformer with CPU PyTorch and saves consecutive checkpoints in bf16 and fp32.

    gen-checkpoints.py OUT_DIR [--steps K] [--size small|medium] [--pretrain-steps N]
                       [--pretrain-lr LR] [--finetune-lr LR] [--threads T] [--seed S]

Two settings, K consecutive checkpoints each:
  pretrain   from a random init, AdamW at a pre-training learning rate (1e-3); after
             --pretrain-steps steps it saves a checkpoint after each of the next K steps;
  finetune   from the last pre-trained weights, a fresh AdamW at a fine-tuning learning rate
             (1e-5) on other text; a checkpoint after each of K steps (as RL or SFT steps).
The weights train in fp32 (the master copy); a bf16 checkpoint is the fp32 weights rounded to
bf16, as mixed-precision training saves them. Layout (each step directory is one push source;
the same file name in consecutive steps is what a delta push pairs up):
  OUT_DIR/{pretrain,finetune}/{bf16,fp32}/step-NNNNNN/model.safetensors
  OUT_DIR/meta.json   (model shape, settings, the loss of every step, the list of checkpoints)
Files are safetensors when the `safetensors` package imports, else torch.save (model.pt).

The text is byte-level (vocabulary 256): the Python standard library's own .py files, read in
sorted order, half of them (by a hash of the path) for pre-training and the other half for
fine-tuning; no download. Seeded and deterministic (torch.use_deterministic_algorithms, a fixed
thread count, --threads 1 by default): the same command on the same machine and Python gives
bit-identical files. Sizes: small 1.45 M parameters (5.5 MiB fp32, 2.8 MiB bf16 per checkpoint;
15-20 s on 2 busy cores, 16 files = 66 MiB with --steps 4), medium 85.5 M (326 MiB fp32, 163 MiB
bf16; 5-10 min on 2 busy cores, 3.9 GB with --steps 4). The loss of every step is printed; the
run fails when the pre-training loss did not go down.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import sysconfig
import time

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError:
    sys.exit("error: PyTorch is not installed in this Python (scripts/bench-compress.sh installs it "
             "into ~/.cache/shardcast-torchvenv, as scripts/test.sh does)")

try:
    from safetensors.torch import save_file
except ImportError:
    save_file = None

SIZES = {
    # d_model, layers, heads, sequence, batch, pre-training steps before the first checkpoint
    "small": dict(d=192, layers=3, heads=4, seq=64, batch=8, pretrain_steps=40),
    "medium": dict(d=768, layers=12, heads=12, seq=64, batch=4, pretrain_steps=16),
}


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, d: int, layers: int, heads: int, seq: int):
        super().__init__()
        self.tok = nn.Embedding(256, d)
        self.pos = nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:  # GPT-2's init: N(0, 0.02), residual projections scaled down
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def corpus(part: int, limit: int) -> bytes:
    """Up to ``limit`` bytes of the standard library's .py files whose path hashes to ``part``
    (0: pre-training text, 1: fine-tuning text), in sorted path order."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in ("site-packages", "__pycache__", "test", "tests"))
        paths += [os.path.join(d, f) for f in files if f.endswith(".py")]
    out, n = [], 0
    for p in sorted(paths):
        rel = os.path.relpath(p, root)
        if hashlib.sha256(rel.encode()).digest()[0] % 2 != part:
            continue
        with open(p, "rb") as f:
            b = f.read()
        out.append(b)
        n += len(b)
        if n >= limit:
            break
    data = b"".join(out)[:limit]
    if len(data) < 1 << 20:
        sys.exit(f"error: only {len(data)} bytes of text under {root} (expected the standard library's .py files)")
    return data


def batches(data: bytes, seq: int, batch: int, gen: torch.Generator):
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    while True:
        start = torch.randint(0, len(buf) - seq - 1, (batch,), generator=gen)
        x = torch.stack([buf[s:s + seq] for s in start.tolist()])
        y = torch.stack([buf[s + 1:s + seq + 1] for s in start.tolist()])
        yield x, y


def save(model: nn.Module, out: str, setting: str, step: int) -> list:
    """The model's weights as bf16 and as fp32 under OUT/SETTING/{bf16,fp32}/step-NNNNNN/."""
    saved = []
    for dtype, tdtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        d = os.path.join(out, setting, dtype, f"step-{step:06d}")
        os.makedirs(d, exist_ok=True)
        sd = {k: v.detach().to(tdtype).contiguous() for k, v in model.state_dict().items()}
        if save_file is not None:
            path = os.path.join(d, "model.safetensors")
            # One metadata key: safetensors writes several in a hash map's (random) order.
            save_file(sd, path, metadata={"checkpoint": f"{setting} step {step} {dtype}"})
        else:
            path = os.path.join(d, "model.pt")
            torch.save(sd, path)
        saved.append({"setting": setting, "dtype": dtype, "step": step,
                      "path": os.path.relpath(path, out), "bytes": os.path.getsize(path)})
    return saved


def train(model, opt, data_iter, steps, lr, warmup, log_prefix, losses, on_step=None):
    for i in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (i + 1) / warmup) if warmup else lr
        x, y = next(data_iter)
        t = time.monotonic()
        loss = F.cross_entropy(model(x).view(-1, 256), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(round(loss.item(), 5))
        print(f"{log_prefix} step {len(losses):4d}  loss {loss.item():.4f}  ({time.monotonic() - t:.2f} s)",
              flush=True)
        if on_step:
            on_step(len(losses))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=4, help="checkpoints per setting (default 4)")
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--pretrain-steps", type=int, help="steps before the first pre-training checkpoint")
    ap.add_argument("--pretrain-lr", type=float, default=1e-3)
    ap.add_argument("--finetune-lr", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (fixed, for determinism)")
    ap.add_argument("--seed", type=int, default=17)
    a = ap.parse_args()
    if a.steps < 2:
        sys.exit("error: --steps must be >= 2 (consecutive checkpoints)")
    cfg = SIZES[a.size]
    pre_steps = cfg["pretrain_steps"] if a.pretrain_steps is None else a.pretrain_steps

    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    torch.use_deterministic_algorithms(True)
    model = GPT(cfg["d"], cfg["layers"], cfg["heads"], cfg["seq"])
    nparams = sum(p.numel() for p in model.parameters())
    print(f"gen-checkpoints: {a.size}: {nparams / 1e6:.2f} M parameters "
          f"(fp32 {nparams * 4 / 2**20:.1f} MiB, bf16 {nparams * 2 / 2**20:.1f} MiB), "
          f"{'safetensors' if save_file else 'torch.save (safetensors not installed)'}, "
          f"{a.steps} checkpoints per setting -> {a.out}", flush=True)
    os.makedirs(a.out, exist_ok=True)
    t0 = time.monotonic()
    gen = torch.Generator().manual_seed(a.seed)
    pre_data = batches(corpus(0, 8 << 20), cfg["seq"], cfg["batch"], gen)
    ft_data = batches(corpus(1, 8 << 20), cfg["seq"], cfg["batch"], gen)
    losses: dict = {"pretrain": [], "finetune": []}
    checkpoints: list = []

    opt = torch.optim.AdamW(model.parameters(), lr=a.pretrain_lr, weight_decay=0.01)
    warm = max(1, pre_steps // 2)
    train(model, opt, pre_data, pre_steps, a.pretrain_lr, warm, "pretrain", losses["pretrain"])
    train(model, opt, pre_data, a.steps, a.pretrain_lr, 0, "pretrain", losses["pretrain"],
          on_step=lambda s: checkpoints.extend(save(model, a.out, "pretrain", s)))
    # Fine-tuning: the pre-trained weights, a new optimizer, a small learning rate, other text.
    opt = torch.optim.AdamW(model.parameters(), lr=a.finetune_lr, weight_decay=0.01)
    base = len(losses["pretrain"])
    train(model, opt, ft_data, a.steps, a.finetune_lr, 0, "finetune", losses["finetune"],
          on_step=lambda s: checkpoints.extend(save(model, a.out, "finetune", base + s)))

    pl = losses["pretrain"]
    print(f"gen-checkpoints: pre-training loss {pl[0]:.3f} -> {pl[-1]:.3f} over {len(pl)} steps "
          f"(ln 256 = {math.log(256):.3f} is chance); fine-tuning loss "
          f"{' '.join(f'{x:.3f}' for x in losses['finetune'])}; {time.monotonic() - t0:.0f} s", flush=True)
    if not pl[-1] < pl[0]:
        sys.exit("error: the pre-training loss did not go down")
    meta = {"size": a.size, "parameters": nparams, "config": cfg, "pretrain_steps": pre_steps,
            "pretrain_lr": a.pretrain_lr, "finetune_lr": a.finetune_lr, "seed": a.seed, "threads": a.threads,
            "torch": torch.__version__, "python": sys.version.split()[0],
            "format": "safetensors" if save_file else "torch.save", "losses": losses, "checkpoints": checkpoints}
    with open(os.path.join(a.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)


if __name__ == "__main__":
    main()
