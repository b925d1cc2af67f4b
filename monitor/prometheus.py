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

Counters: ``trainer_jobs_finished_total{outcome}``, ``trainer_steps_total``,
``trainer_tokens_trained_total``, ``trainer_nonfinite_steps_total`` are state.db's ``counters``
table, which the daemon only ever adds to (a job's end in the transaction of its move; steps,
tokens and NaN steps each status interval), so they never go down, across restarts of either
process; ``trainer_data_records_total{reason}`` sums the jobs' data reports.
"""
from __future__ import annotations

import json
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

# How a job ended, as the daemon counts it (daemon/fsqueue.py, state.db's ``counters`` table, in
# the transaction of the move): done; failed (a started job that failed for good); skipped
# (`trainer-ctl skip`); removed (taken out of pending/ by the user); rejected (refused at intake);
# duplicate (the same content was trained or queued); missing (the file vanished from its folder).
# "held": trained and in done/, but the promotion gate kept its adapter out of current_model/
OUTCOMES = ("done", "held", "failed", "skipped", "removed", "rejected", "duplicate", "missing")


@dataclass
class DbTotals:
    """What the counters take from state.db, read in one transaction."""
    counters: dict[str, dict[str, float]] = field(default_factory=dict)   # name -> labels JSON -> value
    records: dict[str, int] = field(default_factory=dict)     # data-report reason -> lines

    def value(self, name: str) -> float:
        return sum(self.counters.get(name, {}).values())


def _int(v: Any) -> int:
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else 0


def _read_db(layout: Layout) -> DbTotals:
    """The counters' share of state.db. The daemon's counters only ever grow (they are added to,
    never set); the data reports are per job, and a job's report is rewritten with the same counts
    by each attempt (it reads the same file). Raises NoDatabase or sqlite3.Error."""
    out = DbTotals()
    if not layout.state_db.exists():
        return out                                      # no daemon has run here yet: all zero
    db = open_db(layout)
    c = db.conn
    try:
        c.execute("BEGIN")                              # one snapshot for all the sums
        for name, labels, value in db.counters():
            out.counters.setdefault(name, {})[json.dumps(labels, sort_keys=True)] = value
        cols = {row[1] for row in c.execute("PRAGMA table_info(jobs)")}
        if "data_report" in cols:                       # a state.db older than data reports has none
            for (text,) in c.execute("SELECT data_report FROM jobs WHERE data_report IS NOT NULL"):
                report = parse_data_report(text) or {}
                for reason, r in (report.get("reasons") or {}).items():
                    out.records[str(reason)] = out.records.get(str(reason), 0) + _int(
                        r.get("count") if isinstance(r, dict) else r)
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
                                "jobs that ended, by how: done, failed, skipped, removed, rejected or a "
                                "duplicate at intake, missing (a retried job that ends again counts again)",
                                labels=["outcome"])
        finished = {json.loads(k).get("outcome", ""): v
                    for k, v in db.counters.get("trainer_jobs_finished", {}).items()}
        for outcome in sorted(set(OUTCOMES) | set(finished)):
            c.add_metric([outcome], finished.get(outcome, 0.0))
        out.append(c)
        out.append(CounterMetricFamily("trainer_steps_total",
                                       "optimizer steps run, every job (a step redone after a crash "
                                       "counts again)", value=db.value("trainer_steps")))
        out.append(CounterMetricFamily("trainer_tokens_trained_total",
                                       "loss-carrying tokens of the steps run (every epoch)",
                                       value=db.value("trainer_tokens_trained")))
        out.append(CounterMetricFamily("trainer_nonfinite_steps_total",
                                       "NaN/inf training steps skipped",
                                       value=db.value("trainer_nonfinite_steps")))
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

