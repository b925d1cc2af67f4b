#!/usr/bin/env python
"""The GPU bench: one model, one data set, three trainers, real tokens/s, peak memory and MFU.

  A     transformers.Trainer + peft prepare_model_for_kbit_training + get_peft_model,
        DataCollatorForSeq2Seq(padding="longest"): the usual QLoRA notebook (8 examples a step)
  B     TRL SFTTrainer(packing=True, packing_strategy="bfd", padding_free=True), sdpa
        (8 packed rows of max_length a step); "not run: trl not installed" where TRL is missing
  ours  the product's own step through its worker (SubprocessTrainer -> trainer.worker ->
        QLoRATrainer: packed rows, chunked loss, bf16 autocast, gradient checkpointing auto)
        on a JSONL file, 8 rows of max_length a step

Same base (Qwen3-0.6B-shaped, random weights, vocab 151,936, 28 layers; 4-bit nf4 + double
quant, bf16 compute on a GPU), the same LoRA (r 16, alpha 32, dropout 0.05, all linear layers),
AdamW lr 2e-4 constant, the same chat records (lognormal lengths, median ~350 tokens at
max_length 2048) tokenized once by the base's tokenizer and chat template, loss on the
assistant tokens. Each recipe runs in its own process (clean memory); the parent samples NVML
for the device's used memory meanwhile.

Per recipe: real (non-pad) tokens/s over the timed steps (after warm-up), peak
``max_memory_allocated`` (and NVML's peak used memory, the whole device), MFU = useful FLOPs /
measured bf16 matmul peak, with useful FLOPs per real token = 4 x the base's matmul parameters
(forward 2N, backward to the activations 2N; the frozen weights get no gradient), the loss at
the end (a sanity check that all learn). Plus: the product's packed loss equals the examples
run one by one (bench_throughput.packed_equals_one_by_one).

    bash bench/gpu_bench.sh            # on the GPU machine (see bench/README.md)
    python bench/gpu_bench.py --smoke  # CPU, tiny base, < 90 s: keeps the script from rotting
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RECIPES = ("A", "B", "ours")
LORA_R, LORA_ALPHA, LORA_DROPOUT, LR, ROWS = 16, 32, 0.05, 2e-4, 8
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


# ----------------------------------------------------------------------------- setup (parent)

def build(work: Path, smoke: bool, max_length: int, records: int, seed: int) -> dict[str, Any]:
    """The base (with the tiny base's tokenizer and chat template) and the JSONL of chat records."""
    import numpy as np

    from trainer.tiny_base import build_tiny_base

    tiny = build_tiny_base(work / "tiny", seed=seed, max_position_embeddings=max(2048, max_length))
    if smoke:
        base = tiny
    else:
        import shutil

        from bench_throughput import build_base
        base, _, _ = build_base("qwen3-0.6b", work, seed, max_length)
        for name in TOKENIZER_FILES:
            if (tiny / name).exists():
                shutil.copy(tiny / name, base / name)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    corpus = tok((REPO / "trainer" / "assets" / "corpus.txt").read_text(encoding="utf-8"))["input_ids"]
    rng = np.random.default_rng(seed)
    median = 350.0 * max_length / 2048
    data = work / "chat.jsonl"
    with open(data, "w", encoding="utf-8") as fh:
        for _ in range(records):
            n = int(min(max_length - 16, max(24, rng.lognormal(math.log(median), 0.8))))
            parts = []
            for share in (0.5, 0.5):      # user, assistant: slices of the corpus, decoded to text
                k = max(4, int(n * share))
                start = int(rng.integers(0, max(1, len(corpus) - k)))
                parts.append(tok.decode(corpus[start:start + k]).strip() or "ok")
            fh.write(json.dumps({"messages": [{"role": "user", "content": parts[0]},
                                              {"role": "assistant", "content": parts[1]}]}) + "\n")
    return {"base": str(base), "data": str(data)}


def tokenized(base: str, data: str, max_length: int) -> list[dict[str, list[int]]]:
    """input_ids + assistant mask per record, by the base's chat template (A and B)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(base, local_files_only=True)
    out = []
    for line in Path(data).read_text(encoding="utf-8").splitlines():
        enc = tok.apply_chat_template(json.loads(line)["messages"], tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        ids, mask = list(enc["input_ids"])[:max_length], list(enc["assistant_masks"])[:max_length]
        out.append({"input_ids": ids, "assistant_masks": mask,
                    "labels": [t if m else -100 for t, m in zip(ids, mask)]})
    return out


def matmul_peak(device: str) -> dict[str, Any]:
    """Measured dense matmul throughput: bf16 8192^3 on a GPU, fp32 1024^3 on CPU."""
    import torch
    if device == "cuda":
        n, dtype, reps = 8192, torch.bfloat16, 50
    else:
        n, dtype, reps = 1024, torch.float32, 10
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"flops_per_s": 2 * n ** 3 * reps / dt, "shape": f"{n}^3 {str(dtype).replace('torch.', '')}"}


def matmul_params(base: str) -> int:
    """Parameters that take part in a matmul per token: every linear weight of the decoder and
    the output head (embedding lookups excluded; a tied head counts once, as the head)."""
    cfg = json.loads((Path(base) / "config.json").read_text())
    h, i, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i
    return L * per_layer + h * cfg["vocab_size"]


class NvmlSampler:
    """Peak used memory of GPU 0 (NVML) while a recipe runs; None without NVML/GPU."""

    def __init__(self) -> None:
        self.peak: int | None = None
        self._stop = threading.Event()
        self._handle = None
        try:
            import pynvml
            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._nvml = pynvml
        except Exception:  # noqa: BLE001 - no NVIDIA GPU / driver
            self._handle = None

    def __enter__(self) -> "NvmlSampler":
        if self._handle is not None:
            self.base = self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used
            self.peak = 0
            self._t = threading.Thread(target=self._run, daemon=True)
            self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            used = self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used
            self.peak = max(self.peak or 0, used - self.base)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()


# ----------------------------------------------------------------------------- recipes (child)

def _hf_model(base: str, device: str, gc_on: bool) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        base, local_files_only=True, dtype=dtype, attn_implementation="sdpa",
        device_map={"": 0 if device == "cuda" else "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype))
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc_on)
    return get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
                                            target_modules="all-linear", task_type="CAUSAL_LM"))


class _StepClock:
    """A TrainerCallback timing each optimizer step (synchronised) and keeping its loss."""

    def __init__(self, device: str) -> None:
        from transformers import TrainerCallback
        clock = self

        class CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001
                clock._sync()
                clock._t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
                clock._sync()
                clock.times.append(time.perf_counter() - clock._t0)

            def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
                if logs and "loss" in logs:
                    clock.losses.append(float(logs["loss"]))
        self.device, self.times, self.losses, self._t0 = device, [], [], 0.0
        self.callback = CB()

    def _sync(self) -> None:
        if self.device == "cuda":
            import torch
            torch.cuda.synchronize()


def _training_args(out: Path, device: str, steps: int, **extra: Any) -> dict[str, Any]:
    return dict(output_dir=str(out), per_device_train_batch_size=ROWS, gradient_accumulation_steps=1,
                max_steps=steps, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
                weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", logging_steps=1,
                save_strategy="no", report_to=[], bf16=device == "cuda", use_cpu=device != "cuda",
                dataloader_num_workers=0, seed=0, disable_tqdm=True, **extra)


def recipe_a(s: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    rows = tokenized(s["base"], s["data"], s["max_length"])
    tok = AutoTokenizer.from_pretrained(s["base"], local_files_only=True)
    model = _hf_model(s["base"], s["device"], s["gradient_checkpointing"])
    real: list[int] = []
    inner = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)

    def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
        real.append(sum(len(f["input_ids"]) for f in features))
        return inner([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features])

    clock = _StepClock(s["device"])
    args = TrainingArguments(**_training_args(Path(s["work"]) / "A", s["device"], s["steps"] + s["warmup"],
                                              remove_unused_columns=False,
                                              gradient_checkpointing=s["gradient_checkpointing"],
                                              gradient_checkpointing_kwargs={"use_reentrant": False}))
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[clock.callback])
    if s["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    return _summary(clock.times, real[:len(clock.times)], clock.losses, s)


def recipe_b(s: dict[str, Any]) -> dict[str, Any]:
    try:
        import datasets
        from trl import SFTConfig, SFTTrainer
    except ImportError as exc:
        return {"status": f"not run: trl not installed ({exc.name})"}
    import torch
    from transformers import AutoTokenizer

    rows = tokenized(s["base"], s["data"], s["max_length"])
    ds = datasets.Dataset.from_list([{"input_ids": r["input_ids"], "assistant_masks": r["assistant_masks"]}
                                     for r in rows])
    tok = AutoTokenizer.from_pretrained(s["base"], local_files_only=True)
    model = _hf_model(s["base"], s["device"], s["gradient_checkpointing"])
    clock = _StepClock(s["device"])
    cfg = SFTConfig(**_training_args(Path(s["work"]) / "B", s["device"], s["steps"] + s["warmup"],
                                     max_length=s["max_length"], packing=True, packing_strategy="bfd",
                                     padding_free=True,   # the assistant_masks column: loss on answers
                                     gradient_checkpointing=s["gradient_checkpointing"],
                                     gradient_checkpointing_kwargs={"use_reentrant": False}))
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[clock.callback])
    # real tokens per step: the packed rows hold no padding (padding_free), so a step's tokens
    # are its batch's input ids; count them as the trainer's collator hands batches over
    real: list[int] = []
    inner = trainer.data_collator

    def counting(features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = inner(features)
        real.append(int(batch["input_ids"].numel()))
        return batch
    trainer.data_collator = counting
    trainer.train_dataset = trainer.train_dataset  # (packed at construction)
    if s["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    return _summary(clock.times, real[:len(clock.times)], clock.losses, s)


def recipe_ours(s: dict[str, Any]) -> dict[str, Any]:
    """The product's worker on the JSONL: the timed steps are the step events' own."""
    from daemon.config import Config, config_to_dict
    from trainer.interface import Command
    from trainer.subprocess_trainer import SubprocessTrainer
    from trainer.train import make_job

    cfg = config_to_dict(Config(base_model=s["base"], max_length=s["max_length"], batch_size=ROWS,
                                gradient_accumulation=1, lora_r=LORA_R, lora_alpha=LORA_ALPHA,
                                lora_dropout=LORA_DROPOUT, learning_rate=LR, lr_scheduler="constant",
                                warmup_steps=0, weight_decay=0.0, epochs=1, eval_fraction=0.0,
                                checkpoint_every_steps=100_000, layer_activity_every_steps=100_000,
                                gradient_checkpointing=s["gradient_checkpointing"], worker_timeout_s=900,
                                device="cuda" if s["device"] == "cuda" else "cpu"))
    want = s["steps"] + s["warmup"]
    steps: list[dict[str, Any]] = []

    class Sink:
        def emit(self, ev: dict[str, Any]) -> None:
            if ev.get("event") == "step":
                steps.append(ev)

    class StopAfter:
        def poll(self) -> Command | None:
            return Command.STOP if len(steps) >= want else None

        def wait(self, timeout: float) -> Command | None:
            time.sleep(min(timeout, 0.1))
            return self.poll()

    job = make_job(Path(s["data"]), Path(s["work"]) / "ours-home", cfg, job_id=1)
    result = SubprocessTrainer().run(job, Sink(), StopAfter())
    if len(steps) < want:
        raise RuntimeError(f"the worker ended after {len(steps)} steps: {result.outcome.value} {result.reason}")
    steps = steps[:want]
    out = _summary([e["step_time_s"] for e in steps], [e["tokens"] for e in steps],
                   [e["loss"] for e in steps if e["loss"] is not None], s)
    out["peak_memory_bytes"] = max(e.get("peak_memory_bytes") or 0 for e in steps) if s["device"] == "cuda" else None
    return out


def _summary(times: list[float], real: list[int], losses: list[float], s: dict[str, Any]) -> dict[str, Any]:
    import torch
    w = s["warmup"]
    t, r = times[w:], real[w:]
    if not t or len(r) != len(t):
        raise RuntimeError(f"timed {len(times)} steps, counted tokens of {len(real)}")
    tps = sum(r) / sum(t)
    return {"status": "ran", "steps_timed": len(t), "real_tokens": sum(r), "seconds": round(sum(t), 3),
            "real_tokens_per_s": tps, "final_loss": losses[-1] if losses else None,
            "first_loss": losses[0] if losses else None,
            "peak_memory_bytes": int(torch.cuda.max_memory_allocated()) if s["device"] == "cuda" else None}


def child(recipe: str, settings_file: Path) -> int:
    s = json.loads(settings_file.read_text())
    fn = {"A": recipe_a, "B": recipe_b, "ours": recipe_ours, "check": packed_check}[recipe]
    try:
        res = fn(s)
    except Exception as exc:  # noqa: BLE001 - a failing recipe is a row, not the end of the bench
        res = {"status": f"failed: {type(exc).__name__}: {exc}"[:500], "traceback": traceback.format_exc()[-3000:]}
    print("RESULT " + json.dumps(res), flush=True)
    return 0


def packed_check(s: dict[str, Any]) -> dict[str, Any]:
    import torch

    from bench_throughput import packed_equals_one_by_one
    from trainer.data import Example
    from trainer.model import attach_lora, load_base_model, resolve_precision
    from trainer.packing import plan_batches

    device = torch.device(s["device"])
    model = load_base_model(Path(s["base"]), use_qlora=True, device=device,
                            precision=resolve_precision("auto", device))
    model = attach_lora(model, {"lora_r": LORA_R, "lora_alpha": LORA_ALPHA, "lora_dropout": LORA_DROPOUT,
                                "lora_target_modules": "all-linear"})
    rows = tokenized(s["base"], s["data"], s["max_length"])[:24]
    ex = [Example(r["input_ids"], r["labels"], i + 1) for i, r in enumerate(rows)]
    plan = plan_batches([len(e.input_ids) for e in ex], max_length=s["max_length"], rows_per_batch=2,
                        packing=True, seed=0)
    from transformers import AutoTokenizer
    pad = int(AutoTokenizer.from_pretrained(s["base"], local_files_only=True).pad_token_id)
    return {"status": "ran", **packed_equals_one_by_one(model, device, ex, plan[0], pad)}


# ----------------------------------------------------------------------------- report (parent)

def versions() -> dict[str, Any]:
    import importlib.metadata as md

    import torch
    v: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                         "cuda": torch.version.cuda}
    for name in ("transformers", "peft", "bitsandbytes", "accelerate", "trl", "datasets"):
        try:
            v[name] = md.version(name)
        except md.PackageNotFoundError:
            v[name] = None
    try:
        import pynvml
        pynvml.nvmlInit()
        v["driver"] = pynvml.nvmlSystemGetDriverVersion()
    except Exception:  # noqa: BLE001
        v["driver"] = None
    return v


def device_name(device: str) -> str:
    import torch
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"CPU: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return f"CPU ({os.cpu_count()} cores)"


def table(res: dict[str, Any]) -> str:
    gib = 1 << 30
    lines = [f"GPU bench on {res['device_name']}: {res['model']}, max_length {res['max_length']}, "
             f"{ROWS} rows a step, {res['steps']} timed steps after {res['warmup']} warm-up; "
             f"matmul peak {res['matmul_peak']['flops_per_s'] / 1e12:.1f} TFLOP/s ({res['matmul_peak']['shape']})",
             "", "| recipe | real tokens/s | vs A | peak allocated (GiB) | NVML peak (GiB) | MFU | loss first -> last |",
             "|---|---|---|---|---|---|---|"]
    a = res["recipes"].get("A", {}).get("real_tokens_per_s")
    for name in RECIPES:
        r = res["recipes"].get(name, {})
        if r.get("status") != "ran":
            lines.append(f"| {name} | {r.get('status', 'not run')} | | | | | |")
            continue
        tps = r["real_tokens_per_s"]
        mem = f"{r['peak_memory_bytes'] / gib:.2f}" if r.get("peak_memory_bytes") else "-"
        nv = f"{r['nvml_peak_bytes'] / gib:.2f}" if r.get("nvml_peak_bytes") else "-"
        loss = (f"{r['first_loss']:.3f} -> {r['final_loss']:.3f}" if r.get("final_loss") is not None else "-")
        lines.append(f"| {name} | {tps:,.0f} | {tps / a:.2f}x | {mem} | {nv} | {r['mfu']:.1%} | {loss} |"
                     if a else f"| {name} | {tps:,.0f} | - | {mem} | {nv} | {r['mfu']:.1%} | {loss} |")
    c = res.get("packed_check", {})
    if c.get("status") == "ran":
        lines.append(f"\npacked loss vs one by one: relative difference {c['relative_difference']:.1e} "
                     f"({'passed' if c['passed'] else 'FAILED'}, tolerance {c['tolerance']:g})")
    else:
        lines.append(f"\npacked loss check: {c.get('status')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny base on CPU, a few steps (< 90 s)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu_bench.json")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per recipe (default 30; smoke 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; smoke 1)")
    ap.add_argument("--max-length", type=int, default=None, help="default 2048 (smoke 256)")
    ap.add_argument("--records", type=int, default=None, help="chat records (default 2000; smoke 120)")
    ap.add_argument("--recipes", default=",".join(RECIPES), help="which to run, e.g. A,ours")
    ap.add_argument("--recipe-timeout", type=int, default=420)
    ap.add_argument("--child", nargs=2, metavar=("RECIPE", "SETTINGS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child[0], Path(args.child[1]))

    import torch
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    steps = args.steps or (3 if args.smoke else 30)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    max_length = args.max_length or (256 if args.smoke else 2048)
    records = args.records or (120 if args.smoke else 2000)
    work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    t0 = time.monotonic()
    built = build(work, args.smoke, max_length, records, seed=0)
    from trainer.model import want_gradient_checkpointing
    gc_on = want_gradient_checkpointing("auto", Path(built["base"]))
    settings = {**built, "device": device, "max_length": max_length, "steps": steps, "warmup": warmup,
                "work": str(work), "gradient_checkpointing": gc_on}
    sfile = work / "settings.json"
    sfile.write_text(json.dumps(settings))
    peak = matmul_peak(device)
    n_params = matmul_params(built["base"])
    res: dict[str, Any] = {
        "command": "python bench/gpu_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": device,
        "device_name": device_name(device), "versions": versions(),
        "model": "tiny base (2 layers)" if args.smoke else "Qwen3-0.6B-shaped (random weights, 28 layers)",
        "matmul_params": n_params, "max_length": max_length, "rows_per_step": ROWS, "steps": steps,
        "warmup": warmup, "records": records, "gradient_checkpointing": gc_on, "matmul_peak": peak,
        "useful_flops_per_token": 4 * n_params, "recipes": {}}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"),
           "PYTHONPATH": os.pathsep.join([str(REPO / "bench"), str(REPO), os.environ.get("PYTHONPATH", "")])}
    wanted = [r for r in args.recipes.split(",") if r]
    for name in [r for r in RECIPES if r in wanted] + ["check"]:
        t = time.monotonic()
        with NvmlSampler() as nv:
            try:
                proc = subprocess.run([sys.executable, __file__, "--child", name, str(sfile)], env=env, cwd=REPO,
                                      capture_output=True, text=True, timeout=args.recipe_timeout)
                line = next((l for l in reversed(proc.stdout.splitlines()) if l.startswith("RESULT ")), None)
                r = json.loads(line[7:]) if line else {"status": f"failed: exit {proc.returncode}: "
                                                                 f"{proc.stderr.strip()[-400:]}"}
            except subprocess.TimeoutExpired:
                r = {"status": f"failed: over {args.recipe_timeout} s"}
        r["wall_s"] = round(time.monotonic() - t, 1)
        if r.get("status") == "ran" and name != "check":
            r["nvml_peak_bytes"] = nv.peak
            r["mfu"] = r["real_tokens_per_s"] * 4 * n_params / peak["flops_per_s"]
        if name == "check":
            res["packed_check"] = r
        else:
            res["recipes"][name] = r
        print(f"{name}: {r.get('status')} ({r['wall_s']} s)", flush=True)
    res["wall_s"] = round(time.monotonic() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2, default=str) + "\n")
    md = table(res)
    args.out.with_suffix(".md").write_text(md + "\n\n`" + res["command"] + "`\n")
    print(md)
    print(f"\nresult: {args.out}")
    return 0 if res["recipes"].get("ours", {}).get("status") == "ran" or "ours" not in wanted else 1


if __name__ == "__main__":
    sys.exit(main())
