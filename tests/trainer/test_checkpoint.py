"""Checkpoint folders, RNG capture, the current_model swap and its recovery, fingerprint cache."""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from trainer import adapter_store
from trainer.checkpoint import (CheckpointError, CheckpointManager, capture_rng_state, load_checkpoint,
                                restore_rng_state, save_torch, verify_manifest)
from trainer.model import FINGERPRINT_CACHE_NAME, base_fingerprint


def fake_checkpoint(step: int, value: float = 0.0):
    """A write_files callback producing every file a real checkpoint has."""
    def write(d: Path) -> None:
        (d / "adapter_config.json").write_text(json.dumps({"r": 4}))
        save_file({"w": torch.full((4, 4), float(value))}, str(d / "adapter_model.safetensors"))
        save_torch({"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}, d / "optimizer.pt")
        save_torch({"last_epoch": step}, d / "scheduler.pt")
        save_torch(capture_rng_state(), d / "rng.pt")
        (d / "state.json").write_text(json.dumps({"step": step, "epoch": 0, "batch_index": step}))
    return write


def test_save_is_atomic_verified_and_pruned(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path / "job-1", keep=2)
    (mgr.root).mkdir()
    stale = mgr.root / ".tmp-step-9-12345"  # a crash mid-write leaves only a hidden temp dir
    stale.mkdir()
    (stale / "junk").write_text("x")
    for step in (1, 2, 3):
        path = mgr.save(step, fake_checkpoint(step, value=step))
        verify_manifest(path)
        manifest = json.loads((path / "manifest.json").read_text())
        assert set(manifest["files"]) == {"adapter_config.json", "adapter_model.safetensors",
                                          "optimizer.pt", "scheduler.pt", "rng.pt", "state.json"}
    assert [s for s, _ in mgr.list_steps()] == [2, 3]  # keep last 2
    assert not stale.exists() and not list(mgr.root.glob(".tmp-*"))
    payload, skipped = mgr.load_latest()
    assert payload is not None and payload.step == 3 and not skipped
    assert float(payload.adapter_state["w"][0, 0]) == 3.0
    # saving the same step again (pause right after a periodic checkpoint) keeps the folder
    assert mgr.save(3, fake_checkpoint(3, value=99)) == mgr.step_dir(3)
    assert float(load_checkpoint(mgr.step_dir(3)).adapter_state["w"][0, 0]) == 3.0


@pytest.mark.parametrize("damage", ["flip-byte", "missing-file", "load-error", "no-manifest"])
def test_corrupt_newest_falls_back_to_previous(tmp_path: Path, damage: str) -> None:
    mgr = CheckpointManager(tmp_path / "job-7", keep=3)
    mgr.save(2, fake_checkpoint(2, value=2))
    newest = mgr.save(4, fake_checkpoint(4, value=4))
    if damage == "flip-byte":
        p = newest / "adapter_model.safetensors"
        raw = bytearray(p.read_bytes())
        raw[-1] ^= 0x01
        p.write_bytes(bytes(raw))
    elif damage == "missing-file":
        (newest / "optimizer.pt").unlink()
    elif damage == "no-manifest":
        (newest / "manifest.json").unlink()
    else:  # files match their manifest, but one cannot be loaded (written garbage, re-manifested)
        (newest / "rng.pt").write_bytes(b"not a torch file")
        from trainer.checkpoint import write_manifest
        write_manifest(newest)
    with pytest.raises(CheckpointError):
        load_checkpoint(newest)
    payload, skipped = mgr.load_latest()
    assert payload is not None and payload.step == 2
    assert len(skipped) == 1 and "step-4" in skipped[0]


def test_no_valid_checkpoint_means_fresh_start(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path / "job-1", keep=3)
    assert mgr.load_latest() == (None, [])
    only = mgr.save(1, fake_checkpoint(1))
    (only / "state.json").write_text("{}")
    payload, skipped = mgr.load_latest()
    assert payload is None and len(skipped) == 1


def test_rng_state_roundtrip_through_weights_only_load(tmp_path: Path) -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(1), np.random.randn()
    save_torch(capture_rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), float(np.random.randn()), float(torch.rand(1)))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), float(np.random.randn()), float(torch.rand(1))) == expected


# ------------------------------------------------------------------ current_model swap

def adapter_writer(tag: str):
    def write(d: Path) -> None:
        (d / "adapter_config.json").write_text(json.dumps({"tag": tag}))
        (d / "adapter_model.safetensors").write_bytes(tag.encode() * 10)
    return write


def current_tag(home: Path) -> str | None:
    cur, state = adapter_store.read_current(home)
    return None if cur is None else json.loads((cur / "adapter_config.json").read_text())["tag"]


def test_publish_replaces_current_model_and_leaves_no_temp(tmp_path: Path) -> None:
    adapter_store.publish_current(tmp_path, adapter_writer("v1"), {"datasets": [1]})
    adapter_store.publish_current(tmp_path, adapter_writer("v2"), {"datasets": [1, 2]})
    assert current_tag(tmp_path) == "v2"
    verify_manifest(tmp_path / "current_model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current_model"]
    assert adapter_store.read_current(tmp_path)[1] == {"datasets": [1, 2]}


@pytest.mark.parametrize("crash_after,first_publish,expected,action", [
    ("new", False, "v1", "cleaned"),          # new adapter written, nothing swapped: old stays
    ("old", False, "v2", "rolled_forward"),   # old moved aside, new complete: finish the swap
    ("new", True, "v2", "rolled_forward"),    # very first publish, new complete: take it
])
def test_crash_mid_swap_is_recovered(tmp_path: Path, crash_after: str, first_publish: bool,
                                     expected: str, action: str) -> None:
    if not first_publish:
        adapter_store.publish_current(tmp_path, adapter_writer("v1"), {})
    adapter_store.publish_current(tmp_path, adapter_writer("v2"), {}, _crash_after=crash_after)
    assert adapter_store.recover_current_model(tmp_path) == action
    assert current_tag(tmp_path) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current_model"]


def test_incomplete_new_with_old_rolls_back(tmp_path: Path) -> None:
    adapter_store.publish_current(tmp_path, adapter_writer("v1"), {})
    os.rename(tmp_path / "current_model", tmp_path / "current_model.old")
    (tmp_path / "current_model.new").mkdir()  # torn: no manifest
    (tmp_path / "current_model.new" / "adapter_config.json").write_text("{")
    assert adapter_store.recover_current_model(tmp_path) == "rolled_back"
    assert current_tag(tmp_path) == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current_model"]


def test_snapshot_names_and_metadata(tmp_path: Path) -> None:
    cur = adapter_store.publish_current(tmp_path, adapter_writer("v1"), {})
    a = adapter_store.write_snapshot(tmp_path, "my data.jsonl", cur, {"job_id": 3, "dataset_sha256": "ab"})
    b = adapter_store.write_snapshot(tmp_path, "my data.jsonl", cur, {"job_id": 4, "dataset_sha256": "cd"})
    assert a != b and a.name.endswith("__my_data") and "__my_data" in b.name
    verify_manifest(a)
    assert json.loads((a / "snapshot.json").read_text())["job_id"] == 3
    assert (a / "adapter_model.safetensors").read_bytes() == (cur / "adapter_model.safetensors").read_bytes()
    assert adapter_store.find_snapshot(tmp_path, 4, "cd") == b
    assert adapter_store.find_snapshot(tmp_path, 4, "zz") is None


# ------------------------------------------------------------------ fingerprint

def test_fingerprint_cache_and_sensitivity(tiny_base: Path, tmp_path: Path) -> None:
    base = shutil.copytree(tiny_base, tmp_path / "base")
    cache = tmp_path / "checkpoints" / FINGERPRINT_CACHE_NAME
    fp = base_fingerprint(base, cache)
    assert fp == base_fingerprint(base) and len(fp) == 64
    entries = json.loads(cache.read_text())
    assert {Path(k).name for k in entries} == {"config.json", "model.safetensors"}
    # a cached entry is trusted while size and mtime match (no re-hash of GBs)...
    weights = str((base / "model.safetensors").resolve())
    entries[weights]["sha256"] = "0" * 64
    cache.write_text(json.dumps(entries))
    assert base_fingerprint(base, cache) != fp
    # ... and re-hashed when the file changes
    os.utime(base / "model.safetensors", ns=(1, 1))
    assert base_fingerprint(base, cache) == fp
    # tokenizer files do not count; weights and config.json do
    (base / "tokenizer_config.json").write_text("{}")
    assert base_fingerprint(base, cache) == fp
    cfg = json.loads((base / "config.json").read_text())
    cfg["note"] = 1
    (base / "config.json").write_text(json.dumps(cfg))
    assert base_fingerprint(base, cache) != fp
