"""Consolidation on real parts: the tiny base, an adapter trained by the real recipe, a real merge,
real subprocesses killed with SIGKILL at each stage of the switch."""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from core.config import Config, config_to_dict
from core.lock import DaemonLock
from core.paths import Layout
from core.statedb import StateDB
from core.switch import recover_consolidation
from ops.consolidate import CONSOLIDATION_META, ConsolidationError, consolidate
from ops.lineage import lineage
from ops.snapshot import snapshot_now
from daemon.generator import generate_records
from core.interface import Outcome
from trainer.model import base_fingerprint
from trainer.recipe import QLoRATrainer
from trainer.train import make_job
from trainer_helpers import ListSink, NoControl

REPO = Path(__file__).resolve().parents[2]
BASE_REL = "consolidated_models/tiny"
TOL = 1e-4
EXTRA_KEYS = {"monitor": {"port": 8123, "host": "127.0.0.1"}, "model_display_name": "keep me",
              "warmup_steps": 0, "auto_generate": {"enabled": False, "count": 7}}


def read_config(home: Path) -> dict[str, Any]:
    return json.loads((home / "config.json").read_text())


def train(home: Path, name: str, job_id: int, seed: int) -> tuple[Any, ListSink, Any]:
    data = home.parent / name
    data.write_text("".join(json.dumps(r) + "\n" for r in generate_records(12, seed=seed)))
    cfg = config_to_dict(Config(**read_config(home)))
    job = make_job(data, home, cfg, job_id=job_id)
    sink = ListSink()
    result = QLoRATrainer().run(job, sink, NoControl())
    return result, sink, job


def tree_hashes(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def locked(home: Path) -> dict[str, Any]:
    db = StateDB(home / "status" / "state.db")
    try:
        return db.locked()
    finally:
        db.close()


@pytest.fixture(scope="module")
def template(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A home whose config names consolidated_models/tiny (relative), with state.db locked keys
    recorded as the daemon does, and current_model/ trained on one dataset by the real recipe."""
    home = tmp_path_factory.mktemp("consolidate_template") / "home"
    shutil.copytree(tiny_base, home / BASE_REL)
    cfg = dict(base_model=BASE_REL, max_length=64, batch_size=2, gradient_accumulation=1, lora_r=4,
               lora_alpha=8, lora_dropout=0.0, learning_rate=2e-2, lr_scheduler="constant",
               epochs=1, checkpoint_every_steps=1000, layer_activity_every_steps=1000, seed=0,
               **EXTRA_KEYS)
    (home / "config.json").write_text(json.dumps(cfg, indent=2))
    db = StateDB(home / "status" / "state.db")
    db.record_locked(Config(**cfg).locked_values())
    db.close()
    result, sink, job = train(home, "first.jsonl", 1, seed=1)
    assert result.outcome is Outcome.COMPLETED, result.reason
    assert result.steps >= 3
    return {"home": home, "job": job, "steps": result.steps,
            "adapter": tree_hashes(home / "current_model")}


def clone(template: dict[str, Any], dest: Path) -> Path:
    home = dest / "home"
    shutil.copytree(template["home"], home)
    return home


@pytest.fixture(scope="module")
def consolidated(template: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], dict]:
    home = clone(template, tmp_path_factory.mktemp("consolidated"))
    before = read_config(home)
    result = consolidate(home, before, "arithmetic v1", probe_tolerance=TOL)
    return home, result, before


def probe_logits(model: Any, tok: Any, texts: list[str]) -> list[torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([tok(t, add_special_tokens=False)["input_ids"]]),
                      use_cache=False).logits.float() for t in texts]


# ------------------------------------------------------------------------------------ the merge

def test_merged_base_reproduces_base_plus_adapter(consolidated: tuple, template: dict) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    home, result, _ = consolidated
    new = Path(result["new_base_path"])
    meta = json.loads((new / CONSOLIDATION_META).read_text())
    assert meta["probe"]["tolerance"] == TOL and meta["probe"]["max_abs_diff"] <= TOL
    assert result["probe_max_abs_diff"] == meta["probe"]["max_abs_diff"]
    # the adapter is far from zero: it moves logits by much more than the tolerance
    assert meta["probe"]["adapter_effect_max_abs"] > 1000 * TOL, meta["probe"]

    # independent check on other texts: new base == old base + adapter (from the backup)
    texts = ["What is 3 plus 4? The answer is 7.", "hello there, how are you today"]
    tok = AutoTokenizer.from_pretrained(new)
    merged = AutoModelForCausalLM.from_pretrained(new, dtype=torch.float32)
    got = probe_logits(merged, tok, texts)
    base = AutoModelForCausalLM.from_pretrained(home / BASE_REL, dtype=torch.float32)
    want_base = probe_logits(base, tok, texts)
    peft = PeftModel.from_pretrained(base, result["backup"])
    want = probe_logits(peft, tok, texts)
    diff = max(float((a - b).abs().max()) for a, b in zip(got, want))
    effect = max(float((a - b).abs().max()) for a, b in zip(want, want_base))
    assert diff <= TOL, diff
    assert effect > 1000 * TOL, effect
    assert tok.chat_template and tok.pad_token  # tokenizer carried over, chat template included


def test_metadata_config_statedb_backup(consolidated: tuple, template: dict) -> None:
    home, result, before = consolidated
    new = Path(result["new_base_path"])
    job = template["job"]
    # published under consolidated_models/<YYYYmmdd_HHMMSS>/, nothing hidden left over
    assert new.parent == home / "consolidated_models" and len(new.name) == 15 and new.name[8] == "_"
    assert not [p for p in new.parent.iterdir() if p.name.startswith(".")]
    meta = json.loads((new / CONSOLIDATION_META).read_text())
    assert meta["description"] == "arithmetic v1" and meta["created_at"]
    assert [(d["name"], d["sha256"]) for d in meta["datasets"]] == [(job.name, job.sha256)]
    assert meta["adapters"][0]["datasets"] == meta["datasets"]
    assert meta["adapters"][0]["files"]["adapter_model.safetensors"] == template["adapter"]["adapter_model.safetensors"]
    old_fp = base_fingerprint(home / BASE_REL)
    assert meta["parent"] == {"path": BASE_REL, "abs_path": str((home / BASE_REL).resolve()),
                              "fingerprint": old_fp}
    assert meta["fingerprint"] == result["fingerprint"] == base_fingerprint(new) != old_fp
    assert result["datasets"] == meta["datasets"]
    # config.json: base_model moved (relative to home), every other key exactly as it was
    after = read_config(home)
    assert after["base_model"] == result["new_base"] == f"consolidated_models/{new.name}"
    assert {k: v for k, v in after.items() if k != "base_model"} == \
        {k: v for k, v in before.items() if k != "base_model"}
    # state.db: the locked base_model is the new one, the other locked keys untouched
    rec = locked(home)
    assert rec["base_model"] == result["new_base"]
    assert rec["max_length"] == 64 and rec["batch_size"] == 2
    # current_model/ became the backup snapshot, bitwise, with its metadata
    assert not (home / "current_model").exists()
    backup = Path(result["backup"])
    assert backup.parent == home / "snapshots" and backup.name.endswith("__pre-consolidation")
    files = tree_hashes(backup)
    assert {k: files[k] for k in template["adapter"]} == template["adapter"]
    snap = json.loads((backup / "snapshot.json").read_text())
    assert snap["kind"] == "pre-consolidation" and snap["consolidated_into"] == result["new_base"]
    assert [d["sha256"] for d in snap["datasets"]] == [job.sha256]
    assert not (home / "status" / "consolidation.json").exists()
    assert recover_consolidation(home) is None


def test_next_job_trains_fresh_adapter_on_new_base_and_lineage(consolidated: tuple, template: dict,
                                                               tmp_path: Path) -> None:
    src, result, _ = consolidated
    home = tmp_path / "home"
    shutil.copytree(src, home)
    first = template["job"]

    chain = lineage(home, read_config(home))
    assert [e["kind"] for e in chain] == ["consolidated", "root"]
    assert chain[0]["path"] == result["new_base"] and chain[0]["fingerprint"] == result["fingerprint"]
    assert chain[0]["description"] == "arithmetic v1" and chain[0]["created_at"]
    assert [d["sha256"] for d in chain[0]["datasets"]] == [first.sha256]
    assert chain[1]["path"] == BASE_REL and chain[1]["fingerprint"] == result["parent_fingerprint"]
    assert chain[1]["datasets"] == []

    res, sink, job = train(home, "second.jsonl", 2, seed=2)
    assert res.outcome is Outcome.COMPLETED, res.reason
    started = sink.of("started")[0]
    assert started["continued_from"] == "fresh"
    assert started["base_fingerprint"] == result["fingerprint"]
    losses = [e["loss"] for e in sink.of("step")]
    assert losses and all(math.isfinite(x) for x in losses)
    state = json.loads((home / "current_model" / "trainer_state.json").read_text())
    assert [d["sha256"] for d in state["datasets"]] == [job.sha256]  # a fresh adapter's history
    assert state["base_fingerprint"] == result["fingerprint"]

    chain = lineage(home, read_config(home))
    assert [e["kind"] for e in chain] == ["adapter", "consolidated", "root"]
    assert [d["sha256"] for d in chain[0]["datasets"]] == [job.sha256]
    assert chain[0]["base_fingerprint"] == chain[1]["fingerprint"] == result["fingerprint"]
    assert [d["sha256"] for d in chain[1]["datasets"]] == [first.sha256]


# ------------------------------------------------------------------------------------ snapshots

def test_snapshot_now(template: dict, tmp_path: Path) -> None:
    home = clone(template, tmp_path)
    snap = snapshot_now(home, "before the risky data")
    assert snap.parent == home / "snapshots" and snap.name.endswith("__manual")
    meta = json.loads((snap / "snapshot.json").read_text())
    assert meta["description"] == "before the risky data" and meta["kind"] == "manual"
    assert meta["created_at"] and meta["snapshot_time"]
    assert meta["base_fingerprint"] == base_fingerprint(home / BASE_REL)
    assert meta["base_model"] and [d["sha256"] for d in meta["datasets"]] == [template["job"].sha256]
    files = tree_hashes(snap)
    for name in ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json"):
        assert files[name] == template["adapter"][name]
    assert not [p for p in (home / "snapshots").iterdir() if p.name.startswith(".")]
    chain = lineage(home, read_config(home))  # before any consolidation: adapter on the root
    assert [e["kind"] for e in chain] == ["adapter", "root"]
    assert chain[1]["path"] == BASE_REL and chain[1]["fingerprint"] == chain[0]["base_fingerprint"]
    # while a daemon holds its lock a snapshot is still taken (copy checked against the manifest)
    lock = DaemonLock(Layout(home)).acquire()
    try:
        again = snapshot_now(home, "while the daemon runs")
    finally:
        lock.release()
    assert again != snap and tree_hashes(again)["adapter_model.safetensors"] == files["adapter_model.safetensors"]
    shutil.rmtree(home / "current_model")
    with pytest.raises(ConsolidationError, match="no adapter"):
        snapshot_now(home, "nothing")


# ------------------------------------------------------------------------------------ refusals

def test_refuses_without_adapter(tiny_base: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    shutil.copytree(tiny_base, home / BASE_REL)
    (home / "config.json").write_text(json.dumps({"base_model": BASE_REL}))
    with pytest.raises(ConsolidationError, match="nothing to consolidate"):
        consolidate(home, read_config(home), "x")
    (home / "current_model").mkdir()  # empty: still nothing
    with pytest.raises(ConsolidationError, match="nothing to consolidate"):
        consolidate(home, read_config(home), "x")
    assert [p.name for p in (home / "consolidated_models").iterdir()] == ["tiny"]


def test_refuses_other_base_naming_both(template: dict, tmp_path: Path) -> None:
    home = clone(template, tmp_path)
    other = home / "consolidated_models" / "other"
    shutil.copytree(home / BASE_REL, other)
    cfg_file = other / "config.json"
    cfg_file.write_text(cfg_file.read_text().replace("{", '{\n  "other_marker": 1,', 1))
    cfg = {**read_config(home), "base_model": "consolidated_models/other"}
    (home / "config.json").write_text(json.dumps(cfg))
    fp_old, fp_other = base_fingerprint(home / BASE_REL), base_fingerprint(other)
    with pytest.raises(ConsolidationError) as err:
        consolidate(home, cfg, "x")
    msg = str(err.value)
    assert fp_old in msg and fp_other in msg and "other" in msg and "tiny" in msg
    assert tree_hashes(home / "current_model") == template["adapter"]
    assert sorted(p.name for p in (home / "consolidated_models").iterdir()) == ["other", "tiny"]
    assert read_config(home) == cfg


def test_refuses_while_daemon_runs_job_midway_or_probe_fails(template: dict, tmp_path: Path) -> None:
    home = clone(template, tmp_path)
    cfg = read_config(home)
    lock = DaemonLock(Layout(home)).acquire()
    try:
        with pytest.raises(ConsolidationError, match="daemon is running"):
            consolidate(home, cfg, "x")
    finally:
        lock.release()
    # a merge that cannot meet the stated tolerance changes nothing (fp32 merge error is ~1e-6)
    with pytest.raises(ConsolidationError, match=r"does not reproduce base\+adapter"):
        consolidate(home, cfg, "x", probe_tolerance=1e-12)
    (home / "checkpoints" / "job-9" / "step-3").mkdir(parents=True)
    with pytest.raises(ConsolidationError, match="job-9"):
        consolidate(home, cfg, "x")
    assert tree_hashes(home / "current_model") == template["adapter"]
    assert [p.name for p in (home / "consolidated_models").iterdir()] == ["tiny"]
    assert read_config(home) == cfg and locked(home)["base_model"] == BASE_REL


# ------------------------------------------------------------------------------------ SIGKILL

# stage -> which state recovery must leave: "old" (rolled back) or "new" (rolled forward)
KILL_STAGES = {"merged": "old", "tmp_written": "old", "published": "old", "journal_written": "old",
               "current_moved": "old", "config_written": "new", "db_updated": "new"}
JOURNALLED = ("journal_written", "current_moved", "config_written", "db_updated")

# One real python process imports torch/transformers/peft once, then forks one child per stage
# (each a real process running consolidate, paused by the module's test hook and SIGKILLed
# there): five cold imports would cost ~35 s of CPU on a 2-core box.
LAUNCHER = r"""
import json, os, sys, traceback
from pathlib import Path
import torch, transformers, peft, safetensors.torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3ForCausalLM
from peft import PeftModel
from ops.consolidate import consolidate
kids = {}
for stage, home, marker in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.environ["TRAINER_CONSOLIDATE_PAUSE_AT"] = stage
            os.environ["TRAINER_CONSOLIDATE_PAUSE_MARKER"] = marker
            h = Path(home)
            consolidate(h, json.loads((h / "config.json").read_text()), "killed")
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
    kids[pid] = stage
    print(json.dumps({"stage": stage, "pid": pid}), flush=True)
while kids:
    pid, status = os.wait()
    print(json.dumps({"stage": kids.pop(pid), "exit": os.waitstatus_to_exitcode(status)}), flush=True)
"""


def assert_no_half_written_base(home: Path) -> list[Path]:
    """Every non-hidden folder in consolidated_models/ is the root or a complete consolidation."""
    new = []
    for p in sorted((home / "consolidated_models").iterdir()):
        assert not p.name.startswith(".tmp-"), f"leftover {p}"
        if p.name.startswith(".") or p.name == "tiny":
            continue
        meta = json.loads((p / CONSOLIDATION_META).read_text())
        assert base_fingerprint(p) == meta["fingerprint"], f"{p} is incomplete"
        new.append(p)
    return new


@pytest.mark.slow
def test_sigkill_at_each_stage_leaves_old_or_new_state(template: dict, tmp_path: Path) -> None:
    homes: dict[str, Path] = {}
    markers: dict[str, Path] = {}
    for stage in KILL_STAGES:
        homes[stage] = clone(template, tmp_path / stage)
        markers[stage] = tmp_path / stage / "paused"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("TRAINER_CONSOLIDATE_PAUSE_AT", None)
    spec = json.dumps([[s, str(homes[s]), str(markers[s])] for s in KILL_STAGES])
    errlog = tmp_path / "launcher.log"
    with open(errlog, "wb") as err:
        launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, spec], cwd=REPO, env=env,
                                    stdout=subprocess.PIPE, stderr=err, text=True)
    pids: dict[str, int] = {}
    exits: dict[str, int] = {}
    try:
        assert launcher.stdout is not None
        for _ in KILL_STAGES:
            line = launcher.stdout.readline()
            assert line, "launcher died:\n" + errlog.read_text()[-3000:]
            msg = json.loads(line)
            pids[msg["stage"]] = msg["pid"]
        deadline = time.monotonic() + 180
        waiting = set(KILL_STAGES)
        while waiting and time.monotonic() < deadline:
            for stage in sorted(waiting):
                if markers[stage].exists():
                    os.kill(pids[stage], signal.SIGKILL)   # exactly at that stage
                    waiting.discard(stage)
            if launcher.poll() is not None:
                break
            time.sleep(0.05)
        for line in launcher.stdout:  # the launcher reports each child's end, then exits
            msg = json.loads(line)
            exits[msg["stage"]] = msg["exit"]
        launcher.wait(60)
        assert not waiting, f"never paused: {waiting}; exits {exits}\n" + errlog.read_text()[-3000:]
    finally:
        if launcher.poll() is None:
            for pid in pids.values():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            launcher.kill()
            launcher.wait(30)
    assert exits == {s: -signal.SIGKILL for s in KILL_STAGES}, exits

    old_base = BASE_REL
    for stage, expect in KILL_STAGES.items():
        home = homes[stage]
        journal = home / "status" / "consolidation.json"
        assert journal.exists() == (stage in JOURNALLED), stage
        leftover = list((home / "consolidated_models").glob(".tmp-*"))
        assert len(leftover) == (stage == "tmp_written"), stage
        done = recover_consolidation(home)
        assert (done is None) == (stage in ("merged", "published")), (stage, done)
        assert not journal.exists()
        assert recover_consolidation(home) is None  # idempotent
        news = assert_no_half_written_base(home)
        cfg = read_config(home)
        if expect == "old":
            assert cfg["base_model"] == old_base, stage
            assert tree_hashes(home / "current_model") == template["adapter"], stage
            assert locked(home)["base_model"] == old_base
            assert not list((home / "snapshots").glob("*__pre-consolidation"))
            # a base published before the crash stays (complete, verified, unused): never deleted
            assert len(news) == (0 if stage in ("merged", "tmp_written") else 1), stage
        else:
            assert len(news) == 1 and cfg["base_model"] == f"consolidated_models/{news[0].name}", stage
            assert not (home / "current_model").exists(), stage
            (backup,) = (home / "snapshots").glob("*__pre-consolidation")
            files = tree_hashes(backup)
            assert {k: files[k] for k in template["adapter"]} == template["adapter"]
            assert json.loads((backup / "snapshot.json").read_text())["consolidated_into"] == cfg["base_model"]
            assert locked(home)["base_model"] == cfg["base_model"], stage
        assert {k: v for k, v in cfg.items() if k != "base_model"} == \
            {k: v for k, v in read_config(template["home"]).items() if k != "base_model"}

    # after a rolled-back crash the home consolidates normally (the orphan folder stays)
    home = homes["current_moved"]
    result = consolidate(home, read_config(home), "again")
    assert read_config(home)["base_model"] == result["new_base"]
    assert len(assert_no_half_written_base(home)) == 2
