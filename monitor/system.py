"""GPU (NVML via nvidia-ml-py) and memory (psutil) readings, and a sampler that keeps history.

Nothing here needs torch or a GPU: without an NVIDIA driver the GPU reading is
``{"available": False, "reason": "no NVIDIA GPU detected (...)"}``.
"""
from __future__ import annotations

import collections
import logging
import shutil
import threading
import time
from typing import Any, Callable

import psutil

from core.lock import daemon_running
from core.paths import Layout

log = logging.getLogger("monitor.system")

NVML_RETRY_S = 60.0


class GpuProbe:
    """NVML, initialised once; a failed init is retried at most every NVML_RETRY_S seconds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nvml: Any = None
        self._reason: str | None = None
        self._next_try = 0.0

    def _init(self) -> Any:
        if self._nvml is not None:
            return self._nvml
        now = time.monotonic()
        if now < self._next_try:
            return None
        self._next_try = now + NVML_RETRY_S
        try:
            import pynvml
        except ImportError:
            self._reason = "no NVIDIA GPU detected (nvidia-ml-py is not installed)"
            return None
        try:
            pynvml.nvmlInit()
        except Exception as exc:   # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            self._reason = f"no NVIDIA GPU detected ({_nvml_msg(exc)})"
            log.info("GPU panel: %s", self._reason)
            return None
        self._nvml, self._reason = pynvml, None
        return pynvml

    def sample(self) -> dict[str, Any]:
        with self._lock:
            nv = self._init()
            if nv is None:
                return {"available": False, "reason": self._reason or "no NVIDIA GPU detected",
                        "time": time.time()}
            try:
                count = nv.nvmlDeviceGetCount()
            except Exception as exc:
                return {"available": False, "reason": f"no NVIDIA GPU detected ({_nvml_msg(exc)})",
                        "time": time.time()}
            if count == 0:
                return {"available": False, "reason": "no NVIDIA GPU detected (NVML lists 0 devices)",
                        "time": time.time()}
            try:
                driver = _s(nv.nvmlSystemGetDriverVersion())
            except Exception:
                driver = None
            gpus = [self._device(nv, i) for i in range(count)]
            return {"available": True, "driver": driver, "count": count, "gpus": gpus,
                    "time": time.time()}

    @staticmethod
    def _device(nv: Any, i: int) -> dict[str, Any]:
        h = nv.nvmlDeviceGetHandleByIndex(i)

        def get(fn: Callable[[], Any]) -> Any:
            try:
                return fn()
            except Exception:      # NotSupported on this GPU, or a transient error
                return None

        util = get(lambda: nv.nvmlDeviceGetUtilizationRates(h))
        mem = get(lambda: nv.nvmlDeviceGetMemoryInfo(h))
        power_mw = get(lambda: nv.nvmlDeviceGetPowerUsage(h))
        limit_mw = get(lambda: nv.nvmlDeviceGetEnforcedPowerLimit(h))
        procs: list[dict[str, Any]] = []
        seen: set[int] = set()
        for fn in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            for p in get(lambda: getattr(nv, fn)(h)) or []:
                if p.pid in seen:
                    continue
                seen.add(p.pid)
                used = getattr(p, "usedGpuMemory", None)
                procs.append({"pid": p.pid, "name": _proc_name(p.pid),
                              "used_memory_bytes": used if isinstance(used, int) and used >= 0 else None})
        return {
            "index": i,
            "name": get(lambda: _s(nv.nvmlDeviceGetName(h))),
            "uuid": get(lambda: _s(nv.nvmlDeviceGetUUID(h))),
            "utilization_percent": util.gpu if util is not None else None,
            "memory_utilization_percent": util.memory if util is not None else None,
            "memory_used_bytes": mem.used if mem is not None else None,
            "memory_total_bytes": mem.total if mem is not None else None,
            "temperature_c": get(lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
            "power_w": power_mw / 1000.0 if power_mw is not None else None,
            "power_limit_w": limit_mw / 1000.0 if limit_mw is not None else None,
            "clock_sm_mhz": get(lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)),
            "clock_mem_mhz": get(lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM)),
            "fan_percent": get(lambda: nv.nvmlDeviceGetFanSpeed(h)),
            "processes": procs,
        }


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _nvml_msg(exc: BaseException) -> str:
    msg = str(exc).strip()
    return msg or exc.__class__.__name__


def _proc_name(pid: int) -> str | None:
    try:
        return psutil.Process(pid).name()
    except (psutil.Error, OSError):
        return None


def _proc_info(p: psutil.Process) -> dict[str, Any] | None:
    try:
        with p.oneshot():
            return {"pid": p.pid, "name": p.name(), "rss_bytes": p.memory_info().rss,
                    "cpu_percent": None, "cmdline": " ".join(p.cmdline()[:6])[:300]}
    except (psutil.Error, OSError):
        return None


def memory_snapshot(layout: Layout) -> dict[str, Any]:
    vm = psutil.virtual_memory()
    sw = psutil.swap_memory()
    pid = daemon_running(layout)
    daemon: dict[str, Any] | None = None
    workers: list[dict[str, Any]] = []
    reason = None
    if pid is None:
        reason = "daemon not running"
    elif pid < 0:
        reason = "daemon running, pid not published yet"
    else:
        try:
            proc = psutil.Process(pid)
            daemon = _proc_info(proc)
            for child in proc.children(recursive=True):
                info = _proc_info(child)
                if info:
                    workers.append(info)
        except (psutil.Error, OSError) as exc:
            reason = f"daemon pid {pid} cannot be inspected ({exc.__class__.__name__})"
    try:
        du = shutil.disk_usage(layout.home)
        disk = {"path": str(layout.home), "total_bytes": du.total, "used_bytes": du.used,
                "free_bytes": du.free}
    except OSError as exc:
        disk = {"path": str(layout.home), "error": str(exc)}
    return {
        "time": time.time(),
        "system": {"total_bytes": vm.total, "available_bytes": vm.available,
                   "used_bytes": vm.total - vm.available, "percent": vm.percent},
        "swap": {"total_bytes": sw.total, "used_bytes": sw.used, "percent": sw.percent},
        "daemon": daemon,
        "daemon_pid": pid if pid and pid > 0 else None,
        "workers": workers,
        "worker_rss_bytes": sum(w["rss_bytes"] for w in workers),
        "process_reason": reason,
        "disk": disk,
    }


class SystemSampler:
    """Samples GPU and memory every *interval* seconds in a thread; keeps the last hour."""

    def __init__(self, layout: Layout, gpu: GpuProbe, interval: float = 2.0,
                 keep: int = 1800) -> None:
        self.layout, self.gpu, self.interval = layout, gpu, interval
        self.history: collections.deque[dict[str, Any]] = collections.deque(maxlen=keep)
        self.counter = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample_now(self) -> dict[str, Any]:
        s = {"time": time.time(), "gpu": self.gpu.sample(), "memory": memory_snapshot(self.layout)}
        with self._lock:
            self.history.append(s)
            self.counter += 1
        return s

    def latest(self) -> dict[str, Any] | None:
        with self._lock:
            return self.history[-1] if self.history else None

    def snapshot(self) -> tuple[int, list[dict[str, Any]]]:
        with self._lock:
            return self.counter, list(self.history)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample_now()
            except Exception:   # a sampler must never die
                log.exception("system sample failed")
            self._stop.wait(self.interval)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="monitor-sampler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
