"""Shared fixtures for the trainer tests: one tiny real base per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3 base (model + tokenizer + chat template) built once, as a HF folder."""
    from trainer.tiny_base import build_tiny_base

    return build_tiny_base(tmp_path_factory.mktemp("tiny_base_root") / "tiny-qwen3", seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_base: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


@pytest.fixture(scope="session", autouse=True)
def one_cpu_thread():
    """One intra-op thread: on a shared 2-core box, OpenMP spin-waiting under contention makes
    steps 100x slower; one thread is as fast here and stable. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
