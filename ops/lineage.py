"""Lineage: the chain of bases and adapters, newest first, with the datasets in each.

A consolidated base names its parent in its ``consolidation.json``; the chain is followed from
the configured base to the root base. Also here: how config.json names a base folder
(:func:`config_value`) and where base fingerprints are cached (:func:`fingerprint_cache`), which
a consolidation writes into that chain.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from core.atomic import read_json
from core.paths import Layout
from core.paths import resolve_under
from core.promotion import moves
from core.switch import CONSOLIDATION_META, dataset_entries

log = logging.getLogger("ops.consolidate")  # the name its log lines have always had


def config_value(path: Path, home: Path) -> str:
    """How config.json names *path*: relative to home when under it, else absolute."""
    try:
        return str(Path(path).resolve().relative_to(Path(home).resolve()))
    except ValueError:
        return str(Path(path).resolve())


def fingerprint_cache(home: Path) -> Path:
    from trainer.model import FINGERPRINT_CACHE_NAME

    return Layout(Path(home)).checkpoints / FINGERPRINT_CACHE_NAME


def lineage(home: Path, config: dict[str, Any]) -> list[dict[str, Any]]:
    """Newest first: the live adapter (if any), then the configured base and its ancestors.

    The adapter entry also has ``switched`` (the promote / rollback that made it current_model/,
    if one did) and ``moves`` (every promote / rollback recorded in state.db, oldest first).

    Each base entry: kind ("consolidated" | "root"), path, fingerprint, description, created_at,
    exists, and for consolidated bases the adapters and datasets merged into it (with sha256).
    """
    home = Path(home)
    layout = Layout(home)
    out: list[dict[str, Any]] = []
    cur = layout.current_model
    state = read_json(cur / "trainer_state.json", None) if (cur / "adapter_config.json").is_file() else None
    if isinstance(state, dict):
        out.append({"kind": "adapter", "path": config_value(cur, home),
                    "base_model": state.get("base_model"), "fingerprint": None,
                    "base_fingerprint": state.get("base_fingerprint"),
                    "description": "live adapter (current_model/)",
                    "created_at": state.get("updated_at"), "total_steps": state.get("total_steps"),
                    "datasets": dataset_entries(state),
                    # how it became current_model/ (trainer-ctl promote / rollback), and every such move
                    "switched": state.get("switched"), "moves": moves(home)})

    raw = config.get("base_model")
    path = resolve_under(home, raw)
    known_fp: str | None = None
    seen: set[str] = set()
    while path is not None:
        key = str(path.resolve()) if path.exists() else str(path)
        if key in seen or len(seen) > 1000:
            log.warning("lineage: cycle at %s", path)
            break
        seen.add(key)
        meta = read_json(path / CONSOLIDATION_META, None) if path.is_dir() else None
        entry: dict[str, Any] = {"path": config_value(path, home) if path.exists() else str(path),
                                 "exists": path.is_dir()}
        if isinstance(meta, dict):
            entry.update(kind="consolidated", fingerprint=meta.get("fingerprint"),
                         description=meta.get("description"), created_at=meta.get("created_at"),
                         adapters=meta.get("adapters") or [], datasets=meta.get("datasets") or [],
                         probe=meta.get("probe"))
            out.append(entry)
            parent = meta.get("parent") or {}
            known_fp = parent.get("fingerprint")
            path = resolve_under(home, parent.get("path")) or resolve_under(home, parent.get("abs_path"))
            if path is not None and not path.exists() and parent.get("abs_path"):
                path = Path(parent["abs_path"])
            continue
        fp = known_fp
        if fp is None and path.is_dir():
            try:
                from trainer.model import base_fingerprint
                fp = base_fingerprint(path, fingerprint_cache(home))
            except OSError as exc:
                log.warning("lineage: cannot fingerprint %s: %s", path, exc)
        info = read_json(path / "base.json", None) if path.is_dir() else None
        desc = f"root base ({info.get('kind')})" if isinstance(info, dict) and info.get("kind") else "root base"
        entry.update(kind="root", fingerprint=fp, description=desc,
                     created_at=info.get("created_at") if isinstance(info, dict) else None,
                     adapters=[], datasets=[])
        out.append(entry)
        break
    return out
