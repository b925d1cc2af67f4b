"""A job's data report as state.db stores it: what its file held and what was trained.

The worker sends it (``started.dataset``, later ``data_report``); the daemon stores it per job;
trainer-ctl, the monitor and /metrics read it. Stdlib only.
"""
from __future__ import annotations

import json
from typing import Any


# the data report's totals; any other top-level number of the older flat shape is a reason
REPORT_TOTALS = frozenset({"records", "examples", "tokens", "trained_tokens", "tokens_cut", "max_length"})


def normalize_data_report(report: Any) -> dict[str, Any] | None:
    """The worker's ``started.dataset`` as it is stored: every key kept as given, plus ``reasons``
    (``{name: {"count": n, "lines": [...], ...}}``). The older flat shape has no ``reasons``: its
    non-zero counters (``truncated``, ``dropped_too_long``, ``skipped_invalid``...) become reasons
    with a count and no lines. Anything but a JSON object is no report (None)."""
    if not isinstance(report, dict):
        return None
    out = dict(report)
    reasons = report.get("reasons")
    if isinstance(reasons, dict):
        out["reasons"] = {str(k): (v if isinstance(v, dict) else {"count": v}) for k, v in reasons.items()}
    else:
        out["reasons"] = {k: {"count": v} for k, v in report.items()
                          if k not in REPORT_TOTALS and isinstance(v, int) and not isinstance(v, bool) and v}
    return out


def parse_data_report(text: str | None) -> dict[str, Any] | None:
    """A stored data report, parsed; None when there is none (or it is not a JSON object)."""
    if not text:
        return None
    try:
        return normalize_data_report(json.loads(text))
    except ValueError:
        return None
