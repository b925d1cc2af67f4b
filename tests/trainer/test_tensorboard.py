"""TensorBoard export (``tensorboard: true``): the worker's scalars and probe texts as event files
under runs/, one run per base, read back with TensorBoard's own reader."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from core.config import Config, config_to_dict
from core.interface import Outcome
from daemon.generator import generate_records
from daemon_helpers import write_jsonl
from trainer.recipe import QLoRATrainer
from trainer.tboard import TensorBoardSink, run_dir
from trainer.train import make_job
from trainer_helpers import ListSink, NoControl


def read_run(d: Path) -> EventAccumulator:
    acc = EventAccumulator(str(d), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def steps_of(acc: EventAccumulator, tag: str) -> list[int]:
    return [e.step for e in acc.Scalars(tag)]


def test_two_jobs_are_one_continuous_run(one_cpu_thread: None, tiny_base: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    cfg = config_to_dict(Config(base_model=str(tiny_base), max_length=64, batch_size=4, learning_rate=3e-3,
                                eval_fraction=0.1, tensorboard=True, seed=1, probe_prompts=["What is 2 + 3?"],
                                probe_retention_examples=0))
    results = []
    for i, kind in enumerate(("arithmetic", "syllables")):
        f = write_jsonl(tmp_path / f"{kind}.jsonl", generate_records(40, seed=i, kind=kind))
        sink = ListSink()
        r = QLoRATrainer().run(make_job(f, home, cfg, job_id=i + 1), sink, NoControl())
        assert r.outcome is Outcome.COMPLETED, r.reason
        results.append((r, sink))
    started = results[0][1].of("started")[0]
    runs = list((home / "runs").iterdir())
    assert runs == [run_dir(home / "runs", started["base_model"], started["base_fingerprint"])]
    assert len(list(runs[0].glob("events.out.tfevents.*"))) == 2        # one file per job, one run
    acc = read_run(runs[0])
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second",
            "train/peak_memory_bytes", "eval/loss"} <= tags, tags
    n1, n2 = results[0][0].steps, results[1][0].steps
    # the second file's steps continue the first's: one line across both files
    assert steps_of(acc, "train/loss") == list(range(1, n1 + n2 + 1))
    losses = {e.step: e.value for e in acc.Scalars("train/loss")}
    for ev in results[1][1].of("step"):
        assert abs(losses[n1 + ev["step"]] - ev["loss"]) < 1e-5
    # the forgetting matrix: each dataset's retention loss after each job
    assert steps_of(acc, "retention/arithmetic.jsonl") == [n1, n1 + n2]
    assert steps_of(acc, "retention/syllables.jsonl") == [n1 + n2]
    # the probe prompt's answers as text: at the base (step 0) and at the end of each job (run in
    # process, without the daemon's state.db, job 2 asks the base again: at its start, step n1)
    texts = acc.Tensors("probe/0/text_summary")
    assert {0, n1, n1 + n2} <= {t.step for t in texts}, [t.step for t in texts]
    assert all("What is 2 + 3?" in t.tensor_proto.string_val[0].decode() for t in texts)


class Sink(ListSink):
    pass


def test_probe_texts_and_a_broken_writer_never_fail_the_job(tmp_path: Path) -> None:
    inner = Sink()
    board = TensorBoardSink(inner, tmp_path, tmp_path / "runs", job_id=3)
    board.emit({"event": "started", "base_model": "/m/tiny base", "base_fingerprint": "abcdef0123"})
    board.emit({"event": "step", "step": 1, "loss": 2.5, "learning_rate": 1e-3})
    probes: list[dict[str, Any]] = [{"prompt": "What is 2 + 3?", "answer": "5", "reference": "5"},
                                    {"prompt": "<b>hi</b>", "answer": "hello", "reference": None}]
    board.emit({"event": "probe", "step": 1, "job_id": 3, "phase": "end", "probes": probes})
    board.close()
    d = tmp_path / "runs" / "tiny_base-abcdef01"
    acc = read_run(d)
    assert [e.value for e in acc.Scalars("train/loss")] == [2.5]
    texts = {t: acc.Tensors(t)[0].tensor_proto.string_val[0].decode() for t in acc.Tags()["tensors"]
             if t.startswith("probe/")}
    assert "What is 2 + 3?" in texts["probe/0/text_summary"] and "**answer:** 5" in texts["probe/0/text_summary"]
    assert "<b>hi</b>" in texts["probe/1/text_summary"]
    assert [e["event"] for e in inner.events] == ["started", "step", "probe"]       # all forwarded

    # a writer that fails (here: runs/ is a file) stops the export with one warning; events go on
    bad = tmp_path / "bad"
    (bad / "runs").parent.mkdir()
    (bad / "runs").write_text("not a directory")
    inner = Sink()
    board = TensorBoardSink(inner, bad, bad / "runs", job_id=4)
    board.emit({"event": "started", "base_model": "m", "base_fingerprint": "f"})
    board.emit({"event": "step", "step": 1, "loss": 1.0})
    assert [e["event"] for e in inner.events] == ["started", "log", "step"]
    assert "TensorBoard export stopped" in inner.events[1]["message"]
    json.dumps(inner.events)
