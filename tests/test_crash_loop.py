"""bench/crash_loop.py: its checks catch a lost, duplicated or retrained file and a changed adapter;
a reduced crash loop (2 files of ~24 steps, 4 SIGKILLs) keeps every invariant with the real trainer."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.paths import Layout
from core.statedb import StateDB
from core.states import JobState

REPO = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("crash_loop", REPO / "bench" / "crash_loop.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _finished_home(root: Path, files: dict[str, bytes]) -> tuple[Path, list[tuple[str, str]]]:
    """What a clean run leaves: every file in done/ with a done row, the lineage in order."""
    home = root / "home"
    Layout(home).ensure()
    db = StateDB(home / "status" / "state.db")
    expected, datasets = [], []
    for i, (name, data) in enumerate(files.items(), 1):
        sha = hashlib.sha256(data).hexdigest()
        (home / "queue" / "done" / name).write_bytes(data)
        db.insert_job(name=name, original_name=name, state=JobState.DONE, sha256=sha, size=len(data))
        expected.append((name, sha))
        datasets.append({"name": name, "sha256": sha, "job_id": i, "steps": 3})
    db.close()
    (home / "current_model").mkdir()
    (home / "current_model" / "trainer_state.json").write_text(
        json.dumps({"datasets": datasets, "total_steps": 3 * len(datasets)}))
    return home, expected


def _all_hold(mod, v) -> bool:
    return all(mod.invariants_of(v, "X").values())


def test_the_checks_catch_lost_duplicated_retrained_and_a_changed_adapter(tmp_path):
    mod = _bench()
    files = {"01_a.jsonl": b'{"text": "a"}\n', "02_b.jsonl": b'{"text": "b"}\n'}
    home, expected = _finished_home(tmp_path, files)
    v = mod.verify_home(home, expected)
    assert _all_hold(mod, v), mod.invariants_of(v, "X")
    assert v["done_exactly_once"] == 2 and not v["lost"] and not v["duplicated"] and v["lineage_exact"]

    # a second copy of a file (e.g. taken in twice) is a duplicate
    shutil.copy(home / "queue/done/01_a.jsonl", home / "queue/failed/01_a.2.jsonl")
    v = mod.verify_home(home, expected)
    assert v["duplicated"] == ["01_a.jsonl"] and not _all_hold(mod, v)
    (home / "queue/failed/01_a.2.jsonl").unlink()

    # a file left in processing/ is neither done nor lost, and fails the run
    os.rename(home / "queue/done/02_b.jsonl", home / "queue/processing/02_b.jsonl")
    v = mod.verify_home(home, expected)
    assert v["folders"]["processing"] == 1 and v["done_exactly_once"] == 1 and not _all_hold(mod, v)
    # ... and gone from every folder, it is lost
    (home / "queue/processing/02_b.jsonl").unlink()
    v = mod.verify_home(home, expected)
    assert v["lost"] == ["02_b.jsonl"] and not _all_hold(mod, v)
    (home / "queue/done/02_b.jsonl").write_bytes(files["02_b.jsonl"])
    assert _all_hold(mod, mod.verify_home(home, expected))

    # a dataset trained twice (or out of drop order) in current_model/'s lineage
    state_path = home / "current_model/trainer_state.json"
    good = state_path.read_text()
    st = json.loads(good)
    state_path.write_text(json.dumps({**st, "datasets": st["datasets"] + st["datasets"][:1]}))
    v = mod.verify_home(home, expected)
    assert v["duplicated"] == ["01_a.jsonl"] and not v["lineage_exact"] and not _all_hold(mod, v)
    state_path.write_text(json.dumps({**st, "datasets": st["datasets"][::-1]}))
    assert not mod.verify_home(home, expected)["lineage_exact"]
    state_path.write_text(good)

    # a state.db row not done
    db = StateDB(home / "status" / "state.db")
    db.conn.execute("UPDATE jobs SET state = 'failed' WHERE name = '02_b.jsonl'")
    db.close()
    v = mod.verify_home(home, expected)
    assert v["db_problems"] and not _all_hold(mod, v)

    # adapters: equal, then one value off by 1e-7, then a missing tensor
    import torch
    from safetensors.torch import save_file
    t = {"a.lora_A.weight": torch.randn(4, 8), "a.lora_B.weight": torch.randn(8, 4)}
    save_file(t, str(tmp_path / "x.safetensors"))
    save_file({k: v.clone() for k, v in t.items()}, str(tmp_path / "y.safetensors"))
    same = mod.compare_adapters(tmp_path / "x.safetensors", tmp_path / "y.safetensors")
    assert same["max_abs_diff"] == 0.0 and same["bitwise_equal"] and same["tensors"] == 2
    off = {k: v.clone() for k, v in t.items()}
    off["a.lora_B.weight"][3, 1] += 1e-6
    save_file(off, str(tmp_path / "y.safetensors"))
    diff = mod.compare_adapters(tmp_path / "x.safetensors", tmp_path / "y.safetensors")
    assert 0 < diff["max_abs_diff"] < 1e-5 and diff["worst_tensor"] == "a.lora_B.weight"
    assert diff["unequal_tensors"] == 1
    save_file({"a.lora_A.weight": t["a.lora_A.weight"]}, str(tmp_path / "y.safetensors"))
    assert mod.compare_adapters(tmp_path / "x.safetensors", tmp_path / "y.safetensors")["max_abs_diff"] == float("inf")


@pytest.mark.slow
def test_a_reduced_crash_loop_keeps_every_invariant(tmp_path):
    """2 files, 4 SIGKILLs of the daemon and the worker: all done once, adapter bitwise equal."""
    out = tmp_path / "crash_loop.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "crash_loop.py"), "--files", "2", "--kills", "4",
         "--records", "1200", "--seed", "3", "--workdir", str(tmp_path / "work"), "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    took = time.monotonic() - t0
    assert out.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads(out.read_text())
    failed = [k for k, ok in res["invariants"].items() if not ok]
    assert not failed and res["passed"], (failed, proc.stdout[-4000:])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    a, b = res["runs"]["A"]["verify"], res["runs"]["B"]["verify"]
    for v in (a, b):
        assert v["done_exactly_once"] == 2 and v["folders"]["done"] == 2
        assert v["folders"]["processing"] == v["folders"]["failed"] == v["folders"]["pending"] == 0
        assert not v["lost"] and not v["duplicated"] and not v["extra_files"]
        assert v["db_rows"] == 2 and not v["db_problems"]
        assert [d["name"] for d in v["lineage"]] == ["01_arithmetic.jsonl", "02_syllables.jsonl"]
    assert res["adapter"]["max_abs_diff"] == 0.0 and res["adapter"]["bitwise_equal"]
    assert b["total_steps"] == a["total_steps"] > 0
    kills = res["kills"]
    assert kills["landed"] == 4, res["runs"]["B"]["kills"]
    # the kills hit a running worker, and the daemon came back every time
    assert kills["daemon_kills_with_live_worker"] + sum(r["worker"] for r in kills["by_moment_and_target"].values()) >= 2
    assert len(res["runs"]["B"]["launches"]) == 1 + sum(r["daemon"] for r in kills["by_moment_and_target"].values())
    assert all(l["ok"] for l in res["runs"]["B"]["launches"])
    assert sum(b["attempts"].values()) > sum(a["attempts"].values()) == 2
    print(f"reduced crash loop: {took:.0f} s, kills {kills['by_moment_and_target']}")
