"""Which layers are changing: per LoRA module, the size of its learned update and its gradient.

For a LoRA module with A (r x in), B (out x r) and scale s, the learned update is
delta_W = s * B @ A. Its Frobenius norm is computed from r x r products, never the out x in matrix:

    ||B A||_F^2 = trace(A^T B^T B A) = trace((B^T B)(A A^T)) = sum((B^T B) * (A A^T))

(both r x r factors are symmetric). Cost per module: O(r^2 (in + out)), same order as one LoRA
forward of r rows; done only every ``layer_activity_every_steps`` steps.

Gradient norms are ||A.grad||, ||B.grad|| and sqrt of their squares' sum, captured after backward
and before ``zero_grad`` (``capture_grads``) on reporting steps only.

A report has ``summary`` (top movers: ~10 modules with the largest change of ||delta_W|| since the
last report) and ``table``: ``modules`` (one row per LoRA module), ``layers`` (aggregated per
layer index) and ``module_types`` (aggregated per q_proj, k_proj, ...). Aggregated norms are the
root of the sum of squares (the Frobenius norm of the group); changes are summed.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

_LAYER_RE = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


@dataclass
class _LoraModule:
    name: str          # short name, e.g. "layers.3.self_attn.q_proj"
    layer: int | None
    kind: str          # q_proj, k_proj, ...
    A: torch.nn.Parameter
    B: torch.nn.Parameter
    scale: float


def _short_name(name: str) -> str:
    m = re.search(r"(?:layers|h|blocks|layer)\.\d+\..*$", name)
    return m.group(0) if m else name.removeprefix("base_model.model.")


def lora_delta_norm(A: torch.Tensor, B: torch.Tensor, scale: float) -> float:
    """||scale * B @ A||_F via r x r Gram matrices (float64)."""
    a = A.detach().double()
    b = B.detach().double()
    gram_a = a @ a.T          # r x r
    gram_b = b.T @ b          # r x r
    sq = float((gram_a * gram_b).sum())
    return abs(scale) * math.sqrt(max(sq, 0.0))


def find_lora_modules(model: Any, adapter: str = "default") -> list[_LoraModule]:
    out: list[_LoraModule] = []
    for name, mod in model.named_modules():
        lora_A = getattr(mod, "lora_A", None)
        lora_B = getattr(mod, "lora_B", None)
        if not isinstance(lora_A, torch.nn.ModuleDict) or adapter not in lora_A:
            continue
        m = _LAYER_RE.search(name)
        scale = getattr(mod, "scaling", {}).get(adapter, 1.0)
        out.append(_LoraModule(name=_short_name(name), layer=int(m.group(1)) if m else None,
                               kind=name.rsplit(".", 1)[-1], A=lora_A[adapter].weight,
                               B=lora_B[adapter].weight, scale=float(scale)))
    return out


class LayerActivityTracker:
    """Bounded-cost per-module activity of a PeftModel's LoRA adapter."""

    def __init__(self, model: Any, top_k: int = 10, adapter: str = "default") -> None:
        self.modules = find_lora_modules(model, adapter)
        self.top_k = top_k
        self._grads: dict[str, tuple[float, float]] = {}
        # baseline: the adapter as the job found it (a fresh LoRA has B = 0, so 0)
        self._last: dict[str, float] = {m.name: self._delta(m) for m in self.modules}

    @staticmethod
    def _delta(m: _LoraModule) -> float:
        return lora_delta_norm(m.A, m.B, m.scale)

    def capture_grads(self) -> None:
        """Record ||A.grad||, ||B.grad|| of every module; call after backward, before zero_grad."""
        with torch.no_grad():
            for m in self.modules:
                ga = float(m.A.grad.detach().double().norm()) if m.A.grad is not None else 0.0
                gb = float(m.B.grad.detach().double().norm()) if m.B.grad is not None else 0.0
                self._grads[m.name] = (ga, gb)

    def report(self, step: int) -> dict[str, Any]:
        """The rows for this step; updates the 'since last report' baseline."""
        rows: list[dict[str, Any]] = []
        with torch.no_grad():
            for m in self.modules:
                d = self._delta(m)
                ga, gb = self._grads.get(m.name, (0.0, 0.0))
                rows.append({
                    "module": m.name, "layer": m.layer, "type": m.kind,
                    "delta_norm": d, "delta_change": d - self._last.get(m.name, 0.0),
                    "grad_norm": math.sqrt(ga * ga + gb * gb), "grad_norm_A": ga, "grad_norm_B": gb,
                })
                self._last[m.name] = d
        self._grads.clear()
        return {"step": step, "summary": self.summary(rows), "table": self.table(step, rows)}

    def summary(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        top = sorted(rows, key=lambda r: abs(r["delta_change"]), reverse=True)[: self.top_k]
        return [{k: r[k] for k in ("module", "layer", "type", "delta_norm", "delta_change", "grad_norm")}
                for r in top]

    @staticmethod
    def _aggregate(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
        groups: dict[Any, list[dict[str, Any]]] = {}
        for r in rows:
            groups.setdefault(r[key], []).append(r)

        def order(k: Any) -> tuple[int, Any]:
            return (1, str(k)) if k is None else (0, k)

        out = []
        for k in sorted(groups, key=order):
            g = groups[k]
            out.append({
                key: k, "modules": len(g),
                "delta_norm": math.sqrt(sum(r["delta_norm"] ** 2 for r in g)),
                "delta_change": sum(r["delta_change"] for r in g),
                "grad_norm": math.sqrt(sum(r["grad_norm"] ** 2 for r in g)),
            })
        return out

    def table(self, step: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {"step": step, "modules": rows, "layers": self._aggregate(rows, "layer"),
                "module_types": self._aggregate(rows, "type")}
