"""Train one file by hand, outside the daemon, through the same recipe the worker runs.

    python -m trainer.train --dataset FILE --output-dir DIR [--epochs N] [--use-qlora|--no-qlora]
                            [--config config.json] [--base PATH] [--job-id N]

``--output-dir`` acts as the home: current_model/, checkpoints/, snapshots/ are made there. The
job id defaults to a number derived from the file's sha256, so running the same command again
after Ctrl-C (which checkpoints and stops) resumes where it stopped. Step lines go to stdout.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from core.atomic import sha256_file
from core.interface import Command, JobResult, JobSpec, Outcome, QueueControl


def make_job(dataset: Path, home: Path, config: dict[str, Any], job_id: int | None = None,
             attempt: int = 1) -> JobSpec:
    """A JobSpec for *dataset* trained into *home* (job id from the sha256 unless given)."""
    dataset = Path(dataset).resolve()
    sha = sha256_file(dataset)
    if job_id is None:
        job_id = int(sha[:7], 16)
    return JobSpec(job_id=job_id, name=dataset.name, dataset=dataset, sha256=sha,
                   home=Path(home).resolve(), config=dict(config), attempt=attempt)


class PrintSink:
    """Human-readable step lines on stdout."""

    def __init__(self, stream: Any = None, json_lines: bool = False) -> None:
        self.stream = stream or sys.stdout
        self.json_lines = json_lines

    def emit(self, ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        if self.json_lines:
            line = json.dumps(ev, default=str)
        elif kind == "step":
            tps = ev.get("tokens_per_second") or 0.0
            loss = "skipped" if ev["loss"] is None else f"{ev['loss']:.4f}"   # None: a non-finite step
            grad = "-" if ev["grad_norm"] is None else f"{ev['grad_norm']:.3f}"
            line = (f"step {ev['step']}/{ev['total_steps']}  loss {loss}  "
                    f"lr {ev['learning_rate']:.3g}  grad {grad}  {tps:.0f} tok/s  "
                    f"eta {ev['eta_seconds']:.0f}s")
        elif kind == "eval":
            line = f"eval  step {ev['step']}  eval_loss {ev['eval_loss']:.4f}"
        elif kind == "layer_activity":
            top = ev["summary"][:3]
            line = "layers  " + ", ".join(f"{r['module']} {r['delta_norm']:.3g}" for r in top)
        elif kind in ("checkpoint", "snapshot"):
            line = f"{kind}  {ev.get('reason', '')} {ev.get('path')}"
        elif kind == "started":
            line = (f"started: {ev['total_steps']} steps (from step {ev['resumed_from_step']}, "
                    f"{ev.get('continued_from')}) on {ev.get('device')}")
        elif kind == "log":
            line = f"[{ev.get('level')}] {ev.get('message')}"
        else:
            line = f"{kind}  {json.dumps({k: v for k, v in ev.items() if k != 'event'}, default=str)}"
        print(line, file=self.stream, flush=True)


def signal_control() -> QueueControl:
    """Ctrl-C / SIGTERM -> STOP (checkpoint, then exit); nothing else."""
    control = QueueControl()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: control.send(Command.STOP))
    return control


def build_config(args: argparse.Namespace) -> dict[str, Any]:
    from core.config import Config, config_to_dict, load_config

    cfg = load_config(args.config) if args.config else Config()
    raw = config_to_dict(cfg)
    if args.base:
        raw["base_model"] = str(Path(args.base).expanduser().resolve())
    elif raw.get("base_model") and args.config and not Path(raw["base_model"]).expanduser().is_absolute():
        raw["base_model"] = str((Path(args.config).resolve().parent / raw["base_model"]).resolve())
    if args.epochs is not None:
        raw["epochs"] = args.epochs
    if args.use_qlora is not None:
        raw["use_qlora"] = args.use_qlora
    return raw


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", required=True, type=Path, help="JSONL file to train on")
    ap.add_argument("--output-dir", required=True, type=Path, help="home for current_model/, checkpoints/, snapshots/")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--use-qlora", dest="use_qlora", action="store_true", default=None)
    ap.add_argument("--no-qlora", dest="use_qlora", action="store_false")
    ap.add_argument("--config", type=Path, default=None, help="config.json (defaults otherwise)")
    ap.add_argument("--base", type=Path, default=None, help="base model folder (overrides config base_model)")
    ap.add_argument("--job-id", type=int, default=None)
    ap.add_argument("--json", action="store_true", help="print events as JSON lines")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = build_config(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.dataset.is_file():
        print(f"error: dataset not found: {args.dataset}", file=sys.stderr)
        return 2
    args.output_dir.mkdir(parents=True, exist_ok=True)
    job = make_job(args.dataset, args.output_dir, config, args.job_id)

    from trainer.recipe import QLoRATrainer

    result: JobResult = QLoRATrainer().run(job, PrintSink(json_lines=args.json), signal_control())
    print(f"result: {result.outcome.value}" + (f" ({result.reason})" if result.reason else "")
          + f", {result.steps} steps", flush=True)
    if result.details:
        print(json.dumps({k: v for k, v in result.details.items() if k != "data"}, default=str), flush=True)
    return 0 if result.outcome in (Outcome.COMPLETED, Outcome.STOPPED) else 1


if __name__ == "__main__":
    sys.exit(main())
