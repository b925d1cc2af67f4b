"""Is it forgetting: each file keeps a retention set (held out, never trained on), and after every
job the new adapter is evaluated on the retention sets of the datasets before it. Two distinct
tiny tasks: a plus b, then reverse the word. The matrix shows what B did to A."""
from __future__ import annotations

import json

import pytest

from core.statedb import StateDB
from daemon.generator import generate_records
from daemon_helpers import reverse_records, write_jsonl

CFG = dict(trainer="qlora", max_length=96, batch_size=4, gradient_accumulation=1, learning_rate=5e-3,
           lr_scheduler="constant", checkpoint_every_steps=50, layer_activity_every_steps=50,
           worker_timeout_s=120, eval_fraction=0.05, eval_max_examples=12, retention_eval_datasets=20)


@pytest.mark.slow
def test_the_forgetting_matrix_after_two_tasks(home, tiny_base, capsys):
    write_jsonl(home.path / "general.jsonl", generate_records(20, seed=9, kind="syllables"))
    home.write_config(base_model=str(tiny_base), reference_eval_file="general.jsonl", **CFG)
    write_jsonl(home.path / "inbox/add.jsonl", generate_records(300, seed=7))
    assert home.burst(timeout=300).returncode == 0
    home.write_config(base_model=str(tiny_base), reference_eval_file="general.jsonl", **{**CFG, "epochs": 2})
    write_jsonl(home.path / "inbox/reverse.jsonl", reverse_records(300, seed=8))
    r = home.burst(timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert home.files("done") == ["add.jsonl", "reverse.jsonl"]

    # each file's retention set: 5 % of 300 lines, capped at eval_max_examples
    for job_id in (1, 2):
        kept = json.loads((home.path / f"retention/job-{job_id}.json").read_text())
        assert kept["job_id"] == job_id and len(kept["examples"]) == 12

    m = json.loads((home.path / "status/eval.json").read_text())
    assert [c["after_job"] for c in m["columns"]] == [1, 2]
    by_name = {d["name"]: d for d in m["datasets"]}
    # the reference set (reference_eval_file) is row 0, its change measured from the base alone
    ref = m["datasets"][0]
    assert ref["job_id"] == 0 and ref["name"] == "reference: general.jsonl"
    assert [c["after_job"] for c in ref["cells"]] == [1, 2] and all(c["loss"] for c in ref["cells"])
    assert ref["learned_loss"] not in (ref["cells"][0]["loss"], None)      # the base's own loss
    assert ref["cells"][0]["change"] == pytest.approx(ref["cells"][0]["loss"] - ref["learned_loss"])
    add, rev = by_name["add.jsonl"], by_name["reverse.jsonl"]
    assert [c["after_job"] for c in add["cells"]] == [1, 2] and [c["after_job"] for c in rev["cells"]] == [2]
    assert add["cells"][0]["change"] == 0.0 and add["learned_loss"] == add["cells"][0]["loss"]
    after_b = add["cells"][1]
    assert after_b["loss"] is not None and after_b["tokens"] > 0
    assert after_b["change"] == pytest.approx(after_b["loss"] - add["learned_loss"])
    assert after_b["change"] > 0, m            # B (reverse the word, 3 epochs) made A worse

    r = home.ctl("eval")
    assert r.returncode == 0 and "add.jsonl #1" in r.stdout and "reference: general.jsonl" in r.stdout and "after job 2" in r.stdout, r.stdout
    assert f"({after_b['change']:+.4f})" in r.stdout
    with capsys.disabled():
        print("\nforgetting matrix (tiny base, CPU):\n" + r.stdout)
    as_json = json.loads(home.ctl("eval", "--json").stdout)
    assert as_json["datasets"] == m["datasets"]
    db = StateDB(home.path / "status/state.db")
    try:
        events = [e for e in db.events(limit=500) if e["kind"] == "retention"]
    finally:
        db.close()
    assert [e["job_id"] for e in events] == [1, 2]
    assert "3 of 3 dataset(s)" in events[-1]["message"]
    assert len(list((home.path / "retention").glob("reference-*.json"))) == 1     # tokenized once
