"""GET /api/gpu (NVML) and /api/memory (psutil): fresh readings."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from monitor.services import Services, services
from monitor.system import memory_snapshot

router = APIRouter(tags=["system"])


@router.get("/api/gpu", summary="per GPU utilisation, memory, temperature, power, clocks, processes")
def get_gpu(svc: Services = Depends(services)) -> dict[str, Any]:
    return svc.gpu.sample()


@router.get("/api/memory", summary="system RAM, swap, daemon and worker RSS, disk free")
def get_memory(svc: Services = Depends(services)) -> dict[str, Any]:
    return memory_snapshot(svc.layout)
