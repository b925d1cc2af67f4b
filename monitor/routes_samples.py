"""GET /api/samples: the probe prompts' answers over time (core/probetable.py), per prompt.

The dashboard's Samples panel: per prompt its answers oldest first (the base's, then after steps
and jobs), each with its step, job, dataset and time, and the reference answer where there is
one; a plain reason when there is nothing to show.
"""
from __future__ import annotations

import sqlite3
import time
from typing import Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from core import probetable
from monitor.readers import NoDatabase, open_db
from monitor.services import Services, services

router = APIRouter(tags=["samples"])


class SampleAnswer(BaseModel):
    """One answer of the model to the prompt."""
    id: int = Field(description="its row in state.db's probes table (newer rows have larger ids)")
    answer: str = Field(description="the greedy answer, as generated (special tokens left out)")
    phase: Literal["base", "step", "end"] = Field(
        description="base: the base model alone (the adapter disabled); step: during a job "
                    "(probe_every_steps); end: the adapter at the end of the job")
    step: int = Field(description="the job's step (0 for the base)")
    job_id: int = Field(description="the job that generated it")
    dataset: str | None = Field(description="that job's file")
    at: float = Field(description="when it was recorded (unix time)")


class SamplePrompt(BaseModel):
    """A probe prompt and its answers, oldest first."""
    prompt: str
    source: str = Field(description='"config" (probe_prompts), or the dataset whose retention set it is from')
    reference: str | None = Field(description="the reference answer (a retention example's own answer)")
    total: int = Field(description="answers recorded for this prompt")
    omitted: int = Field(description="answers left out between the first and the newest (per_prompt)")
    answers: list[SampleAnswer]


class Samples(BaseModel):
    """The Samples panel's data, or the reason there is none."""
    available: bool = Field(description="true when there is at least one answer")
    reason: str | None = Field(description="why there is nothing to show; null when available")
    prompts: list[SamplePrompt]
    updated_at: float


def _reason(svc: Services) -> str:
    cfg = svc.config()
    if cfg.trainer == "standin":
        return ('no samples: the stand-in trainer (config "trainer": "standin") runs no model; the QLoRA '
                "trainer answers the probe prompts")
    if not cfg.probe_prompts and (cfg.eval_fraction <= 0 or cfg.probe_retention_examples <= 0
                                  or cfg.retention_eval_datasets <= 0):
        return ("no samples: no probe prompts: set probe_prompts or keep eval_fraction > 0 (with "
                "probe_retention_examples and retention_eval_datasets > 0)")
    return ("no samples yet: set probe_prompts or keep eval_fraction > 0; the base's answers come when a "
            "job starts, the adapter's when it ends" + (f" and every {cfg.probe_every_steps} steps"
                                                        if cfg.probe_every_steps else ""))


@router.get("/api/samples", response_model=Samples,
            summary="the probe prompts' answers over time (base, steps, end of each job), per prompt")
def get_samples(per_prompt: int = Query(50, ge=2, le=1000,
                                        description="answers per prompt: the first and the newest"),
                max_prompts: int = Query(100, ge=1, le=1000,
                                         description="prompts: the configured ones first, then the newest "
                                                     "datasets'"),
                svc: Services = Depends(services)) -> Samples:
    try:
        db = open_db(svc.layout)
    except NoDatabase:                  # no daemon has run here yet
        return Samples(available=False, reason=_reason(svc), prompts=[], updated_at=time.time())
    try:
        rows = probetable.read_rows(db, per_prompt)
    except sqlite3.Error as exc:
        return Samples(available=False, reason=f"status/state.db could not be read: {exc}", prompts=[],
                       updated_at=time.time())
    finally:
        db.close()
    prompts = probetable.series(rows, max_prompts)
    return Samples(available=bool(prompts), reason=None if prompts else _reason(svc),
                   prompts=[SamplePrompt(**p) for p in prompts], updated_at=time.time())
