"""GET /api/samples: the probe prompts' answers per prompt, oldest first, from state.db's probes
table as the daemon writes it (core/probetable.py), against a real monitor subprocess."""
from __future__ import annotations

from pathlib import Path

from core import probetable
from core.statedb import StateDB
from daemon_helpers import wait_for
from monitor_helpers import Monitor, make_home

HOSTILE = "<img src=x onerror=alert(1)>"


def probe_round(db: StateDB, job_id: int, phase: str, step: int, answers: dict[str, str], dataset: str) -> None:
    """One ``probe`` event, recorded the way the daemon records it (daemon/jobflow.py)."""
    probetable.add(db, {"event": "probe", "job_id": job_id, "phase": phase, "step": step, "seconds": 0.25,
                        "probes": [{"prompt": p, "answer": a, "source": "config" if p != HOSTILE else "add.jsonl",
                                    "reference": "5" if p == HOSTILE else None} for p, a in answers.items()]},
                   dataset=dataset, base_fingerprint="fp")


def test_samples_per_prompt_oldest_first(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home", trainer="qlora")
    db = StateDB(home.path / "status" / "state.db")
    try:
        probe_round(db, 1, "base", 0, {"What is 2 + 3?": "", HOSTILE: "base says"}, "add.jsonl")
        for step in (2, 4, 6):
            probe_round(db, 1, "step", step, {"What is 2 + 3?": f"it is {step}", HOSTILE: f"s{step}"}, "add.jsonl")
        probe_round(db, 1, "end", 7, {"What is 2 + 3?": "5", HOSTILE: HOSTILE}, "add.jsonl")
        probe_round(db, 1, "end", 7, {"What is 2 + 3?": "5", HOSTILE: HOSTILE}, "add.jsonl")   # a retry: replaced
    finally:
        db.close()
    mon = Monitor(home.path).start()
    try:
        with mon.client() as c:
            d = c.get("/api/samples").json()
            assert d["available"] is True and d["reason"] is None
            assert [p["prompt"] for p in d["prompts"]] == ["What is 2 + 3?", HOSTILE]     # configured ones first
            mine, other = d["prompts"]
            assert mine["source"] == "config" and mine["reference"] is None
            assert other["source"] == "add.jsonl" and other["reference"] == "5"
            assert other["answers"][-1]["answer"] == HOSTILE
            assert [(a["phase"], a["step"], a["answer"]) for a in mine["answers"]] == [
                ("base", 0, ""), ("step", 2, "it is 2"), ("step", 4, "it is 4"), ("step", 6, "it is 6"),
                ("end", 7, "5")]
            assert all(a["job_id"] == 1 and a["dataset"] == "add.jsonl" and a["at"] > 0 for a in mine["answers"])
            assert mine["total"] == 5 and mine["omitted"] == 0
            # the first answer (the base's) and the newest
            cut = c.get("/api/samples", params={"per_prompt": 3}).json()["prompts"][0]
            assert [a["step"] for a in cut["answers"]] == [0, 6, 7] and cut["total"] == 5 and cut["omitted"] == 2
            assert len(c.get("/api/samples", params={"max_prompts": 1}).json()["prompts"]) == 1
            assert c.get("/api/samples", params={"per_prompt": 1}).status_code == 422
            spec = c.get("/openapi.json").json()
            ok = spec["paths"]["/api/samples"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
            assert ok == {"$ref": "#/components/schemas/Samples"}
            answer = spec["components"]["schemas"]["SampleAnswer"]["properties"]
            assert answer["phase"]["enum"] == ["base", "step", "end"]
    finally:
        mon.stop()


def test_no_samples_says_why(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")                # the stand-in trainer, no state.db yet
    mon = Monitor(home.path).start()
    try:
        with mon.client() as c:
            d = c.get("/api/samples").json()
            assert d["available"] is False and d["prompts"] == [] and "stand-in trainer" in d["reason"]
            home.write_config(trainer="qlora", eval_fraction=0)
            wait_for(lambda: "no probe prompts: set probe_prompts or keep eval_fraction > 0"
                     in c.get("/api/samples").json()["reason"], timeout=5, what="the reason for the config")
            home.write_config(trainer="qlora")
            StateDB(home.path / "status" / "state.db").close()        # a daemon ran, no answers yet
            wait_for(lambda: c.get("/api/samples").json()["reason"].startswith(
                "no samples yet: set probe_prompts or keep eval_fraction > 0"), timeout=5, what="no answers yet")
    finally:
        mon.stop()
