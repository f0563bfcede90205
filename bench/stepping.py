"""Cost of one training step: activation checkpointing on/off, fp32 vs bf16 autocast.

Two groups of variants, each run side by side in this process through the engine's real path
(`pipeline.engine.step.train_step`, AdamW from `build_optimizer`):

- `seq_transformer` (d_model 128, 4 heads, 4 layers, ffn 512, vocab 64, per-token loss
  `token_cross_entropy` on random tokens): fp32 (baseline), fp32 + activation checkpointing,
  bf16 autocast.
- `digits_cnn` (random 8x8 "images", `cross_entropy`): fp32 (baseline), fp32 + checkpointing.

Every variant has its own model (same initial weights) and optimizer. After `--warmup` steps
each, the variants of a group run in rotation, a few steps at a time, for `--repeats` rounds
(the starting variant rotates each round), so machine noise hits them all. Reported: the median
step time of each variant, and its ratio to the baseline = median over rounds of
(variant median / baseline median) in the same round.

Activation memory, measured exactly on any device: the bytes of the tensors autograd saves for
backward during one forward (model + loss), from a `torch.autograd.graph.saved_tensors_hooks`
pack hook that sums `t.untyped_storage().nbytes()` over the distinct storages it sees
(deduplicated by storage data_ptr, so views count once; parameter storages left out; autocast's
low-precision weight copies counted, since they are held until backward). Under
non-reentrant checkpointing the inner saves go to checkpoint's own hook, so only each block's
inputs are counted -- which is what checkpointing keeps. See `gpu_check.saved_tensor_bytes`.
On CUDA also torch.cuda.max_memory_allocated over one step after reset_peak_memory_stats, with
only that variant's model on the device (absolute, and minus what was allocated before it).

    python bench/stepping.py                      # CPU: batch 4 x 256 tokens, CNN batch 128
    python bench/stepping.py --device cuda        # GPU: batch 32 x 256, CNN batch 512

Prints a table and writes bench/results/stepping.json. No timing is asserted.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import save  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_check import make_batch, saved_tensor_bytes  # noqa: E402

from pipeline.engine.models import build_model  # noqa: E402
from pipeline.engine.optim import build_optimizer  # noqa: E402
from pipeline.engine.step import to_torch, train_step  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TRANSFORMER = dict(d_model=128, nhead=4, num_layers=4, dim_feedforward=512)
VOCAB = 64


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def transformer_group(batch: int, seq: int, device: torch.device) -> dict[str, Any]:
    def build(ckpt: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model("seq_transformer", input_dim=None, num_outputs=VOCAB, vocab_size=VOCAB,
                           per_token=True, activation_checkpointing=ckpt, **TRANSFORMER).to(device)

    mb = to_torch(make_batch(np.random.default_rng(0), batch, seq, VOCAB), device)
    return {"name": "seq_transformer", "build": build, "batch": mb, "loss": "token_cross_entropy",
            "shape": f"d{TRANSFORMER['d_model']} L{TRANSFORMER['num_layers']}, "
                     f"batch {batch} x seq {seq}",
            "variants": [("fp32", "fp32", False), ("fp32+ckpt", "fp32", True),
                         ("bf16", "bf16", False)]}


def cnn_group(batch: int, device: torch.device) -> dict[str, Any]:
    def build(ckpt: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model("digits_cnn", input_dim=64, num_outputs=10, vocab_size=None,
                           activation_checkpointing=ckpt).to(device)

    g = torch.Generator().manual_seed(0)
    mb = {"features": torch.randn(batch, 64, generator=g).to(device),
          "label": torch.randint(0, 10, (batch,), generator=g).to(device)}
    return {"name": "digits_cnn", "build": build, "batch": mb, "loss": "cross_entropy",
            "shape": f"batch {batch}", "variants": [("fp32", "fp32", False),
                                                   ("fp32+ckpt", "fp32", True)]}


def run_group(group: dict[str, Any], device: torch.device, *, warmup: int, steps: int,
              repeats: int) -> dict[str, Any]:
    build: Callable[[bool], torch.nn.Module] = group["build"]
    mb, loss = group["batch"], group["loss"]

    def step(model, opt, precision):
        return train_step(model, opt, [mb], loss=loss, precision=precision, grad_clip=1.0)

    rows: dict[str, dict[str, Any]] = {}
    # Memory: one variant's model at a time.
    for name, precision, ckpt in group["variants"]:
        model = build(ckpt)
        opt = build_optimizer("adamw", model, lr=1e-4)
        row: dict[str, Any] = {"precision": precision, "activation_checkpointing": ckpt,
                               "saved_tensor_bytes": saved_tensor_bytes(model, mb, precision,
                                                                        device, loss)}
        if device.type == "cuda":
            step(model, opt, precision)  # optimizer state exists from here on
            sync(device)
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            resident = torch.cuda.memory_allocated(device)
            step(model, opt, precision)
            sync(device)
            peak = torch.cuda.max_memory_allocated(device)
            row.update(cuda_peak_bytes=peak, cuda_peak_above_resident_bytes=peak - resident)
        rows[name] = row
        del model, opt
        gc.collect()

    # Timing: all variants alive, interleaved.
    states = {}
    for name, precision, ckpt in group["variants"]:
        model = build(ckpt)
        opt = build_optimizer("adamw", model, lr=1e-4)
        for _ in range(warmup):
            step(model, opt, precision)
        states[name] = (model, opt, precision)
        rows[name].update(times=[], rounds=[])
    names = list(states)
    for rnd in range(repeats):
        for name in names[rnd % len(names):] + names[: rnd % len(names)]:
            model, opt, precision = states[name]
            times = []
            for _ in range(steps):
                sync(device)
                t0 = time.perf_counter()
                step(model, opt, precision)
                sync(device)
                times.append(time.perf_counter() - t0)
            rows[name]["times"] += times
            rows[name]["rounds"].append(statistics.median(times))
    base = names[0]
    for name in names:
        r = rows[name]
        r["step_s"] = statistics.median(r["times"])
        ratios = [m / b for b, m in zip(rows[base]["rounds"], r["rounds"], strict=True)]
        r["time_ratio"] = statistics.median(ratios)
        r["time_ratio_range"] = [min(ratios), max(ratios)]
        r["saved_bytes_ratio"] = r["saved_tensor_bytes"] / rows[base]["saved_tensor_bytes"]
        if "cuda_peak_bytes" in r:
            r["cuda_peak_ratio"] = r["cuda_peak_bytes"] / rows[base]["cuda_peak_bytes"]
    del states
    gc.collect()
    return {"model": group["name"], "shape": group["shape"], "loss": loss, "baseline": base,
            "variants": rows}


def report(info: dict[str, Any]) -> None:
    cuda = info["device"] == "cuda"
    print(f"stepping on {info['device_name']}, torch {info['torch']}, {info['threads']} threads; "
          f"{info['repeats']} rounds, medians; x time = median over rounds of the ratio to the "
          "group's fp32 baseline (range over rounds)")
    head = (f"{'model':<16}{'variant':<11}{'step ms':>9}{'x time':>8}{'(range)':>14}"
            f"{'saved MiB':>11}{'x saved':>9}")
    if cuda:
        head += f"{'peak MiB':>10}{'peak-res MiB':>13}{'x peak':>8}"
    print(head)
    mib = 2**20
    for g in info["groups"]:
        for name, r in g["variants"].items():
            lo, hi = r["time_ratio_range"]
            line = (f"{g['model']:<16}{name:<11}{r['step_s'] * 1e3:>9.1f}{r['time_ratio']:>8.3f}"
                    f"{f'({lo:.2f}-{hi:.2f})':>14}"
                    f"{r['saved_tensor_bytes'] / mib:>11.2f}{r['saved_bytes_ratio']:>9.3f}")
            if cuda:
                line += (f"{r['cuda_peak_bytes'] / mib:>10.1f}"
                         f"{r['cuda_peak_above_resident_bytes'] / mib:>13.1f}"
                         f"{r['cuda_peak_ratio']:>8.3f}")
            print(line)
        print(f"{'':<16}({g['shape']}, loss {g['loss']})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, help="transformer sequences per step (cpu 4, cuda 32)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--cnn-batch", type=int, help="digits_cnn samples per step (cpu 128, cuda 512)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="rounds over the variants")
    ap.add_argument("--steps", type=int, help="transformer steps per variant per round "
                                              "(cpu 1, cuda 10)")
    ap.add_argument("--cnn-steps", type=int, help="digits_cnn steps per variant per round "
                                                  "(cpu 10, cuda 20)")
    ap.add_argument("--threads", type=int,
                    help="torch CPU threads (cpu default 1: on a shared machine a second "
                         "OpenMP thread stalls whenever the other core is busy; cuda: unchanged)")
    ap.add_argument("--out", type=Path, default=RESULTS / "stepping.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 1)
    batch = args.batch or (32 if cuda else 4)
    cnn_batch = args.cnn_batch or (512 if cuda else 128)
    steps = args.steps or (10 if cuda else 1)
    cnn_steps = args.cnn_steps or (20 if cuda else 10)
    start = time.perf_counter()
    info: dict[str, Any] = {
        "benchmark": "stepping", "device": device.type, "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "threads": torch.get_num_threads(), "warmup": args.warmup, "repeats": args.repeats,
        "groups": [],
    }
    for group, n in ((transformer_group(batch, args.seq, device), steps),
                     (cnn_group(cnn_batch, device), cnn_steps)):
        res = run_group(group, device, warmup=args.warmup, steps=n, repeats=args.repeats)
        res["steps_per_round"] = n
        info["groups"].append(res)
    info["wall_s"] = time.perf_counter() - start
    save(args.out, info)  # first: the figures kept should the report fail
    report(info)
    print(f"wall {info['wall_s']:.1f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
