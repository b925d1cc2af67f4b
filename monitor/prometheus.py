"""GET /metrics through prometheus-client: one custom collector over what the monitor reads.

``Collector.collect()`` builds the metric families from the daemon's files at each scrape (the
status file through ``Services.status()``, queue/, status/state.db read-only, the metrics history,
the system sampler); nothing is kept in memory that a restart of the monitor would lose, so the
counters continue where they were: they are computed from state the daemon persists.

Gauges (the daemon now): ``trainer_daemon_up``, ``trainer_status{status}``, ``trainer_paused``,
the running job's ``trainer_step``, ``trainer_total_steps``, ``trainer_loss``,
``trainer_eval_loss``, ``trainer_learning_rate``, ``trainer_grad_norm``,
``trainer_tokens_per_second``, ``trainer_eta_seconds``, ``trainer_peak_memory_bytes``;
``trainer_jobs{state}``, ``trainer_queue_files{state}``, ``trainer_metrics_history_records``;
``trainer_gpu_*{gpu,name}``, ``trainer_system_memory_used_bytes``, ``trainer_daemon_rss_bytes``,
``trainer_worker_rss_bytes``. A gauge with no value now (no job, no GPU) is left out.

Counters (since the home's first job), from state.db and the metrics history:
``trainer_jobs_finished_total{outcome}``, ``trainer_steps_total``,
``trainer_tokens_trained_total``, ``trainer_nonfinite_steps_total``,
``trainer_data_records_total{reason}``. How each is derived is written at ``_read_db`` and
``Collector._counters``.
"""
from __future__ import annotations

import logging
import math
import sqlite3
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from core.paths import Layout
from core.statedb import parse_data_report
from core.states import DaemonStatus
from monitor.readers import NoDatabase, db_version, iter_queue_files, open_db
from monitor.services import Services

log = logging.getLogger("monitor.prometheus")

CONTENT_TYPE = CONTENT_TYPE_LATEST

# What a finished job's row says about how it ended (the daemon's own words: daemon/main.py
# ``_finish_job`` writes error "skipped" for a skip, daemon/fsqueue.py ``remove`` "removed by
# user"; a job refused at intake, invalid or a duplicate, goes to failed/ without ever starting).
# done: trained to the end; failed: a started job that failed; skipped: `trainer-ctl skip`;
# removed: taken out of pending/ by the user; rejected: refused at intake; any other state a row
# can hold (``missing``: the file vanished from pending/) is its own outcome.
OUTCOMES = ("done", "failed", "skipped", "removed", "rejected", "missing")
OUTCOME_SQL = """
SELECT CASE
         WHEN state = 'done' THEN 'done'
         WHEN state = 'failed' AND error = 'skipped' THEN 'skipped'
         WHEN state = 'failed' AND error = 'removed by user' THEN 'removed'
         WHEN state = 'failed' AND started_at IS NULL THEN 'rejected'
         WHEN state = 'failed' THEN 'failed'
         ELSE state
       END, COUNT(*)
FROM jobs WHERE state NOT IN ('pending', 'processing') GROUP BY 1
"""


@dataclass
class DbTotals:
    """What the counters take from state.db, read in one transaction."""
    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    steps: dict[int, int] = field(default_factory=dict)       # job id -> steps state.db records
    tokens_trained: int = 0
    records: dict[str, int] = field(default_factory=dict)     # data-report reason -> lines
    nonfinite: int = 0


def _int(v: Any) -> int:
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else 0


def _read_db(layout: Layout) -> DbTotals:
    """The counters' share of state.db. Job rows are never deleted, and a row keeps its last
    outcome, its steps and its last attempt's data report, so these sums only grow, with one
    exception each, said where it applies. Raises NoDatabase or sqlite3.Error."""
    out = DbTotals()
    if not layout.state_db.exists():
        return out                                      # no daemon has run here yet: all zero
    db = open_db(layout)
    c = db.conn
    try:
        c.execute("BEGIN")                              # one snapshot for all the sums
        # trainer_jobs_finished_total{outcome}: each job once, under the outcome of its last end.
        # A job a user retries (failed -> pending) leaves its outcome until it ends again: that
        # outcome's count goes down by one then (Prometheus reads it as a counter reset).
        for outcome, n in c.execute(OUTCOME_SQL):
            out.outcomes[str(outcome)] = out.outcomes.get(str(outcome), 0) + int(n)
        # trainer_steps_total (with the history, see Collector._counters): the steps each job's
        # row records (written when an attempt completes, is skipped or interrupted).
        out.steps = {int(j): int(s) for j, s in c.execute("SELECT id, steps FROM jobs WHERE steps > 0")}
        cols = {row[1] for row in c.execute("PRAGMA table_info(jobs)")}
        if "data_report" in cols:                       # a state.db older than data reports has none
            rows = c.execute("SELECT state, data_report FROM jobs WHERE data_report IS NOT NULL")
            for state, text in rows:
                report = parse_data_report(text) or {}
                # trainer_tokens_trained_total: the loss-carrying tokens of the data of every job
                # trained to the end, its data report's ``trained_tokens`` (the figure the
                # adapter's lineage, trainer_state.json, records for it), counted once, when the
                # job is done. The per-step counts in metrics.jsonl would move during a job, but
                # the daemon deletes its oldest history files (metrics_keep_files), so a sum over
                # them would fall back; state.db keeps every job. Epochs repeat these tokens and
                # eval_fraction holds some of them out: this is the data the model has learned
                # from, not the tokens the GPU processed (trainer_tokens_per_second is that rate).
                if state == "done":
                    out.tokens_trained += _int(report.get("trained_tokens"))
                # trainer_data_records_total{reason}: every job's report, per reason, lines.
                # A report is written at each attempt's start (the whole file's once it is
                # tokenized); a new attempt reads the same file and writes the same counts.
                for reason, r in (report.get("reasons") or {}).items():
                    out.records[str(reason)] = out.records.get(str(reason), 0) + _int(
                        r.get("count") if isinstance(r, dict) else r)
        # trainer_nonfinite_steps_total: the daemon records every skipped NaN/inf step as a
        # "nonfinite" event (nothing else keeps them: the step's metrics line has no loss, as has
        # every line of the stand-in trainer). The events table keeps its newest keep_events rows
        # (100 000 by default): once those pruned reach a nonfinite event, the count goes down.
        out.nonfinite = int(c.execute("SELECT COUNT(*) FROM events WHERE kind = 'nonfinite'").fetchone()[0])
        c.execute("COMMIT")
    finally:
        db.close()
    return out


def _num(v: Any) -> float | None:
    """A sample value, or None for one to leave out (missing, not a number, NaN)."""
    if isinstance(v, bool):
        return 1.0 if v else 0.0
    if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
        return float(v)
    return None


def _gauge(name: str, help_: str, value: Any = None, *,
           labels: tuple[str, ...] = (), samples: Any = ()) -> GaugeMetricFamily | None:
    """A gauge with its samples that have a value; None when none has (the family is left out)."""
    g = GaugeMetricFamily(name, help_, labels=list(labels))
    rows = [([], value)] if not labels else [([str(x) for x in lv], v) for lv, v in samples]
    for lv, v in rows:
        x = _num(v)
        if x is not None:
            g.add_metric(lv, x)
    return g if g.samples else None


class Collector:
    """The monitor's metrics for one home, computed at each ``collect()`` (a prometheus-client
    custom collector). state.db is read again only when it (or its WAL) changed."""

    STATUS_GAUGES = (("current_step", "trainer_step", "current step of the running job"),
                     ("total_steps", "trainer_total_steps", "total steps of the running job"),
                     ("loss", "trainer_loss", "last training loss"),
                     ("eval_loss", "trainer_eval_loss", "last evaluation loss"),
                     ("learning_rate", "trainer_learning_rate", "current learning rate"),
                     ("grad_norm", "trainer_grad_norm", "last gradient norm"),
                     ("tokens_per_second", "trainer_tokens_per_second", "real (non-padding) tokens per second"),
                     ("eta_seconds", "trainer_eta_seconds", "estimated seconds left in the job"),
                     ("peak_memory_bytes", "trainer_peak_memory_bytes", "peak accelerator memory"))
    GPU_GAUGES = (("utilization_percent", "trainer_gpu_utilization_percent", "GPU utilisation"),
                  ("memory_used_bytes", "trainer_gpu_memory_used_bytes", "GPU memory used"),
                  ("memory_total_bytes", "trainer_gpu_memory_total_bytes", "GPU memory total"),
                  ("temperature_c", "trainer_gpu_temperature_celsius", "GPU temperature"),
                  ("power_w", "trainer_gpu_power_watts", "GPU power draw"))

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self._lock = threading.Lock()
        self._db_key: Any = None
        self._db: DbTotals | None = None

    def collect(self) -> Iterator[Metric]:
        svc = self.svc
        st = svc.status()
        families: list[Metric | None] = [
            _gauge("trainer_daemon_up", "1 when the daemon runs", st["daemon_running"]),
            _gauge("trainer_status", "current daemon status (1 for the current one)", labels=("status",),
                   samples=[((s,), s == st.get("status"))
                            for s in [d.value for d in DaemonStatus] + ["daemon not running", "starting"]]),
            _gauge("trainer_paused", "1 when paused", bool(st.get("paused"))),
            *(_gauge(name, help_, st.get(key)) for key, name, help_ in self.STATUS_GAUGES)]
        counts = st.get("queue") if isinstance(st.get("queue"), dict) else {}
        families += [
            _gauge("trainer_jobs", "jobs in state.db by state", labels=("state",),
                   samples=[((k,), v) for k, v in sorted(counts.items())]),
            _gauge("trainer_queue_files", "data files in queue/<state>/", labels=("state",),
                   samples=[((k,), v) for k, v in iter_queue_files(svc.layout)])]
        svc.metrics.refresh()
        families.append(_gauge("trainer_metrics_history_records",
                               "records in the metrics history the daemon keeps (status/metrics.jsonl "
                               "and its rotated files)", len(svc.metrics)))
        families += self._counters()
        families += self._system()
        yield from (f for f in families if f is not None)

    def _totals(self) -> DbTotals | None:
        """state.db's sums, read again when it changed; on a read error the last good ones."""
        with self._lock:
            key = db_version(self.svc.layout)
            if key != self._db_key or self._db is None:
                try:
                    self._db, self._db_key = _read_db(self.svc.layout), key
                except (NoDatabase, sqlite3.Error) as exc:
                    log.warning("/metrics: status/state.db could not be read (%s); counters %s", exc,
                                "as last read" if self._db else "left out")
            return self._db

    def _counters(self) -> list[Metric]:
        db = self._totals()
        if db is None:
            return []                  # no value rather than a 0 that would read as a reset
        out: list[Metric] = []
        c = CounterMetricFamily("trainer_jobs_finished_total",
                                "jobs that ended, by how (done, failed, skipped, removed, rejected at "
                                "intake, missing); a job counts once, under its last outcome",
                                labels=["outcome"])
        for outcome, n in db.outcomes.items():
            c.add_metric([outcome], n)
        out.append(c)
        # Steps: per job, the larger of what its state.db row records and the highest step the
        # metrics history holds for it. The row alone misses the running job (written when an
        # attempt ends) and a job that failed (the daemon records no steps then); the history
        # alone forgets what its deleted oldest files held. Together: live, and a job's count
        # falls back only if it failed and its history files were deleted since.
        steps = dict(db.steps)
        for job, top in self.svc.metrics.max_steps().items():
            steps[job] = max(steps.get(job, 0), top)
        out.append(CounterMetricFamily("trainer_steps_total",
                                       "optimizer steps trained, every job (each step once: steps "
                                       "redone after a resume are not counted again)",
                                       value=sum(steps.values())))
        out.append(CounterMetricFamily("trainer_tokens_trained_total",
                                       "loss-carrying tokens of the data of the jobs trained to the end "
                                       "(their data reports' trained_tokens), added when a job is done",
                                       value=db.tokens_trained))
        out.append(CounterMetricFamily("trainer_nonfinite_steps_total",
                                       "NaN/inf training steps skipped (state.db nonfinite events)",
                                       value=db.nonfinite))
        c = CounterMetricFamily("trainer_data_records_total",
                                "lines of the jobs' data files by data-report reason (truncated, "
                                "dropped_too_long, ...), every job with a report", labels=["reason"])
        for reason, n in sorted(db.records.items()):
            c.add_metric([reason], n)
        out.append(c)
        return out

    def _system(self) -> list[Metric | None]:
        svc = self.svc
        sample = svc.sampler.latest() or {"gpu": svc.gpu.sample()}
        gpu = sample.get("gpu") or {}
        gpus = gpu.get("gpus") or []
        out = [_gauge("trainer_gpu_available", "1 when NVML reports a GPU", bool(gpu.get("available")))]
        out += [_gauge(name, help_, labels=("gpu", "name"),
                       samples=[((g.get("index"), g.get("name") or ""), g.get(key)) for g in gpus])
                for key, name, help_ in self.GPU_GAUGES]
        mem = sample.get("memory")
        if mem:
            out += [_gauge("trainer_system_memory_used_bytes", "system RAM in use", mem["system"]["used_bytes"]),
                    _gauge("trainer_daemon_rss_bytes", "daemon resident memory",
                           (mem.get("daemon") or {}).get("rss_bytes")),
                    _gauge("trainer_worker_rss_bytes", "resident memory of the daemon's children",
                           mem.get("worker_rss_bytes") if mem.get("daemon") else None)]
        return out


_registries_lock = threading.Lock()


def registry_for(svc: Services) -> CollectorRegistry:
    """The private registry of *svc*'s monitor (never prometheus-client's global one, which holds
    the process's own metrics and would mix two monitors in one process)."""
    with _registries_lock:
        reg = getattr(svc, "_prometheus_registry", None)
        if reg is None:
            reg = CollectorRegistry(auto_describe=False)
            reg.register(Collector(svc))
            svc._prometheus_registry = reg       # type: ignore[attr-defined]
        return reg


def exposition(svc: Services) -> bytes:
    """The Prometheus text exposition (content type ``CONTENT_TYPE``)."""
    return generate_latest(registry_for(svc))

