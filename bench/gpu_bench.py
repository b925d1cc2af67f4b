#!/usr/bin/env python
"""The GPU bench (issue 11): one model, one data set, the same tokens, three trainers.

  A   transformers.Trainer + peft prepare_model_for_kbit_training + get_peft_model,
      DataCollatorForSeq2Seq(padding="longest"): the usual QLoRA notebook (8 examples a step,
      padded to the longest of the batch, no packing), bf16, sdpa
  B   TRL SFTTrainer(packing=True, packing_strategy="bfd", padding_free=True), sdpa (or
      flash_attention_2 where flash-attn is installed), 8 packed rows a step; where TRL cannot be
      imported its row says "not run: trl not installed"
  C   ours: the product's own training path, trainer.recipe.QLoRATrainer on a JobSpec, in
      process (best-fit-decreasing packing into 8 rows of max_length, block-diagonal attention
      from restarting position ids, chunked loss, bf16 autocast, gradient checkpointing auto)
  C-flex (optional, --recipes): C with attn_implementation flex_attention

What is the same for all: the base (Qwen3-0.6B-shaped, random weights, bench_throughput's
QWEN3_06B and build_base; 4-bit nf4 + double quant, bf16 compute on a GPU), the LoRA (r, alpha,
dropout, target modules: core/config.py's defaults), AdamW (torch) with the config's learning
rate, weight decay and grad-norm clip, a constant schedule, gradient checkpointing by the
product's auto rule, and the data: chat records whose lengths are bench_throughput's
synthetic_examples lengths (lognormal, median ~350 tokens at max_length 2048), tokenized ONCE by
the product (trainer.data.load_examples), so A and B train the very token ids and labels C does.
Each recipe trains one epoch over all of them (the same tokens), unless it reaches its time cap
first; the loss is compared at the token count every recipe reached.

Per recipe: real (non-pad) tokens/s and padded tokens/s over the timed steps (wall time from the
end of the last warm-up step to the end of the last step, synchronised), peak memory
(torch.cuda.max_memory_allocated of the recipe's own process; on CPU its peak RSS), MFU =
6 x N_active x real tokens/s / the measured matmul peak (N_active: the weights every token goes
through, decoder linears + head), a "useful" MFU by shared/ANCHORS.md's FLOP model, the loss at
the common token count, and the versions. Each recipe runs in its own process and fails alone.

    bash bench/gpu_bench.sh            # on the GPU machine (bench/README.md, "GPU bench")
    bash bench/gpu_bench.sh --smoke    # CPU, tiny base, < 90 s on 2 cores
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
for _p in (str(REPO), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROWS = 8                              # rows (A: examples) per optimizer step, as in ANCHORS.md
DEFAULT_ORDER = ("C", "A", "B")       # ours first: the exit code depends on it
ALL_RECIPES = ("C", "A", "B", "C-flex", "C-ranks")
TABLE_ORDER = ("A", "B", "C", "C-flex", "C-ranks")
WHAT = {
    "A": "HF Trainer, pad to longest, no packing",
    "B": "TRL SFTTrainer, bfd packing, padding-free",
    "C": "ours: QLoRATrainer, packed rows, chunked loss",
    "C-flex": "ours with flex_attention",
    "C-ranks": "ours on --nproc N ranks (torchrun, 8 rows each a step)",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
TRL_MISSING = "not run: trl not installed"


# ============================================================================ setup (parent)

def product_defaults() -> dict[str, Any]:
    """LoRA and optimizer settings: core/config.py's defaults, the same for every recipe."""
    from core.config import Config
    c = Config()
    return {"lora_r": c.lora_r, "lora_alpha": c.lora_alpha, "lora_dropout": c.lora_dropout,
            "lora_target_modules": c.lora_target_modules, "learning_rate": c.learning_rate,
            "weight_decay": c.weight_decay, "max_grad_norm": c.max_grad_norm, "seed": c.seed,
            "lr_scheduler": "constant", "warmup_steps": 0, "optimizer": "torch AdamW"}


def build_base(work: Path, smoke: bool, max_length: int, seed: int) -> Path:
    """The tiny base (smoke) or bench_throughput's Qwen3-0.6B-shaped one, with the tiny base's
    tokenizer and chat template (no tokenizer can be downloaded)."""
    from trainer.tiny_base import build_tiny_base
    tiny = build_tiny_base(work / "tiny", seed=seed, max_position_embeddings=max(2048, max_length))
    if smoke:
        return tiny
    from bench_throughput import build_base as bt_build_base
    base, _, _ = bt_build_base("qwen3-0.6b", work, seed, max_length)
    for name in TOKENIZER_FILES:
        if (tiny / name).exists():
            shutil.copy(tiny / name, base / name)
    return base


def write_records(base: Path, path: Path, max_length: int, records: int, seed: int) -> None:
    """*records* single-turn chats whose token lengths are bench_throughput.synthetic_examples'
    (lognormal, median 350 * max_length / 2048, clipped to [32, max_length]): the user turn and
    the assistant turn (the loss) each about half, passages of trainer/assets/corpus.txt."""
    import numpy as np
    from bench_throughput import synthetic_examples

    from trainer.model import load_tokenizer

    tok = load_tokenizer(base)
    corpus = tok((REPO / "trainer" / "assets" / "corpus.txt").read_text(encoding="utf-8"))["input_ids"]
    empty = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
    overhead = len(tok.apply_chat_template(empty, tokenize=True, return_dict=True)["input_ids"])
    lengths = [len(e.input_ids) for e in
               synthetic_examples(max_length, 0, (0, 2), seed, min_examples=records)[:records]]
    rng = np.random.default_rng(seed + 1)
    with open(path, "w", encoding="utf-8") as fh:
        for n in lengths:
            n = max(8, min(n, max_length - 8) - overhead)
            parts = []
            for k in (n // 2, n - n // 2):
                k = max(2, k)
                start = int(rng.integers(0, len(corpus) - k))
                parts.append(tok.decode(corpus[start:start + k]).strip() or "ok")
            fh.write(json.dumps({"messages": [{"role": "user", "content": parts[0]},
                                              {"role": "assistant", "content": parts[1]}]}) + "\n")


def tokenize_once(base: Path, data: Path, out: Path, max_length: int) -> dict[str, Any]:
    """The product's tokenization of *data* (what C trains), saved for A and B; data statistics."""
    import numpy as np

    from trainer.data import IGNORE_INDEX, load_examples
    from trainer.model import load_tokenizer

    examples, report = load_examples(data, load_tokenizer(base), max_length=max_length)
    out.write_text(json.dumps([{"input_ids": e.input_ids, "labels": e.labels} for e in examples]))
    lengths = np.array([len(e.input_ids) for e in examples])
    trained = sum(sum(1 for x in e.labels if x != IGNORE_INDEX) for e in examples)
    rep = report.to_json()
    return {"examples": len(examples), "tokens": int(lengths.sum()), "trained_tokens": int(trained),
            "length_median": float(np.median(lengths)), "length_mean": round(float(lengths.mean()), 1),
            "length_p90": float(np.percentile(lengths, 90)), "length_max": int(lengths.max()),
            "sum_squared_lengths": int((lengths.astype(np.int64) ** 2).sum()),
            "records": rep.get("records"), "tokens_cut": rep.get("tokens_cut"),
            "reasons": {k: v.get("count") for k, v in (rep.get("reasons") or {}).items()}}


def matmul_peak(device: str) -> dict[str, Any]:
    """Measured dense matmul rate: bf16 8192^3 on a GPU (ANCHORS: ~790 TFLOP/s on an H200),
    fp32 1024^3 on CPU."""
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
    return {"status": "ran", "flops_per_s": 2 * n ** 3 * reps / dt,
            "shape": f"{n}^3 {str(dtype).replace('torch.', '')}", "reps": reps}


def model_flops(base: Path, lora_r: int) -> dict[str, int]:
    """N_active: weights every token passes through in a matmul (decoder linears + the head;
    embedding lookups excluded); N_lora: LoRA parameters on all decoder linears."""
    cfg = json.loads((base / "config.json").read_text())
    h, i, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]   # (in, out) per layer
    n_active = L * sum(a * b for a, b in shapes) + h * cfg["vocab_size"]
    n_lora = L * sum(lora_r * (a + b) for a, b in shapes)
    return {"n_active": n_active, "n_lora": n_lora, "layers": L, "d_attn": q}


class NvmlSampler:
    """Peak used memory of GPU 0 by NVML (the whole device, CUDA context included) while a
    recipe runs; None without NVML or a GPU."""

    def __init__(self) -> None:
        self.peak: int | None = None
        self._stop = threading.Event()
        self._handle = None
        try:
            import pynvml
            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._nvml = pynvml
        except Exception:  # noqa: BLE001 - no NVIDIA driver here
            self._handle = None

    def __enter__(self) -> NvmlSampler:
        if self._handle is not None:
            self._base = self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used
            self.peak = 0
            threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                used = self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used
            except Exception:  # noqa: BLE001
                return
            self.peak = max(self.peak or 0, used - self._base)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()


# ============================================================================ recipes (child)

def _sync(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def _peak_memory(device: str) -> int | None:
    if device == "cuda":
        import torch
        return int(torch.cuda.max_memory_allocated())
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class Steps:
    """Per optimizer step: its end (synchronised wall clock), real and padded tokens, loss.
    Also the time cap: ``over()`` once the timed part (after the warm-up) has run cap_s."""

    def __init__(self, s: dict[str, Any]) -> None:
        self.device, self.warmup, self.cap_s = s["device"], int(s["warmup"]), float(s["cap_s"])
        self.ends: list[float] = []
        self.real: list[int] = []
        self.padded: list[int] = []
        self.losses: list[float | None] = []
        self.capped = False

    def step_end(self) -> None:
        _sync(self.device)
        self.ends.append(time.perf_counter())

    def timed_start(self) -> float:
        return self.ends[self.warmup - 1] if self.warmup else self._t_start

    def over(self) -> bool:
        if len(self.ends) > self.warmup and self.ends[-1] - self.timed_start() >= self.cap_s:
            self.capped = True
        return self.capped

    def summary(self, **extra: Any) -> dict[str, Any]:
        n, w = len(self.ends), self.warmup
        if n <= w:
            raise RuntimeError(f"only {n} optimizer steps, not more than the {w} warm-up steps: "
                               "give it more records (--records) or fewer warm-up steps")
        if len(self.real) < n:
            raise RuntimeError(f"{n} steps but tokens counted for {len(self.real)}")
        secs = self.ends[-1] - self.timed_start()
        real, padded = sum(self.real[w:n]), sum(self.padded[w:n])
        curve, cum = [], 0
        for k in range(n):
            cum += self.real[k]
            loss = self.losses[k] if k < len(self.losses) else None
            curve.append([cum, loss])
        finite = [x for x in self.losses[:n] if x is not None and math.isfinite(x)]
        return {"status": "ran", "steps": n, "warmup_steps": w, "timed_steps": n - w,
                "timed_seconds": round(secs, 4), "timed_real_tokens": real, "timed_padded_tokens": padded,
                "real_tokens_per_s": real / secs, "padded_tokens_per_s": padded / secs,
                "padding_fraction": 1 - real / padded if padded else 0.0,
                "tokens_trained": sum(self.real[:n]), "cap_reached": self.capped, "cap_s": self.cap_s,
                "first_loss": finite[0] if finite else None, "final_loss": finite[-1] if finite else None,
                "peak_memory_bytes": _peak_memory(self.device),
                "peak_memory_kind": ("torch.cuda.max_memory_allocated" if self.device == "cuda"
                                     else "process peak RSS (VmHWM)"),
                "loss_curve": curve, **extra}

    _t_start = 0.0


def _load_examples(s: dict[str, Any]) -> list[dict[str, list[int]]]:
    return json.loads(Path(s["examples"]).read_text())


def _hf_model(s: dict[str, Any], attn: str) -> Any:
    """The notebook's model: 4-bit nf4 + double quant, prepare_model_for_kbit_training, peft LoRA."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cuda = s["device"] == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        s["base"], local_files_only=True, dtype=dtype, attn_implementation=attn,
        device_map={"": 0 if cuda else "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype))
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=s["gradient_checkpointing"],
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    d = s["defaults"]
    return get_peft_model(model, LoraConfig(r=d["lora_r"], lora_alpha=d["lora_alpha"],
                                            lora_dropout=d["lora_dropout"],
                                            target_modules=d["lora_target_modules"], task_type="CAUSAL_LM"))


def _hf_args(s: dict[str, Any], out: Path) -> dict[str, Any]:
    """TrainingArguments shared by A and B: one epoch, the product's optimizer settings."""
    from dataclasses import fields

    from transformers import TrainingArguments

    d = s["defaults"]
    names = {f.name for f in fields(TrainingArguments)}
    gc_key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    cuda = s["device"] == "cuda"
    return {"output_dir": str(out), "per_device_train_batch_size": ROWS, "gradient_accumulation_steps": 1,
            "num_train_epochs": 1, "learning_rate": d["learning_rate"], "lr_scheduler_type": "constant",
            "warmup_steps": 0, "weight_decay": d["weight_decay"], "max_grad_norm": d["max_grad_norm"],
            "optim": "adamw_torch", "logging_steps": 1, "save_strategy": "no", "report_to": [],
            "bf16": cuda, "use_cpu": not cuda, "dataloader_num_workers": 0, "seed": d["seed"],
            "disable_tqdm": True, gc_key: s["gradient_checkpointing"],
            gc_key + "_kwargs": {"use_reentrant": False}}


def _hf_callback(steps: Steps) -> Any:
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            _sync(steps.device)
            steps._t_start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            steps.step_end()
            if steps.over():
                control.should_training_stop = True
            return control

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                steps.losses.append(float(logs["loss"]))
    return Clock()


def recipe_a(s: dict[str, Any]) -> dict[str, Any]:
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from trainer.model import load_tokenizer

    rows = _load_examples(s)
    tok = load_tokenizer(Path(s["base"]))
    t = time.perf_counter()
    model = _hf_model(s, "sdpa")
    load_s = time.perf_counter() - t
    steps = Steps(s)
    inner = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)

    def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = inner([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features])
        steps.real.append(sum(len(f["input_ids"]) for f in features))
        steps.padded.append(int(batch["input_ids"].numel()))
        return batch

    args = TrainingArguments(**_hf_args(s, Path(s["work"]) / "A"), remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate,
                      callbacks=[_hf_callback(steps)])
    _reset_peak(s["device"])
    trainer.train()
    return steps.summary(load_s=round(load_s, 2), attn="sdpa")


def recipe_b(s: dict[str, Any]) -> dict[str, Any]:
    try:
        import datasets
        from trl import SFTConfig, SFTTrainer
    except ImportError as exc:
        return {"status": f"{TRL_MISSING} ({exc})"}
    from datasets.table import InMemoryTable

    from trainer.model import load_tokenizer

    rows = _load_examples(s)
    # input_ids + labels (TRL keeps a labels column as given). Built with a fingerprint of its own:
    # datasets hashes a new Dataset's arrow table with dill, which fails with some pyarrow builds
    # ("Can't pickle <class 'MonthDayNano'>"); later transforms fall back to random hashes.
    table = InMemoryTable.from_pydict({"input_ids": [r["input_ids"] for r in rows],
                                       "labels": [r["labels"] for r in rows]})
    ds = datasets.Dataset(table, fingerprint=f"gpu-bench-{len(rows)}")
    tok = load_tokenizer(Path(s["base"]))
    attn = "flash_attention_2" if (s["device"] == "cuda" and importlib.util.find_spec("flash_attn")) else "sdpa"
    t = time.perf_counter()
    model = _hf_model(s, attn)
    load_s = time.perf_counter() - t
    steps = Steps(s)
    cfg = SFTConfig(**_hf_args(s, Path(s["work"]) / "B"), max_length=s["max_length"], packing=True,
                    packing_strategy="bfd", padding_free=True)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                         callbacks=[_hf_callback(steps)])
    inner = trainer.data_collator

    def counting(features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = inner(features)
        n = int(batch["input_ids"].numel())        # padding-free: one row, no pad
        pad = tok.pad_token_id
        real = n if "position_ids" in batch else int((batch["input_ids"] != pad).sum())
        steps.real.append(real)
        steps.padded.append(n)
        return batch
    trainer.data_collator = counting
    _reset_peak(s["device"])
    trainer.train()
    return steps.summary(load_s=round(load_s, 2), attn=attn, packed_rows=len(trainer.train_dataset))


def recipe_c(s: dict[str, Any], attn: str = "auto", nproc: int = 1) -> dict[str, Any]:
    """The product's QLoRATrainer in process on a JobSpec of the JSONL file (as
    tests/trainer/test_recipe.py runs it), timed by its own step events. *nproc* > 1 (``C-ranks``,
    run under torchrun): this is one rank; a step is ROWS rows on each rank (gradient_accumulation
    = nproc, one micro-batch per rank), so the per-GPU work is C's and tokens/s measure scaling."""
    from trainer.distributed import Ranks
    from core.config import Config, config_to_dict
    from trainer import packing
    from core.interface import Command, Outcome
    from trainer.recipe import QLoRATrainer
    from trainer.train import make_job

    d = s["defaults"]
    cfg = config_to_dict(Config(
        base_model=s["base"], max_length=s["max_length"], batch_size=ROWS, gradient_accumulation=nproc,
        lr_scheduler="constant", warmup_steps=0, epochs=1, eval_fraction=0.0, seed=d["seed"],
        checkpoint_every_steps=10 ** 9, attn_implementation=attn,
        gradient_checkpointing="auto" if s["gc_setting"] == "auto" else s["gradient_checkpointing"],
        device="cuda" if s["device"] == "cuda" else "cpu"))
    for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "learning_rate",
              "weight_decay", "max_grad_norm"):
        assert cfg[k] == d[k], (k, cfg[k], d[k])    # the very settings A and B got
    steps = Steps(s)
    events: dict[str, Any] = {"started": None, "logs": []}
    real_collate = packing.collate
    padded: list[int] = []

    def counting_collate(examples: Any, rows: Any, pad_token_id: int) -> Any:
        b = real_collate(examples, rows, pad_token_id)
        padded.append(b.padded_tokens)
        return b
    packing.collate = counting_collate      # _try_step imports it at call time: rows x width per micro-batch

    class Sink:
        def emit(self, ev: dict[str, Any]) -> None:
            kind = ev.get("event")
            if kind == "step":
                steps.step_end()
                steps.real.append(int(ev["tokens"]))
                steps.padded.append(sum(padded))
                padded.clear()
                steps.losses.append(ev.get("loss"))
                events["peak_memory_bytes_event"] = ev.get("peak_memory_bytes")
            elif kind == "started":
                _sync(s["device"])
                steps._t_start = time.perf_counter()
                events["started"] = {k: ev.get(k) for k in ("total_steps", "device")}
            elif kind == "log":
                events["logs"].append(ev.get("message"))

    class Control:
        def poll(self) -> Any:
            return Command.STOP if steps.over() else None

        def wait(self, timeout: float) -> Any:
            time.sleep(min(timeout, 0.05))
            return self.poll()

    job = make_job(Path(s["data"]), Path(s["work"]) / f"home-{attn}-{nproc}", cfg, job_id=1)
    ranks = Ranks.from_env() if nproc > 1 else None
    _reset_peak(s["device"])
    t = time.perf_counter()
    result = QLoRATrainer(ranks=ranks).run(job, Sink(), Control())
    if result.outcome not in (Outcome.COMPLETED, Outcome.STOPPED):
        raise RuntimeError(f"the job ended {result.outcome.value}: {result.reason}")
    out = steps.summary(attn=attn, outcome=result.outcome.value, job_seconds=round(time.perf_counter() - t, 2),
                        planned_steps=(events["started"] or {}).get("total_steps"),
                        peak_memory_bytes_event=events.get("peak_memory_bytes_event"))
    out["log_tail"] = [m for m in events["logs"] if m][-6:]
    return out


def _reset_peak(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.reset_peak_memory_stats()


def recipe_check(s: dict[str, Any]) -> dict[str, Any]:
    """The product's packed loss equals its examples run one by one (bench_throughput's check),
    in fp32 (TF32 off) so its 1e-5 tolerance means something on a GPU too."""
    import torch
    from bench_throughput import packed_equals_one_by_one

    from trainer.data import Example
    from trainer.model import attach_lora, load_base_model, load_tokenizer
    from trainer.packing import plan_batches

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(s["device"])
    model = load_base_model(Path(s["base"]), use_qlora=True, device=device, precision="fp32")
    model = attach_lora(model, s["defaults"])
    rows = _load_examples(s)[:32]
    ex = [Example(r["input_ids"], r["labels"], i + 1) for i, r in enumerate(rows)]
    plan = plan_batches([len(e.input_ids) for e in ex], max_length=s["max_length"], rows_per_batch=2,
                        packing=True, seed=0)
    pad = int(load_tokenizer(Path(s["base"])).pad_token_id)
    return {"status": "ran", **packed_equals_one_by_one(model, device, ex, plan[0], pad)}


def recipe_peak(s: dict[str, Any]) -> dict[str, Any]:
    return matmul_peak(s["device"])


def child(name: str, settings_file: Path) -> int:
    s = json.loads(settings_file.read_text())
    s["cap_s"] = float(os.environ.get("GPU_BENCH_CAP_S", s.get("cap_s", 60)))
    fn = {"A": recipe_a, "B": recipe_b, "C": recipe_c, "C-flex": lambda x: recipe_c(x, "flex_attention"),
          "check": recipe_check, "peak": recipe_peak,
          "C-ranks": lambda x: recipe_c(x, nproc=int(os.environ.get("WORLD_SIZE", 1)))}[name]
    try:
        res = fn(s)
    except Exception as exc:  # noqa: BLE001 - a failing recipe is a row, not the end of the bench
        traceback.print_exc()
        res = {"status": f"failed: {type(exc).__name__}: {exc}"[:600], "traceback": traceback.format_exc()[-4000:]}
    if os.environ.get("RANK", "0") == "0":      # C-ranks: rank 0 reports
        print("RESULT " + json.dumps(res, default=str), flush=True)
    return 0


# ============================================================================ report (parent)

def versions() -> dict[str, Any]:
    import importlib.metadata as md

    import torch
    v: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                         "cuda": torch.version.cuda,
                         "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None}
    for name in ("transformers", "peft", "bitsandbytes", "accelerate", "trl", "datasets", "flash-attn",
                 "tokenizers"):
        try:
            v[name] = md.version(name)
        except md.PackageNotFoundError:
            v[name] = None
    v["driver"] = None
    try:
        import pynvml
        pynvml.nvmlInit()
        drv = pynvml.nvmlSystemGetDriverVersion()
        v["driver"] = drv.decode() if isinstance(drv, bytes) else drv
    except Exception:  # noqa: BLE001 - no NVIDIA driver
        pass
    return v


def device_name(device: str) -> str:
    import torch

    from bench_throughput import device_name as named
    return named(torch.device("cuda", 0) if device == "cuda" else torch.device("cpu"))


def loss_at(curve: list[list[Any]], tokens: int) -> float | None:
    """Mean loss of the steps that end in the last fifth of the first *tokens* tokens (at least
    the last step within them; else the step that holds token *tokens*): the loss 'after the
    same tokens', smoothed over a few steps."""
    finite = [(c, l) for c, l in curve if l is not None and math.isfinite(l)]
    inside = [(c, l) for c, l in finite if c <= tokens]
    if not inside:
        return finite[0][1] if finite else None
    tail = [l for c, l in inside if c > 0.8 * tokens] or [inside[-1][1]]
    return sum(tail) / len(tail)


def derive(res: dict[str, Any]) -> None:
    """MFU, ratios and the loss at the common token count, from the rows that ran."""
    peak = (res.get("matmul_peak") or {}).get("flops_per_s")
    fl, data = res["flops"], res["data"]
    ran = {k: r for k, r in res["recipes"].items() if r.get("status") == "ran"}
    # ANCHORS.md's useful FLOPs per real token: 4 N_frozen + 6 N_lora + attention (block-diagonal)
    useful = (4 * fl["n_active"] + 6 * fl["n_lora"]) + 6 * fl["layers"] * fl["d_attn"] * \
        data["sum_squared_lengths"] / max(1, data["tokens"])
    res["flops"]["useful_flops_per_token"] = useful
    res["flops"]["mfu_flops_per_token"] = 6 * fl["n_active"]
    common = min((r["tokens_trained"] for r in ran.values()), default=0)
    res["common_tokens"] = common
    for name, r in ran.items():
        tps = r["real_tokens_per_s"]
        r["capped"] = r["tokens_trained"] < data["tokens"]      # stopped by its time cap before the epoch's end
        r["mfu"] = 6 * fl["n_active"] * tps / peak if peak else None
        r["mfu_useful"] = useful * tps / peak if peak else None
        r["loss_at_common_tokens"] = loss_at(r["loss_curve"], common)
        for ref in ("A", "B"):
            if ref in ran and ref != name:
                r[f"vs_{ref}"] = tps / ran[ref]["real_tokens_per_s"]
    if "C-ranks" in ran and "C" in ran:     # tokens/s at N ranks / (N x 1 rank's)
        r = ran["C-ranks"]
        r["scaling_efficiency"] = r["real_tokens_per_s"] / (res["nproc"] * ran["C"]["real_tokens_per_s"])


def _f(x: Any, fmt: str, none: str = "-") -> str:
    return none if x is None else format(x, fmt)


def table(res: dict[str, Any]) -> str:
    gib = 1 << 30
    peak = res.get("matmul_peak") or {}
    d = res["data"]
    head = (f"GPU bench on {res['device_name']}: {res['model']}, max_length {res['max_length']}, "
            f"{ROWS} rows (A: examples) a step, one epoch of {d['examples']:,} chat examples = "
            f"{d['tokens']:,} tokens (median {d['length_median']:.0f}, p90 {d['length_p90']:.0f}), "
            f"{res['warmup']} warm-up steps untimed, time cap {res['cap_s']:.0f} s per recipe; "
            f"gradient checkpointing {'on' if res['gradient_checkpointing'] else 'off'}; matmul peak "
            + (f"{peak['flops_per_s'] / 1e12:.1f} TFLOP/s ({peak['shape']})" if peak.get("flops_per_s")
               else str(peak.get("status"))))
    lines = [head, "",
             (f"| recipe | what | real tokens/s | padded tokens/s | vs A | vs B | peak memory (GiB) | "
              f"MFU (6N) | useful MFU | loss first -> at {res.get('common_tokens', 0):,} tokens | "
              f"tokens trained | timed steps |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in TABLE_ORDER:
        if name not in res["recipes"]:
            continue
        r = res["recipes"][name]
        if r.get("status") != "ran":
            lines.append(f"| {name} | {WHAT[name]} | {r.get('status', 'not run')} | | | | | | | | | |")
            continue
        mem = _f(r.get("peak_memory_bytes") and r["peak_memory_bytes"] / gib, ".2f")
        loss = f"{_f(r.get('first_loss'), '.3f')} -> {_f(r.get('loss_at_common_tokens'), '.3f')}"
        cap = " (capped)" if r.get("capped") else ""
        lines.append(
            f"| {name} | {WHAT[name]} | {r['real_tokens_per_s']:,.0f} | {r['padded_tokens_per_s']:,.0f} | "
            f"{_f(r.get('vs_A'), '.2f')}{'x' if r.get('vs_A') else ''} | "
            f"{_f(r.get('vs_B'), '.2f')}{'x' if r.get('vs_B') else ''} | {mem} | "
            f"{_f(r.get('mfu'), '.1%')} | {_f(r.get('mfu_useful'), '.1%')} | {loss} | "
            f"{r['tokens_trained']:,}{cap} | {r['timed_steps']} |")
    sc = res["recipes"].get("C-ranks", {}).get("scaling_efficiency")
    if sc is not None:
        lines += ["", f"C-ranks: {res['nproc']} ranks reach {sc:.1%} of {res['nproc']} x C's tokens/s "
                      "(scaling efficiency; the goal is >= 90 %)"]
    c = res.get("packed_check")
    if c:
        lines.append("")
        if c.get("status") == "ran":
            lines.append(f"C's packed loss vs its examples one by one (fp32): relative difference "
                         f"{c['relative_difference']:.1e} ({'passed' if c['passed'] else 'FAILED'}, "
                         f"tolerance {c['tolerance']:g})")
        else:
            lines.append(f"packed loss check: {c.get('status')}")
    v = res["versions"]
    lines += ["", "versions: " + ", ".join(f"{k} {v[k]}" for k in v if v[k] is not None)]
    return "\n".join(lines)


def save(res: dict[str, Any], out: Path) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    if res["recipes"]:
        derive(res)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=2, default=str) + "\n")
    tmp.replace(out)
    md = table(res)
    out.with_suffix(".md").write_text(md + "\n\n`" + res["command"] + "`\n")
    return md


def run_child(name: str, sfile: Path, env: dict[str, str], timeout: float, cap_s: float) -> dict[str, Any]:
    t = time.monotonic()
    with NvmlSampler() as nv:
        try:
            launch = [sys.executable]
            if name == "C-ranks":       # the product's launch: torchrun, one process per rank
                launch += ["-m", "torch.distributed.run", "--standalone", "--max-restarts", "0",
                           "--nproc-per-node", str(json.loads(sfile.read_text())["nproc"])]
            proc = subprocess.run([*launch, str(Path(__file__).resolve()), "--child", name, str(sfile)],
                                  env={**env, "GPU_BENCH_CAP_S": str(cap_s)}, cwd=REPO, check=False,
                                  capture_output=True, text=True, timeout=timeout)
            line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("RESULT ")), None)
            r = json.loads(line[7:]) if line else {
                "status": f"failed: exit {proc.returncode}: {proc.stderr.strip()[-500:]}"}
            if r.get("status") != "ran":
                r["stderr_tail"] = proc.stderr[-3000:]
        except subprocess.TimeoutExpired:
            r = {"status": f"failed: over its {timeout:.0f} s limit (killed)"}
    r["wall_s"] = round(time.monotonic() - t, 1)
    if nv.peak is not None and r.get("status") == "ran":
        r["nvml_peak_bytes"] = nv.peak
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny base on CPU, a few steps (< 90 s on 2 cores)")
    ap.add_argument("--out", type=Path, default=BENCH / "results" / "gpu_bench.json")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                    help="auto: cuda when there is one (never with --smoke)")
    ap.add_argument("--records", type=int, default=None, help="chat records (default 2000; smoke 160)")
    ap.add_argument("--max-length", type=int, default=None, help="default 2048 (smoke 256)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; smoke 1)")
    ap.add_argument("--cap-s", type=float, default=None,
                    help="time cap of a recipe's timed steps (default 90; smoke 20); lowered to fit --budget-s")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="the whole run's time (default 450; smoke 85): later sections get what is left")
    ap.add_argument("--recipes", default=",".join(DEFAULT_ORDER),
                    help=f"which, in this order (of {','.join(ALL_RECIPES)}); e.g. C,A or C,A,B,C-flex")
    ap.add_argument("--gradient-checkpointing", choices=("auto", "on", "off"), default=None,
                    help="auto (default): the product's rule (on above 200 M parameters); smoke: on, "
                         "so the CPU run takes the GPU run's checkpointing paths")
    ap.add_argument("--check", choices=("auto", "on", "off"), default="auto",
                    help="C's packed loss vs one by one, fp32, at the end if time is left; auto: on CPU "
                         "only (on a GPU its 1e-5 tolerance is tighter than fp32 kernels guarantee)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nproc", type=int, default=1,
                    help="also run C on N ranks through torchrun (C-ranks) and report the scaling efficiency")
    ap.add_argument("--child", nargs=2, metavar=("RECIPE", "SETTINGS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child[0], Path(args.child[1]))

    t0 = time.monotonic()
    import torch
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    smoke = args.smoke
    records = args.records or (160 if smoke else 2000)
    max_length = args.max_length or (256 if smoke else 2048)
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 3)
    cap_s = args.cap_s or (20.0 if smoke else 90.0)
    budget = args.budget_s or (85.0 if smoke else 450.0)
    deadline = t0 + budget
    wanted = [r for r in args.recipes.split(",") if r]
    if args.nproc > 1 and "C-ranks" not in wanted:
        wanted.insert(wanted.index("C") + 1 if "C" in wanted else 0, "C-ranks")
    bad = [r for r in wanted if r not in ALL_RECIPES]
    if bad:
        ap.error(f"unknown recipe(s) {bad}; known: {', '.join(ALL_RECIPES)}")

    work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    command = "python bench/gpu_bench.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    res: dict[str, Any] = {
        "command": command, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": device, "device_name": device_name(device), "versions": versions(),
        "model": ("tiny base (trainer/tiny_base.py, 2 layers)" if smoke else
                  "Qwen3-0.6B-shaped (bench_throughput QWEN3_06B, random weights, 28 layers)"),
        "max_length": max_length, "rows_per_step": ROWS, "records": records, "warmup": warmup,
        "cap_s": cap_s, "budget_s": budget, "nproc": args.nproc, "recipes": {}}
    try:
        defaults = product_defaults()
        base = build_base(work, smoke, max_length, args.seed)
        data = work / "chat.jsonl"
        write_records(base, data, max_length, records, args.seed)
        res["data"] = tokenize_once(base, data, work / "examples.json", max_length)
        from trainer.model import want_gradient_checkpointing
        gc_setting = args.gradient_checkpointing or ("on" if smoke else "auto")
        gc_on = want_gradient_checkpointing("auto", base) if gc_setting == "auto" else gc_setting == "on"
    except Exception:  # noqa: BLE001 - nothing to bench without the model and data
        res["status"] = "failed: setup: " + traceback.format_exc()[-2000:]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2, default=str) + "\n")
        print(res["status"], file=sys.stderr)
        return 1
    res.update(defaults=defaults, gradient_checkpointing=gc_on, gradient_checkpointing_setting=gc_setting, flops=model_flops(base, int(defaults["lora_r"])),
               setup_s=round(time.monotonic() - t0, 1))
    settings = {"base": str(base), "data": str(data), "examples": str(work / "examples.json"),
                "device": device, "max_length": max_length, "warmup": warmup, "work": str(work),
                "gradient_checkpointing": gc_on, "gc_setting": gc_setting, "defaults": defaults, "cap_s": cap_s,
                "nproc": args.nproc}
    sfile = work / "settings.json"
    sfile.write_text(json.dumps(settings))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"),
           "TRAINER_DEVICE": device,
           "PYTHONPATH": os.pathsep.join(p for p in (str(BENCH), str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    print(f"setup {res['setup_s']} s: {res['data']['examples']} examples, {res['data']['tokens']:,} tokens, "
          f"device {res['device_name']}", flush=True)

    # the matmul peak (in a child on a GPU: the parent keeps no CUDA context)
    try:
        res["matmul_peak"] = (run_child("peak", sfile, env, 120, cap_s) if device == "cuda" else matmul_peak(device))
    except Exception as exc:  # noqa: BLE001
        res["matmul_peak"] = {"status": f"failed: {exc}"}
    print(f"matmul peak: {res['matmul_peak']}", flush=True)

    # time: each recipe gets an equal share of what is left (less its setup: imports, model
    # load, warm-up) as the cap of its timed steps, at least min_cap; one that starts with less
    # than min_left left is not run. The child's own limit is what is left.
    setup_allow, min_cap, min_left = (20.0, 5.0, 15.0) if device == "cpu" else (60.0, 20.0, 60.0)
    trl_missing = [m for m in ("trl", "datasets") if importlib.util.find_spec(m) is None]
    todo = [r for r in wanted if r != "B" or not trl_missing]
    for name in wanted:
        if name not in todo:
            res["recipes"][name] = {"status": f"{TRL_MISSING} (No module named '{trl_missing[0]}')"}
            print(f"{name}: {res['recipes'][name]['status']}", flush=True)
    for i, name in enumerate(todo):
        left = deadline - time.monotonic()
        if left < min_left:
            res["recipes"][name] = {"status": f"not run: out of time (budget {budget:.0f} s)"}
            print(f"{name}: {res['recipes'][name]['status']}", flush=True)
            continue
        cap = min(cap_s, max(min_cap, left / (len(todo) - i) - setup_allow))
        # its limit: the cap plus room for setup and the untimed steps, never past the budget
        r = run_child(name, sfile, env, timeout=min(left, cap + 2 * setup_allow + 60), cap_s=cap)
        res["recipes"][name] = r
        print(f"{name}: {r.get('status')} ({r['wall_s']} s)"
              + (f": {r['real_tokens_per_s']:,.0f} real tokens/s, {r['tokens_trained']:,} tokens"
                 + (" (capped)" if r["tokens_trained"] < res["data"]["tokens"] else "")
                 if r.get("status") == "ran" else ""), flush=True)
        save(res, args.out)          # each section lands on disk: a global timeout keeps what ran
    if args.check == "on" or (args.check == "auto" and device == "cpu"):
        left = deadline - time.monotonic()
        if left > min_left:
            res["packed_check"] = run_child("check", sfile, env, timeout=left, cap_s=cap_s)
        else:
            res["packed_check"] = {"status": f"not run: out of time (budget {budget:.0f} s)"}
        print(f"packed check: {res['packed_check'].get('status')}", flush=True)
    res["wall_s"] = round(time.monotonic() - t0, 1)
    md = save(res, args.out)
    shutil.rmtree(work, ignore_errors=True)
    print()
    print(md)
    print(f"\nresult: {args.out} (+ .md), {res['wall_s']} s in all")
    return 0 if res["recipes"].get("C", {}).get("status") == "ran" or "C" not in wanted else 1


if __name__ == "__main__":
    sys.exit(main())
