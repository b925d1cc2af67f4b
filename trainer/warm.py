"""The base a warm worker keeps loaded between jobs.

A worker serving several jobs (``python -m trainer.worker --serve``) keeps one quantized base
and its tokenizer here; each job attaches its own LoRA to it and takes it off again when it ends
(``PeftModel.unload()``: the LoRA layers are removed, nothing is merged), so the adapter,
optimizer and data are per job while the base is loaded once. The key holds everything that
shapes the loaded model (path, fingerprint, 4-bit or not, device, attention, checkpointing,
precision): a job with another key drops the old base first.
"""
from __future__ import annotations

import gc
import logging
from typing import Any, Hashable

log = logging.getLogger(__name__)


class WarmBase:
    def __init__(self) -> None:
        self.key: Hashable | None = None
        self.model: Any = None
        self.tokenizer_key: Hashable | None = None
        self.tokenizer: Any = None
        self.reused = 0          # jobs that found their base already loaded

    def tokenizer_for(self, key: Hashable) -> Any:
        return self.tokenizer if key == self.tokenizer_key else None

    def keep_tokenizer(self, key: Hashable, tokenizer: Any) -> None:
        self.tokenizer_key, self.tokenizer = key, tokenizer

    def take(self, key: Hashable) -> Any:
        """The loaded base for *key* (taken out: a job owns it until ``keep``), else None."""
        if self.model is not None and key == self.key:
            model, self.model = self.model, None
            self.reused += 1
            return model
        if self.model is not None:
            log.info("another base or setting: dropping the loaded base")
        self.clear()
        return None

    def keep(self, key: Hashable, model: Any) -> None:
        self.key, self.model = key, model

    def clear(self) -> None:
        """Drop the loaded base (a failed job may have left it in an unknown state)."""
        self.key = self.model = None
        gc.collect()
        try:
            import torch
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - freeing is best effort
            pass
