"""Peak memory of the loss on a Qwen3-0.6B-shaped head: the full logits (before) vs the product's
chunked linear cross-entropy at labelled positions (trainer/packing.py), loss and backward to the
hidden states, bf16 weights and hidden states as on a GPU under autocast.

    python bench/loss_memory.py [--rows 4] [--seq 2048] [--labelled 1.0] [--out bench/results/loss_memory.json]

Each variant runs in a fresh process; its figure is the growth of the process's peak resident
memory (VmHWM) over what it held before the loss (the head's weight, the hidden states, labels),
so it counts every temporary the loss makes (logits, their fp32 copy, softmax, gradients). On a
GPU the same tensors are made, so the figure carries over to ``torch.cuda.max_memory_allocated``
up to the allocator's rounding. ``--labelled`` is the fraction of positions that carry a label
(1.0: every token trained, the worst case; chat data trains only the answers).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

HIDDEN, VOCAB = 1024, 151_936          # Qwen3-0.6B: hidden_size, vocab_size (tied embeddings)
GIB = 1 << 30


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child(variant: str, rows: int, seq: int, labelled: float) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from trainer.packing import chunked_linear_cross_entropy

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False, dtype=torch.bfloat16)
    head.weight.requires_grad_(False)                       # LoRA leaves lm_head frozen
    h = torch.randn(rows, seq, HIDDEN, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, VOCAB, (rows, seq))
    labels[torch.rand(rows, seq) >= labelled] = -100
    target = labels[:, 1:]
    torch.ones(1).sum()                                     # warm the allocator
    before_kb = _status_kb("VmRSS")
    t0 = time.perf_counter()
    if variant == "full_logits":        # what the step did before: logits everywhere, then .float()
        logits = F.linear(h, head.weight)[:, :-1, :].float()
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1), ignore_index=-100, reduction="sum")
    else:                               # the product: only labelled positions, a chunk at a time
        keep = (target != -100).reshape(-1).nonzero().squeeze(1)
        hs = h[:, :-1, :].reshape(-1, HIDDEN).index_select(0, keep)
        loss = chunked_linear_cross_entropy(hs, head, target.reshape(-1).index_select(0, keep))
    loss.backward()
    dt = time.perf_counter() - t0
    peak_kb = _status_kb("VmHWM")
    return {"variant": variant, "loss": float(loss), "grad_h_norm": float(h.grad.float().norm()),
            "peak_over_inputs_bytes": (peak_kb - before_kb) * 1024, "seconds": round(dt, 2),
            "labelled_positions": int((target != -100).sum())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--labelled", type=float, default=1.0)
    ap.add_argument("--variant", choices=("full_logits", "chunked"), help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "loss_memory.json")
    args = ap.parse_args(argv)
    if args.variant:
        print(json.dumps(child(args.variant, args.rows, args.seq, args.labelled)))
        return 0
    runs = {}
    for variant in ("chunked", "full_logits"):
        proc = subprocess.run([sys.executable, __file__, "--variant", variant, "--rows", str(args.rows),
                               "--seq", str(args.seq), "--labelled", str(args.labelled)],
                              capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise SystemExit(f"{variant} failed: {proc.stderr[-2000:]}")
        runs[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    import torch
    a, b = runs["chunked"], runs["full_logits"]
    res = {"command": "python bench/loss_memory.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "shape": {"rows": args.rows, "seq": args.seq, "hidden": HIDDEN, "vocab": VOCAB,
                     "labelled_fraction": args.labelled, "dtype": "bfloat16"},
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
           "versions": {"torch": torch.__version__, "python": platform.python_version()},
           "runs": runs, "loss_rel_diff": abs(a["loss"] - b["loss"]) / abs(b["loss"]),
           "grad_rel_diff": abs(a["grad_h_norm"] - b["grad_h_norm"]) / b["grad_h_norm"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"Qwen3-0.6B-shaped head ({HIDDEN} x {VOCAB}), {args.rows} x {args.seq} tokens, "
          f"{args.labelled:.0%} labelled, bf16, torch {torch.__version__} on {os.cpu_count()} CPUs")
    print("| loss | peak memory over its inputs | time (CPU) |\n|---|---|---|")
    for name, r in (("full logits (before)", b), ("chunked, labelled positions (now)", a)):
        print(f"| {name} | {r['peak_over_inputs_bytes'] / GIB:.2f} GiB | {r['seconds']:.1f} s |")
    print(f"same loss: relative difference {res['loss_rel_diff']:.1e}; grad norm {res['grad_rel_diff']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
