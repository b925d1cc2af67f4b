"""trainer-ctl's text: numbers, durations, and the data and validation reports in words.

Plain functions from values (a status, a job's data report, an intake validation report) to
lines of text; nothing here reads files or talks to the daemon.
"""
from __future__ import annotations

from typing import Any


def fmt_num(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def fmt_eta(s: Any) -> str:
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def fmt_int(v: Any) -> str:
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)


def fmt_count(n: Any, one: str, many: str | None = None) -> str:
    if not isinstance(n, int) or isinstance(n, bool):
        return f"{n} {many or one + 's'}"
    return f"{n:,} {one if n == 1 else (many or one + 's')}"


def describe_preparing(p: dict[str, Any]) -> str:
    """"preparing data 37 % (41,200 / 100,000 records, 2,100 records/s, ETA 28s)"."""
    if p.get("phase") != "tokenizing" or not p.get("total"):
        return "preparing data (validating the file)"
    extra = ""
    if p.get("records_per_second"):
        extra = f", {p['records_per_second']:,.0f} records/s, ETA {fmt_eta(p.get('eta_seconds'))}"
    return (f"preparing data {p.get('percent') or 0:.0f} % ({p.get('done') or 0:,} / {p['total']:,} "
            f"records{extra})")


def _lines_text(lines: Any, count: Any) -> str:
    """"lines 4, 9, …" (the ellipsis when the count says there are more than listed)."""
    if not isinstance(lines, list) or not lines:
        return ""
    more = isinstance(count, int) and count > len(lines)
    return ("line " if len(lines) == 1 and not more else "lines ") + \
        ", ".join(str(x) for x in lines) + (", …" if more else "")


def describe_reason(name: str, r: Any, unit: str = "record") -> str:
    """"truncated: 12 records (1,234 tokens cut), lines 4, 9, …" (any extra keys are shown too)."""
    if not isinstance(r, dict):
        return f"{name}: {r}"
    count = r.get("count")
    out = f"{name}: {fmt_count(count, unit)}" if count is not None else f"{name}:"
    notes = []
    if r.get("tokens_cut") is not None:
        notes.append(f"{fmt_int(r['tokens_cut'])} tokens cut")
    for k, v in r.items():
        if k not in ("count", "lines", "tokens_cut", "message"):
            notes.append(f"{k.replace('_', ' ')} {fmt_int(v)}")
    if notes:
        out += f" ({', '.join(notes)})"
    lines = _lines_text(r.get("lines"), count)
    if lines:
        out += f", {lines}"
    if r.get("message"):
        out += f" — {r['message']}"
    return out


REPORT_LABELS = (("records", "records"), ("examples", "examples"), ("tokens", "tokens"),
                 ("trained_tokens", "trained tokens"), ("tokens_cut", "tokens cut"))


def describe_data_report(report: dict[str, Any]) -> list[str]:
    """The worker's data report as lines: the totals, then one line per reason."""
    how = [f"{k.replace('_', ' ')} {report[k]}" for k in ("format", "truncation", "max_length")
           if report.get(k) is not None]
    out = ["data report" + (f" ({', '.join(how)})" if how else "") + ":"]
    width = max(len(label) for _, label in REPORT_LABELS) + 1
    for key, label in REPORT_LABELS:
        if report.get(key) is not None:
            out.append(f"  {label + ':':<{width}} {fmt_int(report[key])}")
    shown = {k for k, _ in REPORT_LABELS} | {"format", "truncation", "max_length", "reasons"}
    reasons = report.get("reasons") if isinstance(report.get("reasons"), dict) else {}
    for k, v in report.items():     # keys of a newer worker that this version does not know
        if k not in shown and k not in reasons and not isinstance(v, (dict, list)) and v not in (0, None):
            out.append(f"  {k.replace('_', ' ') + ':':<{width}} {fmt_int(v)}")
    if reasons:
        out += [f"  {describe_reason(str(name), r)}" for name, r in reasons.items()]
    else:
        out.append("  nothing truncated, dropped or skipped")
    replay = report.get("replay")
    if isinstance(replay, dict) and isinstance(replay.get("datasets"), dict):
        froms = ", ".join(f"{name} {fmt_int(n)}" for name, n in replay["datasets"].items())
        out.append(f"  replay: {fmt_int(replay.get('examples'))} examples of earlier datasets mixed in "
                   f"(replay_fraction {replay.get('fraction')}; {fmt_int(replay.get('trained_tokens'))} "
                   f"trained tokens): {froms or 'none'}")
    return out


def describe_validation(v: dict[str, Any]) -> list[str]:
    """The intake validation report kept in failed/NAME.error.json, as lines."""
    out = [f"intake validation: {fmt_int(v.get('valid_records'))} of {fmt_int(v.get('records'))} "
           f"records valid" + (f" ({v['format']})" if v.get("format") else "")]
    by_kind: dict[str, list[int]] = {}
    for e in v.get("errors") or []:
        if isinstance(e, dict):
            by_kind.setdefault(str(e.get("kind")), []).append(e.get("line"))
    counts = v.get("error_counts") if isinstance(v.get("error_counts"), dict) else {}
    for kind in list(counts) + [k for k in by_kind if k not in counts]:
        lines = by_kind.get(kind, [])
        out.append("  " + describe_reason(kind, {"count": counts.get(kind, len(lines)), "lines": lines},
                                          unit="line"))
    return out
