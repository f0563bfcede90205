"""The training engine alone on one CUDA device (no Ray): precision, memory, MFU, equivalence.

Runs `pipeline.engine.step.train_step` -- the engine's real path -- on the `seq_transformer`
with a per-token loss (`token_cross_entropy`), sized for an H100 (d_model 512, 8 heads,
6 layers, ffn 2048, batch 64 x 512 tokens, vocab 64; about 19 M parameters, about 4.3 TFLOP of
model FLOPs per step), and reports:

1. step time, samples/s and tokens/s for fp32, bf16 (autocast) and fp16 (autocast +
   torch.amp.GradScaler, skipped steps counted), plus bf16 with activation checkpointing.
   Every variant has its own model and AdamW optimizer (same initial weights); after
   `--warmup` steps each, the variants run in rotation, `--steps` steps at a time, for
   `--repeats` rounds (the starting variant rotates each round), so drifting clocks hit them
   all. Each step is timed with torch.cuda.synchronize() + perf_counter. Figures are medians;
   ratios are medians over rounds of (median of variant / median of baseline) in that round.
2. peak memory, bf16, activation checkpointing off vs on: each measured with only that one
   model on the device: one warm-up step (creates the optimizer state), empty_cache,
   reset_peak_memory_stats, one train_step, torch.cuda.max_memory_allocated. Also the bytes
   of tensors saved for backward in one forward (see `saved_tensor_bytes`).
3. model FLOP utilisation (MFU). Model FLOPs per step =
       6 * N * tokens  +  12 * n_layers * d_model * seq^2 * batch
   with N the non-embedding parameters (an embedding lookup is no matmul) and tokens =
   batch * seq: the forward costs 2 FLOPs per parameter per token and the backward twice that
   (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", sec. 2.1, table 1), and the
   attention scores and their product with the values add 12 * n_layers * d_model * seq FLOPs
   per token for full (non-causal) attention (Chowdhery et al. 2022, "PaLM", appendix B).
   Recomputation under activation checkpointing is not model FLOPs, so it lowers MFU.
   MFU = model FLOPs / step time / the device's peak dense bf16 FLOP/s (the datasheet figure
   "with sparsity" halved, see PEAK_BF16_TFLOPS; all precisions are compared with that same
   bf16 peak). For a device not in the table only the achieved TFLOP/s are reported.
4. equivalence: from the same initial weights, one fp32 SGD step (lr 0.1, no momentum) on a
   batch of 64 variable-length sequences as 1 micro-batch of 64 vs 8 micro-batches of 8 (each
   padded to its own length) must give the same weights; reported as the max abs weight
   difference divided by the max abs weight update.

5. the largest micro-batch that fits (`pipeline.engine.batch_finder`, what `find-batch-size`
   runs): bf16 steps of the same model at full sequence length, doubling then bisection to
   the exact boundary, CUDA out-of-memory caught (on a CPU dry run: a 64 MiB budget), with
   samples/s at each size tried and the step cost c they give (the adaptive schedule's
   throughput model); capped at `--finder-limit` (4096).

6. packed sequences (`batching.packing`): one batch of `batch` sequences with lengths drawn
   as the embedded `sequences` draws them (`make_sequences`: lognormal(3.7, 0.8), median
   about 40 tokens, clipped to 8..seq; the tiny model's seq of 32 clips most) as
   (a) padded to its longest (a key-padding mask), (b) packed into rows of `seq` tokens with
   the dense block-diagonal mask, (c) the same rows with FlexAttention block masks
   (`model.kwargs.attention: flex`, compiled), bf16 steps timed in rotation as in 1. Reported:
   real tokens/s, and MFU on the useful FLOPs only -- 6 N x real tokens + 12 x n_layers x
   d_model x sum of each sample's length squared (attention within a sample) -- the same
   numerator for the three, so MFU compares them directly. Equivalence first: (c) against (b)
   from the same weights, fp32, loss and gradients (on a CPU the forward only: PyTorch has no
   FlexAttention backward there).

Every variant is wrapped: an error (an OOM, a fp16 overflow turned into an exception, ...) is
recorded in the JSON and the table instead of ending the run. `--max-seconds` stops starting
new timing rounds once exceeded (the rounds done are reported).

Needs only torch and numpy (no Ray, pydantic or mlflow): it imports pipeline.engine.* and
pipeline.data.padding, which import neither.

    python3 bench/gpu_check.py --out DIR                       # on a CUDA machine
    python3 bench/gpu_check.py --out DIR --device cpu --tiny   # dry run, tiny model, on CPU

Prints a table and writes DIR/gpu_check.json.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import save  # noqa: E402
from pipeline.data.padding import collate_sequences  # noqa: E402
from pipeline.engine.batch_finder import (  # noqa: E402
    find_max_micro_batch,
    make_trial_step,
    trial_step_cost,
)
from pipeline.engine.models import build_model  # noqa: E402
from pipeline.engine.optim import build_optimizer  # noqa: E402
from pipeline.engine.step import autocast, loss_sum, to_torch, train_step  # noqa: E402

FULL = dict(d_model=512, nhead=8, num_layers=6, dim_feedforward=2048, batch=64, seq=512, vocab=64)
TINY = dict(d_model=32, nhead=2, num_layers=2, dim_feedforward=64, batch=8, seq=32, vocab=16)

# Peak dense (no structured sparsity) bf16 tensor-core TFLOP/s from NVIDIA's datasheets (their
# "with sparsity" figure halved). First match on torch.cuda.get_device_name wins, so the more
# specific names come first ("NVIDIA H100 80GB HBM3" is the SXM part).
PEAK_BF16_TFLOPS: list[tuple[str, float, str]] = [
    ("H100 NVL", 835.5, "H100 NVL"),
    ("H100 PCIe", 756.5, "H100 PCIe"),
    ("H100", 989.4, "H100 SXM"),
    ("GH200", 989.4, "GH200 (H100-class GPU)"),
    ("H200 NVL", 835.5, "H200 NVL"),
    ("H200", 989.4, "H200 SXM"),
    ("A100", 312.0, "A100"),
    ("L40S", 362.05, "L40S"),
    ("L40", 181.05, "L40"),
    ("L4", 121.0, "L4"),
]

LOSS = "token_cross_entropy"
# (name, precision, activation checkpointing); the first is the baseline of the ratios.
VARIANTS = [("fp32", "fp32", False), ("bf16", "bf16", False), ("fp16", "fp16", False),
            ("bf16+ckpt", "bf16", True)]


def peak_bf16(name: str) -> tuple[float | None, str | None]:
    for key, tflops, label in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops, label
    return None, None


def make_batch(rng: np.random.Generator, batch: int, seq: int, vocab: int, *,
               ragged: bool = False) -> dict[str, np.ndarray]:
    """Random tokens and per-token targets through the pipeline's own collate."""
    if ragged:
        lengths = rng.integers(max(1, seq // 4), seq + 1, size=batch)
    else:
        lengths = np.full(batch, seq)
    total = int(lengths.sum())
    return collate_sequences({
        "tokens_values": rng.integers(0, vocab, size=total),
        "tokens_lengths": lengths,
        "targets_values": rng.integers(0, vocab, size=total),
    })


def build(cfg: dict[str, int], device: torch.device, ckpt: bool, seed: int = 0,
          attention: str = "dense") -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("seq_transformer", input_dim=None, num_outputs=cfg["vocab"],
                        vocab_size=cfg["vocab"], per_token=True, activation_checkpointing=ckpt,
                        d_model=cfg["d_model"], nhead=cfg["nhead"], num_layers=cfg["num_layers"],
                        dim_feedforward=cfg["dim_feedforward"], attention=attention)
    return model.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def saved_tensor_bytes(model: torch.nn.Module, mb: dict[str, torch.Tensor], precision: str,
                       device: torch.device, loss: str = LOSS) -> int:
    """Bytes of the tensors autograd saves for backward in one forward (model + loss).

    A `saved_tensors_hooks` pack hook sees every tensor saved for backward; the bytes of its
    whole storage (`untyped_storage().nbytes()`) are summed once per distinct storage
    (deduplicated by storage data_ptr, so views count once) and parameter storages are left out
    (they exist anyway). Autocast's low-precision weight copies do count: they are held until
    backward. Under non-reentrant checkpointing the inner saves go to checkpoint's own hook, so
    only each block's inputs are seen, which is what checkpointing keeps. The graph is dropped
    without a backward.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in seen and ptr not in params:
            seen.add(ptr)
            total += storage.nbytes()
        # Not `t` itself: a saved output would then hold its own grad_fn, a reference cycle
        # that keeps the whole graph alive after the forward is dropped.
        return t.detach()

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast(precision, device):
            out = model(mb)
        s, _ = loss_sum(out, mb, loss)
    del out, s  # drops the graph without a backward
    return total


def model_flops(model: torch.nn.Module, cfg: dict[str, int]) -> dict[str, float]:
    n = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("embed."))
    tokens = cfg["batch"] * cfg["seq"]
    dense = 6.0 * n * tokens
    attention = 12.0 * cfg["num_layers"] * cfg["d_model"] * cfg["seq"] ** 2 * cfg["batch"]
    return {"non_embedding_params": n, "total_params": sum(p.numel() for p in model.parameters()),
            "dense_flops": dense, "attention_flops": attention, "flops_per_step": dense + attention}


def err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:300]


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def memory_check(cfg, device, mb) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for ckpt in (False, True):
        key = "ckpt_on" if ckpt else "ckpt_off"
        row: dict[str, Any] = {"precision": "bf16", "activation_checkpointing": ckpt}
        model = opt = None
        try:
            model = build(cfg, device, ckpt)
            opt = build_optimizer("adamw", model, lr=1e-4)
            row["saved_tensor_bytes"] = saved_tensor_bytes(model, mb, "bf16", device)
            train_step(model, opt, [mb], loss=LOSS, precision="bf16", grad_clip=1.0)
            if device.type == "cuda":
                sync(device)
                free(device)
                torch.cuda.reset_peak_memory_stats(device)
                resident = torch.cuda.memory_allocated(device)
                train_step(model, opt, [mb], loss=LOSS, precision="bf16", grad_clip=1.0)
                sync(device)
                peak = torch.cuda.max_memory_allocated(device)
                row.update(resident_bytes=resident, peak_bytes=peak,
                           peak_above_resident_bytes=peak - resident)
        except Exception as e:  # noqa: BLE001 - reported, not raised
            row["error"] = err(e)
        out[key] = row
        del model, opt
        free(device)
    off, on = out["ckpt_off"], out["ckpt_on"]
    if "saved_tensor_bytes" in off and "saved_tensor_bytes" in on:
        out["saved_bytes_ratio_on_over_off"] = on["saved_tensor_bytes"] / off["saved_tensor_bytes"]
    if "peak_bytes" in off and "peak_bytes" in on:
        out["peak_ratio_on_over_off"] = on["peak_bytes"] / off["peak_bytes"]
    return out


def timing_check(cfg, device, mbs, *, warmup: int, steps: int, repeats: int,
                 deadline: float) -> dict[str, Any]:
    states: dict[str, dict[str, Any]] = {}
    for name, precision, ckpt in VARIANTS:
        st: dict[str, Any] = {"precision": precision, "activation_checkpointing": ckpt,
                              "times": [], "rounds": [], "skipped_warmup": 0, "skipped_timed": 0,
                              "steps_timed": 0}
        try:
            st["model"] = build(cfg, device, ckpt)
            st["opt"] = build_optimizer("adamw", st["model"], lr=1e-4)
            st["scaler"] = torch.amp.GradScaler(device.type) if precision == "fp16" else None
            for i in range(warmup):
                r = train_step(st["model"], st["opt"], [mbs[i % len(mbs)]], loss=LOSS,
                               precision=precision, scaler=st["scaler"], grad_clip=1.0)
                st["skipped_warmup"] += int(r.skipped)
        except Exception as e:  # noqa: BLE001
            st["error"] = err(e)
            st.pop("model", None), st.pop("opt", None)
            free(device)
        states[name] = st

    names = [v[0] for v in VARIANTS]

    def step(st: dict[str, Any], i: int) -> None:
        r = train_step(st["model"], st["opt"], [mbs[i % len(mbs)]], loss=LOSS,
                       precision=st["precision"], scaler=st["scaler"], grad_clip=1.0)
        st["skipped_timed"] += int(r.skipped)
        st["last_loss"] = r.loss

    rounds_done = rotate(states, step, steps=steps, repeats=repeats, device=device,
                         deadline=deadline)
    for st in states.values():
        st["steps_timed"] = len(st["times"])

    out: dict[str, Any] = {"rounds_done": rounds_done, "variants": {}}
    for name in names:
        st = states[name]
        row = {k: st[k] for k in ("precision", "activation_checkpointing", "skipped_warmup",
                                  "skipped_timed", "steps_timed") if k in st}
        row["step_s_rounds"] = st["rounds"]
        if st["times"]:
            row["step_s"] = statistics.median(st["times"])
        for k in ("last_loss", "error"):
            if k in st:
                row[k] = st[k]
        out["variants"][name] = row
    # Ratios round by round against the baseline, then the median over rounds.
    base = states[names[0]]["rounds"]
    for name in names:
        mine = states[name]["rounds"]
        pairs = list(zip(base, mine, strict=False))
        if pairs:
            out["variants"][name]["time_ratio_vs_fp32"] = statistics.median(
                m / b for b, m in pairs)
    b16, ck = states["bf16"]["rounds"], states["bf16+ckpt"]["rounds"]
    if b16 and ck:
        out["ckpt_time_ratio_bf16"] = statistics.median(
            c / b for b, c in zip(b16, ck, strict=False))
    for st in states.values():
        st.pop("model", None), st.pop("opt", None)
    free(device)
    return out


def rotate(states: dict[str, dict[str, Any]], step: Any, *, steps: int, repeats: int,
           device: torch.device, deadline: float) -> int:
    """Time `step(state, i)` for every variant (`states`, in order) not yet in error: `steps`
    steps at a time, in rotation over `repeats` rounds (the first variant moves on by one each
    round), each step between two device syncs; no new round after `deadline`. Appends to each
    state's `times` and `rounds` (the round's median); an error ends that variant (its model
    and optimizer freed). Returns the rounds done."""
    names = list(states)
    rounds_done = 0
    for rnd in range(repeats):
        if rnd > 0 and time.perf_counter() > deadline:
            break
        for name in names[rnd % len(names):] + names[: rnd % len(names)]:
            st = states[name]
            if "error" in st:
                continue
            times = []
            try:
                for i in range(steps):
                    sync(device)
                    t0 = time.perf_counter()
                    step(st, i)
                    sync(device)
                    times.append(time.perf_counter() - t0)
                st["times"] += times
                st["rounds"].append(statistics.median(times))
            except Exception as e:  # noqa: BLE001
                st["error"] = err(e)
                st.pop("model", None), st.pop("opt", None)
                free(device)
        rounds_done += 1
    return rounds_done


def equivalence_check(cfg, device) -> dict[str, Any]:
    try:
        rng = np.random.default_rng(1)
        batch = 64 if cfg is FULL else cfg["batch"] * 2
        parts = 8
        whole = make_batch(rng, batch, cfg["seq"], cfg["vocab"], ragged=True)
        size = batch // parts
        raw = {k: v for k, v in whole.items()}
        lengths = raw["lengths"]
        micro = []
        for i in range(parts):
            sl = slice(i * size, (i + 1) * size)
            lens = lengths[sl]
            ids = raw["input_ids"][sl]
            tg = raw["token_targets"][sl]
            keep = np.arange(ids.shape[1]) < lens[:, None]
            micro.append(collate_sequences({"tokens_values": ids[keep], "tokens_lengths": lens,
                                            "targets_values": tg[keep]}))
        model_a = build(cfg, device, ckpt=False)
        model_b = copy.deepcopy(model_a)
        w0 = [p.detach().clone() for p in model_a.parameters()]
        opt_a = build_optimizer("sgd", model_a, lr=0.1, momentum=0.0)
        opt_b = build_optimizer("sgd", model_b, lr=0.1, momentum=0.0)
        ra = train_step(model_a, opt_a, [to_torch(whole, device)], loss=LOSS, precision="fp32")
        rb = train_step(model_b, opt_b, [to_torch(m, device) for m in micro], loss=LOSS,
                        precision="fp32")
        with torch.no_grad():
            diff = max(float((a - b).abs().max()) for a, b in
                       zip(model_a.parameters(), model_b.parameters(), strict=True))
            update = max(float((a - w).abs().max()) for a, w in
                         zip(model_a.parameters(), w0, strict=True))
        rel = diff / update if update > 0 else math.inf
        return {"batch": batch, "micro_batches": parts,
                "padded_lengths": [int(m["input_ids"].shape[1]) for m in micro],
                "whole_padded_length": int(whole["input_ids"].shape[1]),
                "loss_whole": ra.loss, "loss_accumulated": rb.loss,
                "max_abs_weight_diff": diff, "max_abs_update": update,
                "diff_over_update": rel, "ok": rel < 1e-3}
    except Exception as e:  # noqa: BLE001
        return {"error": err(e)}


PACKED = [("padded", "dense", False), ("packed dense", "dense", True),
          ("packed flex", "flex", True)]  # (name, attention, packing)


def packing_check(cfg: dict[str, int], device: torch.device, *, warmup: int, steps: int,
                  repeats: int, deadline: float) -> dict[str, Any]:
    rng = np.random.default_rng(2)
    # make_sequences' lengths (pipeline/data/datasets.py), so that the padding efficiencies
    # here are those of README's `sequences` figures
    lengths = np.clip(np.round(rng.lognormal(3.7, 0.8, cfg["batch"])), 8, cfg["seq"]).astype(int)
    total = int(lengths.sum())
    raw = {"tokens_values": rng.integers(0, cfg["vocab"], size=total), "tokens_lengths": lengths,
           "targets_values": rng.integers(0, cfg["vocab"], size=total)}
    batches = {name: to_torch(collate_sequences(dict(raw), packing=packing,
                                                pack_tokens=cfg["seq"] if packing else None),
                              device) for name, _, packing in PACKED}
    out: dict[str, Any] = {"samples": int(len(lengths)), "real_tokens": total,
                           "slots": {n: int(b["input_ids"].numel()) for n, b in batches.items()},
                           "variants": {}}
    probe = build(cfg, device, ckpt=False)
    n = sum(p.numel() for name, p in probe.named_parameters() if not name.startswith("embed."))
    out["useful_flops_per_step"] = (6.0 * n * total + 12.0 * cfg["num_layers"] * cfg["d_model"]
                                    * float((lengths.astype(np.float64) ** 2).sum()))
    try:  # (c) against (b): same weights, fp32
        flex = build(cfg, device, ckpt=False, attention="flex")
        flex.load_state_dict(probe.state_dict())
        nb = batches["packed dense"]
        grads = {}
        for name, model in (("dense", probe), ("flex", flex)):
            with torch.set_grad_enabled(device.type == "cuda"):
                total_loss, _ = loss_sum(model(nb), nb, LOSS)
            if device.type == "cuda":
                total_loss.backward()
                grads[name] = [p.grad.detach().clone() for p in model.parameters()]
            out[f"loss_{name}"] = float(total_loss)
        out["loss_rel_diff"] = abs(out["loss_flex"] - out["loss_dense"]) / abs(out["loss_dense"])
        if grads:
            out["grad_max_rel_diff"] = max(
                float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                for a, b in zip(grads["flex"], grads["dense"], strict=True))
        del flex
    except Exception as e:  # noqa: BLE001
        out["equivalence_error"] = err(e)
    del probe
    free(device)

    states: dict[str, dict[str, Any]] = {}
    for name, attention, _ in PACKED:
        st: dict[str, Any] = {"name": name, "rounds": [], "times": []}
        try:
            st["model"] = build(cfg, device, ckpt=False, attention=attention)
            st["opt"] = build_optimizer("adamw", st["model"], lr=1e-4)
            for _ in range(warmup):
                train_step(st["model"], st["opt"], [batches[name]], loss=LOSS, precision="bf16")
        except Exception as e:  # noqa: BLE001
            st = {"error": err(e), "rounds": [], "times": []}
            free(device)
        states[name] = st
    names = [v[0] for v in PACKED]
    out["rounds_done"] = rotate(
        states, lambda st, _: train_step(st["model"], st["opt"], [batches[st["name"]]],
                                         loss=LOSS, precision="bf16"),
        steps=steps, repeats=repeats, device=device, deadline=deadline)
    peak, _ = peak_bf16(torch.cuda.get_device_name(device)) if device.type == "cuda" else (None, None)
    base = states[names[0]]["rounds"]
    for name in names:
        st = states[name]
        row: dict[str, Any] = {"slots": out["slots"][name], "error": st.get("error")}
        if st["times"]:
            step = statistics.median(st["times"])
            row.update(step_s=step, real_tokens_per_s=total / step,
                       useful_tflops=out["useful_flops_per_step"] / step / 1e12)
            row["mfu"] = row["useful_tflops"] / peak if peak else None
            pairs = list(zip(base, st["rounds"], strict=False))
            if pairs:
                row["time_ratio_vs_padded"] = statistics.median(m / b for b, m in pairs)
        out["variants"][name] = row
        st.pop("model", None), st.pop("opt", None)
    free(device)
    return out


def finder_check(cfg: dict[str, int], device: torch.device, *, limit: int) -> dict[str, Any]:
    """The largest bf16 micro-batch of full-length sequences that trains a step on this device."""
    model = build(cfg, device, ckpt=False)
    opt = build_optimizer("adamw", model, lr=1e-4, weight_decay=0.0, momentum=0.9)
    rng = np.random.default_rng(0)

    def batch_of(n: int) -> dict[str, torch.Tensor]:
        return to_torch(make_batch(rng, n, cfg["seq"], cfg["vocab"]), device)

    budget = None if device.type == "cuda" else 64 * 2**20
    try_step = make_trial_step(model, opt, batch_of, loss=LOSS, device=device, precision="bf16",
                               max_memory_bytes=budget, timed_steps=2)
    search = find_max_micro_batch(try_step, limit=limit)
    return {"max_micro_batch_size": search.max_micro_batch_size, "hit_limit": search.hit_limit,
            "limit": limit, "memory_budget_bytes": budget, "precision": "bf16",
            "seq": cfg["seq"], "trials": [vars(t) for t in search.trials],
            "step_cost_per_worker": trial_step_cost(search.trials)}


def mib(x: float | None) -> float | None:
    return None if x is None else x / 2**20


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny model, for a CPU dry run")
    ap.add_argument("--warmup", type=int, help="warm-up steps per variant (3; --tiny 1)")
    ap.add_argument("--steps", type=int,
                    help="timed steps per variant per round (8; --tiny 2)")
    ap.add_argument("--repeats", type=int, help="rounds over the variants (5; --tiny 2)")
    ap.add_argument("--finder-limit", type=int, default=4096,
                    help="largest micro-batch the finder tries")
    ap.add_argument("--max-seconds", type=float, default=120.0,
                    help="start no new timing round after this many seconds of the run")
    args = ap.parse_args()
    for key, full, tiny in (("warmup", 3, 1), ("steps", 8, 2), ("repeats", 5, 2)):
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else full)
    start = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu --tiny for a dry run", file=sys.stderr)
        return 2
    cfg = TINY if args.tiny else FULL
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        platform.processor() or platform.machine() or "cpu")
    peak, peak_label = peak_bf16(dev_name) if device.type == "cuda" else (None, None)
    info: dict[str, Any] = {
        "benchmark": "gpu_check", "device": str(device), "device_name": dev_name,
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "config": cfg, "loss": LOSS, "optimizer": "adamw lr 1e-4, grad_clip 1.0",
        "peak_bf16_tflops": peak, "peak_source": peak_label and
        f"NVIDIA datasheet, {peak_label}: dense bf16 (sparsity figure / 2)",
        "matmul_allow_tf32": bool(getattr(torch.backends.cuda.matmul, "allow_tf32", False)),
        "warmup": args.warmup, "steps": args.steps, "repeats": args.repeats,
    }
    if device.type == "cuda":
        info["device_total_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    args.out.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(0)
    mbs = [to_torch(make_batch(rng, cfg["batch"], cfg["seq"], cfg["vocab"]), device)
           for _ in range(2)]
    probe = build(cfg, device, ckpt=False)
    flops = model_flops(probe, cfg)
    del probe
    info["flops"] = flops
    info["tokens_per_step"] = cfg["batch"] * cfg["seq"]

    sections = [("memory", lambda: memory_check(cfg, device, mbs[0])),
                ("timing", lambda: timing_check(cfg, device, mbs, warmup=args.warmup,
                                                steps=args.steps, repeats=args.repeats,
                                                deadline=start + args.max_seconds)),
                ("equivalence", lambda: equivalence_check(cfg, device)),
                ("packing", lambda: packing_check(cfg, device, warmup=args.warmup,
                                                  steps=args.steps, repeats=args.repeats,
                                                  deadline=start + args.max_seconds)),
                ("finder", lambda: finder_check(cfg, device, limit=args.finder_limit))]
    for key, fn in sections:
        t0 = time.perf_counter()
        try:
            info[key] = fn()
        except Exception as e:  # noqa: BLE001
            info[key] = {"error": err(e), "traceback": traceback.format_exc()[-2000:]}
        info[f"{key}_wall_s"] = time.perf_counter() - t0
        free(device)

    for row in info.get("timing", {}).get("variants", {}).values():
        if "step_s" in row:
            s = row["step_s"]
            row["samples_per_s"] = cfg["batch"] / s
            row["tokens_per_s"] = cfg["batch"] * cfg["seq"] / s
            row["achieved_tflops"] = flops["flops_per_step"] / s / 1e12
            row["mfu"] = row["achieved_tflops"] / peak if peak else None
    info["wall_s"] = time.perf_counter() - start

    path = save(args.out / "gpu_check.json", info)  # first: a scarce GPU's figures kept
    report(info)
    print(f"\nwrote {path}")
    return 0


def report(info: dict[str, Any]) -> None:
    cfg, fl = info["config"], info["flops"]
    print(f"gpu_check on {info['device_name']} ({info['device']}), torch {info['torch']}, "
          f"cuda {info['cuda']}")
    print(f"seq_transformer d{cfg['d_model']} h{cfg['nhead']} L{cfg['num_layers']} "
          f"ffn{cfg['dim_feedforward']}, batch {cfg['batch']} x seq {cfg['seq']}, "
          f"{fl['non_embedding_params'] / 1e6:.2f} M non-embedding params, "
          f"{fl['flops_per_step'] / 1e12:.3f} TFLOP/step (model), peak bf16 "
          f"{fmt(info['peak_bf16_tflops'], '.1f')} TFLOP/s")
    t = info.get("timing", {})
    print(f"\n{'variant':<11}{'step ms':>9}{'x fp32':>8}{'samples/s':>11}{'tokens/s':>11}"
          f"{'TFLOP/s':>9}{'MFU':>7}{'skipped':>9}  note")
    for name, row in t.get("variants", {}).items():
        skipped = f"{row.get('skipped_warmup', 0)}+{row.get('skipped_timed', 0)}"
        s = row.get("step_s")
        print(f"{name:<11}{fmt(s and s * 1e3, '.1f'):>9}"
              f"{fmt(row.get('time_ratio_vs_fp32'), '.3f'):>8}"
              f"{fmt(row.get('samples_per_s'), '.0f'):>11}{fmt(row.get('tokens_per_s'), '.0f'):>11}"
              f"{fmt(row.get('achieved_tflops'), '.1f'):>9}"
              f"{fmt(row.get('mfu') and row['mfu'] * 100, '.1f'):>6}%{skipped:>9}  "
              f"{row.get('error', '')}")
    if "error" in t:
        print(f"timing failed: {t['error']}")
    print(f"rounds done: {t.get('rounds_done')}; skipped = fp16 steps skipped by the scaler "
          "(warm-up+timed); x fp32 = step-time ratio, median over rounds")
    if "ckpt_time_ratio_bf16" in t:
        print(f"activation checkpointing step-time cost (bf16): x{t['ckpt_time_ratio_bf16']:.3f}")
    m = info.get("memory", {})
    print("\nmemory, bf16, one step   saved-for-backward   peak allocated  peak - resident")
    for key in ("ckpt_off", "ckpt_on"):
        row = m.get(key, {})
        saved, peak, above = (row.get(k) for k in ("saved_tensor_bytes", "peak_bytes",
                                                    "peak_above_resident_bytes"))
        print(f"  {key:<22}{fmt(mib(saved), '.1f'):>16} MiB{fmt(mib(peak), '.1f'):>13} MiB"
              f"{fmt(mib(above), '.1f'):>13} MiB  {row.get('error', '')}")
    if "saved_bytes_ratio_on_over_off" in m:
        print(f"  saved bytes on/off: {m['saved_bytes_ratio_on_over_off']:.3f}", end="")
        print(f"; peak on/off: {m['peak_ratio_on_over_off']:.3f}"
              if "peak_ratio_on_over_off" in m else "")
    e = info.get("equivalence", {})
    if "error" in e:
        print(f"\nequivalence: ERROR {e['error']}")
    else:
        print(f"\nequivalence (fp32 SGD step, batch {e['batch']} as 1 vs {e['micro_batches']} "
              f"micro-batches): max|dw| = {e['max_abs_weight_diff']:.3e}, max|update| = "
              f"{e['max_abs_update']:.3e}, ratio {e['diff_over_update']:.2e} "
              f"({'ok' if e['ok'] else 'MISMATCH'}); loss {e['loss_whole']:.6f} vs "
              f"{e['loss_accumulated']:.6f}")
    pk = info.get("packing", {})
    if pk.get("variants"):
        print(f"\npacked sequences: {pk['samples']} samples, {pk['real_tokens']} real tokens, "
              f"bf16; useful {pk['useful_flops_per_step'] / 1e12:.3f} TFLOP/step; medians "
              f"over {pk.get('rounds_done')} round(s)")
        print(f"  {'variant':<14}{'slots':>8}{'step ms':>9}{'x padded':>9}{'real tok/s':>12}"
              f"{'MFU':>7}  note")
        for name, row in pk["variants"].items():
            s = row.get("step_s")
            print(f"  {name:<14}{row['slots']:>8}{fmt(s and s * 1e3, '.1f'):>9}"
                  f"{fmt(row.get('time_ratio_vs_padded'), '.3f'):>9}"
                  f"{fmt(row.get('real_tokens_per_s'), '.0f'):>12}"
                  f"{fmt(row.get('mfu') and row['mfu'] * 100, '.1f'):>6}%  {row.get('error') or ''}")
        print(f"  flex vs dense mask, fp32: loss rel diff {fmt(pk.get('loss_rel_diff'), '.1e')}, "
              f"grad max rel diff {fmt(pk.get('grad_max_rel_diff'), '.1e')}"
              f"{'  ' + pk['equivalence_error'] if 'equivalence_error' in pk else ''}")
    elif "error" in pk:
        print(f"\npacking: ERROR {pk['error']}")
    f = info.get("finder", {})
    if "error" in f:
        print(f"\nfinder: ERROR {f['error']}")
    elif f:
        print(f"\nlargest micro-batch (bf16, {f['seq']} tokens): {f['max_micro_batch_size']}"
              f"{' (the limit)' if f['hit_limit'] else ''}")
        print("  " + "  ".join(f"{t['micro_batch_size']}{'' if t['fits'] else 'x'}:"
                               f"{fmt(mib(t['peak_memory_bytes']), '.0f')}MiB"
                               for t in f["trials"]))
        print(f"  step cost c = {fmt(f.get('step_cost_per_worker'), '.0f')} samples per worker "
              "(the adaptive schedule's throughput model)")
    print(f"wall {info['wall_s']:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
