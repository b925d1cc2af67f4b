from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.validation import validate_file
from trainer.data import load_examples
from daemon.generator import KINDS, generate_records, write_jsonl_atomic


@pytest.mark.parametrize("kind", KINDS)
def test_records_validate_and_are_short(tmp_path: Path, tiny_tokenizer, kind: str) -> None:
    recs = generate_records(200, seed=1, kind=kind)
    assert len(recs) == 200
    path = write_jsonl_atomic(recs, tmp_path / "inbox")
    rep = validate_file(path)
    assert rep.ok, rep.reason
    assert rep.format == "messages" and rep.records == rep.valid_records == 200
    exs, drep = load_examples(path, tiny_tokenizer, max_length=64)
    assert drep.examples == 200 and drep.count("truncated") == 0
    assert max(len(e.input_ids) for e in exs) < 64
    assert len({r["messages"][0]["content"] for r in recs}) == 1  # fixed system prompt


def test_arithmetic_answers_are_right() -> None:
    for rec in generate_records(300, seed=2):
        q, a = rec["messages"][1]["content"], rec["messages"][2]["content"]
        expr = q.replace("What is", "").replace("How much is", "").replace("Compute", "")
        expr = expr.replace("= ?", "").strip(" ?.")
        x, op, y = expr.split()
        assert int(a) == (int(x) + int(y) if op == "+" else int(x) - int(y)) >= 0


def test_syllables_answers_are_right() -> None:
    for rec in generate_records(100, seed=3, kind="syllables"):
        parts = rec["messages"][1]["content"].split(": ", 1)[1].split(" + ")
        assert rec["messages"][2]["content"] == "".join(parts)


def test_determinism_and_counts() -> None:
    assert generate_records(50, seed=7) == generate_records(50, seed=7)
    assert generate_records(50, seed=7) != generate_records(50, seed=8)
    assert generate_records(10, seed=7) == generate_records(50, seed=7)[:10]
    assert generate_records(50) != generate_records(50)  # no seed: fresh each time
    assert generate_records(0, seed=1) == []
    with pytest.raises(ValueError):
        generate_records(5, kind="poetry")


def test_write_is_atomic_and_unique(tmp_path: Path) -> None:
    recs = generate_records(5, seed=0)
    a = write_jsonl_atomic(recs, tmp_path, prefix="demo")
    b = write_jsonl_atomic(recs, tmp_path, prefix="demo")
    assert a != b and a.name.startswith("demo_") and a.suffix == ".jsonl"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([a.name, b.name])  # no .tmp left
    assert [json.loads(line) for line in a.read_text().splitlines()] == recs

    def broken():
        yield recs[0]
        raise RuntimeError("generator failed midway")

    with pytest.raises(RuntimeError):
        write_jsonl_atomic(broken(), tmp_path, prefix="demo")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([a.name, b.name])
