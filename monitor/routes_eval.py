"""GET /api/eval: the forgetting matrix (the Retention panel), held and promoted adapters marked.

monitor/evalview.py builds it from state.db; the stream sends the same payload as its ``eval``
event whenever it changes.
"""
from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from monitor.evalview import DEFAULT_COLUMNS
from monitor.services import Services, services

router = APIRouter(tags=["eval"])

MAX_COLUMNS = 1000


class EvalCell(BaseModel):
    """One dataset's retention loss under one adapter."""
    after_job: int = Field(description="the adapter: the one job N made (the column)")
    loss: float | None = Field(description="mean eval loss on the dataset's retention set; null when not "
                                           "evaluated (see `skipped`) or not finite")
    change: float | None = Field(description="loss minus the loss right after the dataset was learned "
                                             "(for the reference set: minus the base model's own loss)")
    relative_change: float | None = Field(description="change / the learned loss")
    tokens: int | None = Field(description="tokens evaluated")
    skipped: str | None = Field(description="why the set was not evaluated (e.g. the time budget)")


class EvalDataset(BaseModel):
    """One row: a dataset's retention set (job_id 0: the fixed reference set)."""
    job_id: int = Field(description="the job that trained the dataset; 0 for the reference set")
    name: str | None
    reference: bool = Field(description="the reference set (reference_eval_file), always the first row")
    learned_loss: float | None = Field(description="its loss right after it was learned (the reference: "
                                                   "under the base model alone)")
    cells: list[EvalCell] = Field(description="one per shown column it was evaluated in, oldest first")


class HeldMark(BaseModel):
    """The promotion gate held this adapter back: it never became current_model/ by itself."""
    reason: str = Field(description="the verdict, e.g. `held: forgot add.jsonl by 124 %`")
    snapshot: str | None = Field(description="the held candidate under snapshots/ (trainer-ctl promote NAME)")
    at: str | None


class MoveMark(BaseModel):
    """The last promote / rollback that made this adapter current_model/."""
    kind: Literal["promoted", "rolled_back"]
    snapshot: str | None = Field(description="the snapshot moved to current_model/")
    at: str | None
    message: str


class EvalColumn(BaseModel):
    """One column: the adapter a job made, and what became of it."""
    after_job: int
    name: str | None = Field(description="the job's dataset")
    held: HeldMark | None
    promoted: MoveMark | None
    gate: str | None = Field(description="the promotion gate's verdict on it, when the gate was on")
    current: bool = Field(description="current_model/ is this adapter now")


class EvalMatrix(BaseModel):
    """The forgetting matrix, or ``available: false`` with the reason in words."""
    available: bool
    reason: str | None = Field(description="why there is no matrix (null when there is one)")
    columns: list[EvalColumn] = Field(description="the newest adapters, oldest first")
    datasets: list[EvalDataset] = Field(description="the rows: the reference set first, then by job")
    total_columns: int = Field(description="adapters evaluated in all")
    hidden_columns: int = Field(description="older adapters left out (see the `columns` parameter)")
    current_job: int | None = Field(description="the job whose adapter is current_model/ now")
    updated_at: float | None = Field(description="when the last evaluation was recorded (Unix time)")


@router.get("/api/eval", response_model=EvalMatrix,
            summary="the forgetting matrix: retention loss per dataset and adapter; held and promoted "
                    "adapters marked")
def get_eval(columns: int = Query(DEFAULT_COLUMNS, ge=1, le=MAX_COLUMNS,
                                  description="show the newest N adapters (and the datasets evaluated "
                                              "in them)"),
             svc: Services = Depends(services)) -> dict[str, Any]:
    return svc.eval_view.read(columns=columns, config=svc.config())
