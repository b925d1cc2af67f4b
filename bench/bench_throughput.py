#!/usr/bin/env python
"""Throughput and memory of three batching recipes on one model, in one run.

  A     one example per row, padded to the longest example of the batch (8 examples a step)
  C     one example per row, every row padded to max_length (8 examples a step)
  ours  the product's packing: rows of up to max_length tokens (best-fit-decreasing), position
        ids restarting per example, attention_mask=None, use_cache=False (8 rows a step)

All three run on the same model (4-bit nf4 + double quant base through the product's
``load_base_model``), the same LoRA start, a fresh AdamW each, and the product's own optimizer
step (``trainer.recipe._RecipeRun._optimizer_step``, in trainer/step.py: collate, forward, summed
token loss, backward, clip, AdamW). Next to the speed it checks that the packed loss of one batch equals
the sum of the examples' losses run one by one.

    python bench/bench_throughput.py --model tiny                     # CPU, seconds
    python bench/bench_throughput.py --model qwen3-0.6b --device cuda # GPU (see bench/README.md)
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from trainer.data import IGNORE_INDEX, Example  # noqa: E402
from trainer.model import (adapter_state_dict, attach_lora, compute_dtype,  # noqa: E402
                           load_adapter_state, load_base_model, pick_device, resolve_precision,
                           trainable_parameters)
from trainer.packing import collate, plan_batches  # noqa: E402
from trainer.distributed import Ranks  # noqa: E402
from trainer.recipe import _RecipeRun  # noqa: E402
from trainer.schedule import make_scheduler  # noqa: E402

ROWS = 8                 # rows (A, C: examples) per optimizer step
LR = 2e-4
LORA = {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "lora_target_modules": "all-linear"}
LENGTH_SIGMA = 0.8       # lognormal sigma: median 341 / mean 468 / p90 ~980 at max_length 2048
REL_TOL = 1e-5   # a correct packed forward gives ~5e-8 on CPU; cross-example attention ~7e-5
RECIPES = ("A", "C", "ours")

# Qwen3-0.6B's shape (shared/ANCHORS.md), random weights.
QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                 tie_word_embeddings=True, max_position_embeddings=40960, rope_theta=1_000_000.0,
                 rms_norm_eps=1e-6, eos_token_id=151645, pad_token_id=151643, bos_token_id=151643)


# ----------------------------------------------------------------------------- model and data

def build_base(kind: str, tmp: Path, seed: int, max_length: int) -> tuple[Path, int, tuple[int, int]]:
    """A base folder; returns (path, pad id, [low, high) range for synthetic token ids)."""
    if kind == "tiny":
        from trainer.tiny_base import SPECIAL_TOKENS, build_tiny_base

        base = build_tiny_base(tmp / "tiny", seed=seed, max_position_embeddings=max(2048, max_length))
        cfg = json.loads((base / "config.json").read_text())
        return base, int(cfg["pad_token_id"]), (len(SPECIAL_TOKENS), int(cfg["vocab_size"]))
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**QWEN3_06B)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    base = tmp / "qwen3-0.6b"
    model.save_pretrained(base)
    del model
    gc.collect()
    return base, QWEN3_06B["pad_token_id"], (0, QWEN3_06B["pad_token_id"])


def synthetic_examples(max_length: int, token_budget: int, id_range: tuple[int, int],
                       seed: int, min_examples: int = 512) -> list[Example]:
    """Lognormal lengths (median 350 * max_length / 2048), clipped to [32, max_length]; labels on
    the second half of each example (a completion). Enough examples for *token_budget* tokens."""
    rng = np.random.default_rng(seed)
    median = 350.0 * max_length / 2048
    lo = min(32, max_length)
    lengths: list[int] = []
    while len(lengths) < min_examples or sum(lengths) < token_budget:
        n = int(rng.lognormal(math.log(median), LENGTH_SIGMA))
        lengths.append(min(max_length, max(lo, n)))
    examples = []
    for i, n in enumerate(lengths):
        ids = rng.integers(id_range[0], id_range[1], size=n).tolist()
        half = n // 2
        examples.append(Example(ids, [IGNORE_INDEX] * half + ids[half:], i + 1))
    return examples


# ----------------------------------------------------------------------------- plans (batches -> rows -> example ids)

def recipe_plans(examples: list[Example], max_length: int, pad_id: int, seed: int
                 ) -> tuple[dict[str, list[list[list[int]]]], list[Example]]:
    """The three plans over one example list. C pads each row to max_length with a padding
    "example" (pad ids, labels -100) placed after it: collate then builds exactly the row that
    its own padding would (a segment of its own, positions restarting at 0), max_length wide."""
    lengths = [len(e.input_ids) for e in examples]
    ours = plan_batches(lengths, max_length=max_length, rows_per_batch=ROWS, packing=True, seed=seed)
    a = plan_batches(lengths, max_length=max_length, rows_per_batch=ROWS, packing=False, seed=seed)
    pool = list(examples)
    pad_of: dict[int, int] = {}
    for i, n in enumerate(lengths):
        if n < max_length:
            pad_of[i] = len(pool)
            pool.append(Example([pad_id] * (max_length - n), [IGNORE_INDEX] * (max_length - n), 0))
    c = [[[i, pad_of[i]] if i in pad_of else [i] for (i,) in batch] for batch in a]
    return {"A": a, "C": c, "ours": ours}, pool


def batch_shape(batch: list[list[int]], pool: list[Example], n_real: int) -> tuple[int, int]:
    """(real tokens, computed tokens) of one planned batch; ids >= n_real are C's padding."""
    real = sum(len(pool[i].input_ids) for row in batch for i in row if i < n_real)
    width = max(sum(len(pool[i].input_ids) for i in row) for row in batch)
    return real, width * len(batch)


# ----------------------------------------------------------------------------- measuring

def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak(device: torch.device) -> None:
    """Start a fresh peak: CUDA's allocator counter, or the kernel's RSS high-water mark
    (writing 5 to /proc/self/clear_refs resets VmHWM, Linux >= 4.0)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # glibc keeps freed heap pages; give them back so each step's RSS starts level
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def read_peak(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    hwm = _status_kb("VmHWM")
    if hwm is None:
        import psutil
        return int(psutil.Process().memory_info().rss)
    return hwm


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_runner(model: Any, device: torch.device, pool: list[Example], pad_id: int) -> _RecipeRun:
    """The product's step without its job machinery: only what ``_optimizer_step`` and
    ``_loss_sum`` read. A fresh AdamW (torch, no weight decay, lr 2e-4) and a constant lr."""
    r = _RecipeRun.__new__(_RecipeRun)
    r.model, r.device, r.train_ex, r.pad_id = model, device, pool, pad_id
    r.ranks, r.step = Ranks(), 0        # one process; the step number seeds dropout
    r.micro_rows = ROWS
    r.cfg = {"max_grad_norm": 1.0, "batch_size": ROWS, "max_length": 0}
    r.ga = 1
    r.precision = resolve_precision("auto", device)
    r.scaler = torch.amp.GradScaler(device.type, enabled=r.precision == "fp16")
    r.params = trainable_parameters(model)
    r.optimizer = torch.optim.AdamW(r.params, lr=LR, weight_decay=0.0)
    r.scheduler = make_scheduler(r.optimizer, "constant", 0, 1)
    return r


def run_interleaved(plans: dict[str, list[list[list[int]]]], pool: list[Example], n_real: int,
                    model: Any, device: torch.device, pad_id: int, steps: int, warmup: int
                    ) -> dict[str, dict[str, Any]]:
    """Round k runs step k of every recipe (the order rotating each round), so a noisy
    neighbour or clock drift hits all three alike. Each recipe keeps its own adapter weights and
    AdamW (swapped in before its step, outside the timing), all from the same LoRA start."""
    start = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    runners = {name: make_runner(model, device, pool, pad_id) for name in RECIPES}
    adapters = {name: start for name in RECIPES}
    rec: dict[str, dict[str, list]] = {
        n: {"t": [], "real": [], "comp": [], "loss": [], "peak": [], "above": []} for n in RECIPES}
    model.train()
    for k in range(warmup + steps):
        for j in range(len(RECIPES)):
            name = RECIPES[(k + j) % len(RECIPES)]
            batch = plans[name][k % len(plans[name])]
            load_adapter_state(model, adapters[name])
            reset_peak(device)
            sync(device)
            resting = (int(torch.cuda.memory_allocated(device)) if device.type == "cuda"
                       else _status_kb("VmRSS") or 0)
            t0 = time.perf_counter()
            info = runners[name]._optimizer_step([batch], capture_grads=False)
            sync(device)
            dt = time.perf_counter() - t0
            peak = read_peak(device)
            adapters[name] = {k2: v.clone() for k2, v in adapter_state_dict(model).items()}
            r = rec[name]
            r["peak"].append(peak)
            r["above"].append(peak - resting)
            if k >= warmup:
                real, comp = batch_shape(batch, pool, n_real)
                r["t"].append(dt)
                r["real"].append(real)
                r["comp"].append(comp)
                r["loss"].append(info["loss"])
    load_adapter_state(model, adapters["ours"])   # the correctness check runs on ours' weights
    out = {}
    for name in RECIPES:
        r = rec[name]
        rates = [a / t for a, t in zip(r["real"], r["t"])]
        out[name] = {
            "recipe": name,
            "steps_timed": steps,
            "real_tokens_per_step": sum(r["real"]) / steps,
            "computed_tokens_per_step": sum(r["comp"]) / steps,
            "padding_fraction": 1.0 - sum(r["real"]) / sum(r["comp"]),
            "median_step_s": statistics.median(r["t"]),
            "tokens_per_s": statistics.median(rates),
            "tokens_per_s_total": sum(r["real"]) / sum(r["t"]),
            "tokens_per_s_best": max(rates),
            "min_step_s": min(r["t"]),
            "step_time_spread_p90_over_p10": float(np.percentile(r["t"], 90) / np.percentile(r["t"], 10)),
            "peak_memory_bytes": max(r["peak"]),
            "step_memory_bytes": max(r["above"]),
            "memory_kind": ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                            else "process peak RSS (VmHWM, reset before each step)"),
            "step_memory_note": "peak minus the memory in use just before the step (activations, "
                                "gradients, optimizer update, transients)",
            "step_times_s": [round(t, 5) for t in r["t"]],
            "losses": [round(x, 5) for x in r["loss"]],
        }
    return out


@torch.no_grad()
def packed_equals_one_by_one(model: Any, device: torch.device, examples: list[Example],
                             rows: list[list[int]], pad_id: int) -> dict[str, Any]:
    """Summed token loss of one packed batch vs the sum over its examples run alone (eval mode,
    so dropout is off), both through the product's ``_loss_sum``."""
    runner = make_runner(model, device, examples, pad_id)
    model.eval()
    try:
        packed = float(runner._loss_sum(collate(examples, rows, pad_id).to(device)))
        alone = 0.0
        for row in rows:
            for i in row:
                alone += float(runner._loss_sum(collate(examples, [[i]], pad_id).to(device)))
    finally:
        model.train()
    rel = abs(packed - alone) / max(abs(alone), 1e-12)
    return {"packed_loss_sum": packed, "one_by_one_loss_sum": alone, "relative_difference": rel,
            "tolerance": REL_TOL, "rows": len(rows), "examples": sum(len(r) for r in rows),
            "passed": bool(rel < REL_TOL)}


# ----------------------------------------------------------------------------- report

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {model}, {torch.get_num_threads()} torch threads"


def versions() -> dict[str, str]:
    import bitsandbytes
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__}


def markdown_table(results: dict[str, dict[str, Any]], gpu: bool) -> str:
    mem = "GPU mem" if gpu else "RSS"
    lines = [f"| recipe | real tokens/step | padding | median step (s) | real tokens/s | tokens/s vs A "
             f"| tokens/s vs C | peak {mem} (GiB) | step's own {mem} (MiB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in RECIPES:
        r = results[name]
        lines.append(f"| {name} | {r['real_tokens_per_step']:,.0f} | {100 * r['padding_fraction']:.1f} % "
                     f"| {r['median_step_s']:.4f} | {r['tokens_per_s']:,.0f} "
                     f"| {r['vs_A']['tokens_per_s']:.2f}x | {r['vs_C']['tokens_per_s']:.2f}x "
                     f"| {r['peak_memory_bytes'] / 2**30:.3f} | {r['step_memory_bytes'] / 2**20:,.0f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("tiny", "qwen3-0.6b"), default="tiny")
    p.add_argument("--max-length", type=int, default=None,
                   help="row / padding length (default 2048 for qwen3-0.6b, 256 for tiny)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per recipe")
    p.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps per recipe first")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--attn", choices=("sdpa", "eager", "flex_attention"), default="sdpa")
    p.add_argument("--gradient-checkpointing", choices=("auto", "on", "off"), default="auto",
                   help="auto: on for qwen3-0.6b, off for tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default bench/results/<model>_<device>_L<max_length>.json)")
    a = p.parse_args(argv)
    if a.max_length is None:
        a.max_length = 2048 if a.model == "qwen3-0.6b" else 256
    if a.steps < 1 or a.warmup < 0 or a.max_length < 32:
        p.error("need --steps >= 1, --warmup >= 0, --max-length >= 32")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python " + shlex.join([os.path.relpath(sys.argv[0], REPO) if argv is None else
                                      "bench/bench_throughput.py"] + (sys.argv[1:] if argv is None else argv))
    device = pick_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    gc_on = {"on": True, "off": False}.get(args.gradient_checkpointing, args.model == "qwen3-0.6b")
    out = args.out or REPO / "bench" / "results" / f"{args.model}_{device.type}_L{args.max_length}.json"
    torch.manual_seed(args.seed)

    with tempfile.TemporaryDirectory(prefix="bench-base-") as tmp:
        t = time.perf_counter()
        base, pad_id, id_range = build_base(args.model, Path(tmp), args.seed, args.max_length)
        budget = int(1.3 * (args.steps + args.warmup) * ROWS * args.max_length)
        examples = synthetic_examples(args.max_length, budget, id_range, args.seed)
        lengths = [len(e.input_ids) for e in examples]
        plans, pool = recipe_plans(examples, args.max_length, pad_id, args.seed)
        model = load_base_model(base, use_qlora=True, device=device, attn_implementation=args.attn,
                                gradient_checkpointing=gc_on, precision=resolve_precision("auto", device))
        torch.manual_seed(args.seed)
        model = attach_lora(model, LORA)
        n_trainable = sum(p.numel() for p in trainable_parameters(model))
        setup_s = time.perf_counter() - t
    print(f"{args.model} on {device_name(device)}: {n_trainable:,} trainable LoRA parameters, "
          f"{len(examples)} examples (median {int(np.median(lengths))}, mean {np.mean(lengths):.0f}, "
          f"p90 {int(np.percentile(lengths, 90))} tokens), max_length {args.max_length}, "
          f"attn {args.attn}, gradient checkpointing {'on' if gc_on else 'off'}; setup {setup_s:.1f}s",
          flush=True)

    results = run_interleaved(plans, pool, len(examples), model, device, pad_id, args.steps,
                              args.warmup)
    for name, r in results.items():
        print(f"  {name:4s}: {r['tokens_per_s']:,.0f} real tokens/s, median step {r['median_step_s']:.4f}s, "
              f"padding {100 * r['padding_fraction']:.1f} %", flush=True)
    for name, r in results.items():
        for ref in ("A", "C"):
            r[f"vs_{ref}"] = {
                "tokens_per_s": r["tokens_per_s"] / results[ref]["tokens_per_s"],
                "real_tokens_per_step": r["real_tokens_per_step"] / results[ref]["real_tokens_per_step"],
                "median_step_s": r["median_step_s"] / results[ref]["median_step_s"],
                "peak_memory": r["peak_memory_bytes"] / results[ref]["peak_memory_bytes"],
                "step_memory": r["step_memory_bytes"] / max(results[ref]["step_memory_bytes"], 1),
            }

    spread = max(r["step_time_spread_p90_over_p10"] for r in results.values())
    if spread > 2.0:
        print(f"note: step times are noisy (p90/p10 up to {spread:.1f}x): another process is probably "
              f"using the machine; compare runs with care", flush=True)
    # correctness next to speed: LoRA has trained a few steps by now, so it is not a no-op
    check = packed_equals_one_by_one(model, device, examples, plans["ours"][0], pad_id)
    print(markdown_table(results, device.type == "cuda"))
    print(f"packed == one by one: packed loss sum {check['packed_loss_sum']:.6f}, one by one "
          f"{check['one_by_one_loss_sum']:.6f}, relative difference {check['relative_difference']:.2e} "
          f"({check['examples']} examples in {check['rows']} rows): "
          f"{'PASSED' if check['passed'] else 'FAILED'} (tolerance {REL_TOL:g})")

    report = {
        "command": command,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": device_name(device),
        "device_type": device.type,
        "versions": versions(),
        "settings": {"model": args.model, "max_length": args.max_length, "rows_per_step": ROWS,
                     "steps": args.steps, "warmup": args.warmup, "seed": args.seed,
                     "attn_implementation": args.attn, "gradient_checkpointing": gc_on,
                     "quantization": "4-bit nf4, double quant", "compute_dtype": str(compute_dtype(device)),
                     "lora": LORA, "trainable_parameters": n_trainable,
                     "optimizer": f"torch.optim.AdamW lr {LR}, weight_decay 0, max_grad_norm 1.0",
                     "torch_threads": torch.get_num_threads()},
        "data": {"examples": len(examples), "median_tokens": float(np.median(lengths)),
                 "mean_tokens": float(np.mean(lengths)), "p90_tokens": float(np.percentile(lengths, 90)),
                 "lengths": f"lognormal(log(350*max_length/2048), {LENGTH_SIGMA}) clipped to "
                            f"[32, max_length]; labels on the second half"},
        "recipes": results,
        "correctness": check,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0 if check["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
