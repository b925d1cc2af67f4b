"""Tokenize once: the memory-mapped token cache is built on the first attempt and reused by a
resume (no re-tokenization: asserted from the events, not from timings)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from core.config import Config, config_to_dict
from core.paths import Layout
from trainer import tokenbuild, tokencache
from trainer.data import load_examples
from daemon.generator import generate_records
from core.interface import Outcome
from trainer.recipe import QLoRATrainer
from trainer.train import make_job
from trainer_helpers import ListSink, NoControl, StopAfter


def _data(tmp_path: Path, n: int = 40) -> Path:
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in generate_records(n, seed=3)), encoding="utf-8")
    return data


def _logs(sink: ListSink) -> list[str]:
    return [e["message"] for e in sink.of("log")]


def test_a_resume_reuses_the_cache_instead_of_tokenizing_again(tiny_base: Path, tmp_path: Path) -> None:
    data, home = _data(tmp_path), tmp_path / "home"
    cfg = config_to_dict(Config(base_model=str(tiny_base), max_length=64, batch_size=2, lora_r=4,
                                checkpoint_every_steps=1000))
    job = make_job(data, home, cfg, job_id=1)
    first = ListSink()
    r1 = QLoRATrainer().run(job, first, StopAfter(first, 2))
    assert r1.outcome is Outcome.STOPPED
    assert any("tokenizing 40 lines into" in m for m in _logs(first))
    assert [e for e in first.of("preparing") if e["phase"] == "tokenizing"]
    (entry,) = [d for d in Layout(home).token_cache.iterdir()]
    assert entry.name.startswith(job.sha256[:16])
    assert first.of("started")[0]["data_cache"]["hit"] is False

    second = ListSink()
    r2 = QLoRATrainer().run(job, second, NoControl())
    assert r2.outcome is Outcome.COMPLETED, r2.reason
    started = second.of("started")[0]
    assert started["resumed_from_step"] == 2 and started["data_cache"]["hit"] is True
    assert any("token cache hit" in m for m in _logs(second))
    assert not [e for e in second.of("preparing") if e["phase"] == "tokenizing"]   # not tokenized again
    assert started["dataset"] == first.of("started")[0]["dataset"]

    # the cache holds exactly what the list-based reader yields (in its shuffled order)
    stream = tokencache.open_stream(data, _tokenizer(tiny_base), cache_root=Layout(home).token_cache,
                                    sha256=job.sha256, max_length=64, truncation="keep_answer")
    assert stream.hit
    cached = [stream.data[i] for i in range(len(stream.data))]
    exs, _ = load_examples(data, _tokenizer(tiny_base), max_length=64)
    assert sorted(cached, key=lambda e: e.line) == exs and [e.line for e in cached] != [e.line for e in exs]
    assert stream.data.ids.dtype == np.int32 and isinstance(stream.data.ids, np.memmap)


def _tokenizer(base: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(base)


def test_the_key_changes_with_what_the_tokens_depend_on(tiny_base: Path, tmp_path: Path) -> None:
    tok = _tokenizer(tiny_base)
    sha = "ab" * 32
    names = {tokencache.entry_name(tokencache.cache_key(sha, tok, max_length=m, truncation=t))
             for m in (64, 128) for t in ("keep_answer", "truncate")}
    assert len(names) == 4 and all(n.startswith(sha[:16]) for n in names)
    tok.chat_template = tok.chat_template + " "
    assert tokencache.entry_name(tokencache.cache_key(sha, tok, max_length=64, truncation="keep_answer",
                                                      seed=1)) not in names
    other = tokencache.entry_name(tokencache.cache_key(sha, tok, max_length=64, truncation="keep_answer"))
    assert other not in names


def _all(stream: tokencache.TokenStream) -> list:
    return [stream.data[i] for i in range(len(stream.data))]


def test_a_killed_build_continues_where_it_stopped(tiny_base: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokenbuild, "BLOCK", 4)
    tok, data, root = _tokenizer(tiny_base), _data(tmp_path, 40), tmp_path / "cache"
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines + lines[:8]) + "\n")       # 8 duplicates, spread by the shuffle
    sha, kw = "cd" * 32, dict(max_length=64, truncation="keep_answer")
    full = tokencache.prepare(data, tok, cache_root=tmp_path / "other", sha256=sha, **kw)
    whole = _all(full)
    assert full.report.count("duplicate") >= 8

    stream = tokencache.open_stream(data, tok, cache_root=root, sha256=sha, **kw)
    stream.wait(8)
    stream.close()                          # the attempt ends mid-build (a stop, a kill after a block)
    done = stream.build.positions
    assert 8 <= done and not stream.build.complete or done == 48
    other_key = root / f".partial-{sha[:16]}-0000other0000key"   # this file under another key: removed
    other_file = root / ".partial-0000000000000000-0000other0000file"   # another file's: kept
    other_key.mkdir()
    other_file.mkdir()
    again = tokencache.open_stream(data, tok, cache_root=root, sha256=sha, **kw)
    again.wait(1)               # already built: returns once the file's line count is known
    assert again.total == 48 and not again.hit and again.build.resumed_from == done
    again.wait_complete()
    assert again.report.reasons == full.report.reasons         # duplicates across the restart too
    assert _all(again) == whole and not other_key.exists() and other_file.exists()
    assert tokencache.open_stream(data, tok, cache_root=root, sha256=sha, **kw).hit

    (again.dest / "ends.i64").unlink()     # damaged: rebuilt, not trusted
    rebuilt = tokencache.prepare(data, tok, cache_root=root, sha256=sha, **kw)
    assert not rebuilt.hit and rebuilt.build.resumed_from == 0 and _all(rebuilt) == whole
    shutil.rmtree(root)


def test_the_format_is_the_first_records_in_file_order(tiny_base: Path, tmp_path: Path) -> None:
    """Lines are tokenized in a shuffled order, but the file's format is decided as the daemon's
    validation decides it: by its first record in file order."""
    seed = next(s for s in range(100) if tokencache.line_order(3, s)[0] == 2)   # the alpaca line first
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": "yo"}, {"role": "assistant", "content": "hey"}]},
        {"instruction": "add", "output": "3"}]) + "\n")
    stream = tokencache.prepare(data, _tokenizer(tiny_base), cache_root=tmp_path / "c", sha256="ef" * 32,
                                max_length=64, truncation="keep_answer", seed=seed)
    assert stream.report.format == "messages" and len(stream.data) == 2
    assert stream.report.reasons == {"mixed_format": {"count": 1, "lines": [3]}}
