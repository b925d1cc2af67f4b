"""The GPU-shaped step on the tiny real base, on CPU (issue 11): out of memory redoes one step
exactly, also covers eval and checkpoint saving; fp16 with a loss scaler saved for resume, bf16
autocast; gradient checkpointing by size; a base kept loaded between jobs; attention settings
that would mix packed examples refused.

Out-of-memory errors are injected by wrapping ``_RecipeRun._loss_sum`` / ``save_adapter`` (a real
``torch.OutOfMemoryError`` raised where CUDA would raise it); the recipe under test is the real one.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from daemon.config import Config, ConfigError, config_to_dict, load_config
from trainer import model as model_mod
from trainer import recipe as recipe_mod
from trainer.generator import generate_records
from trainer.interface import Outcome
from trainer.model import base_parameter_count, compute_dtype, resolve_precision, want_gradient_checkpointing
from trainer.recipe import QLoRATrainer, _RecipeRun
from trainer.train import make_job
from trainer.warm import WarmBase
from trainer_helpers import ListSink, NoControl, StopAfter


def cfg(base: Path, **over: Any) -> dict[str, Any]:
    kw: dict[str, Any] = dict(base_model=str(base), max_length=64, batch_size=4, gradient_accumulation=1,
                              lora_r=4, lora_alpha=8, lora_dropout=0.0, learning_rate=5e-3,
                              lr_scheduler="constant", epochs=1, checkpoint_every_steps=1000,
                              layer_activity_every_steps=1000, seed=0)
    kw.update(over)
    return config_to_dict(Config(**kw))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("gpu_step") / "arith.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in generate_records(40, seed=1)), encoding="utf-8")
    return p


def run(data: Path, home: Path, config: dict[str, Any], trainer: QLoRATrainer | None = None,
        control: Any = None, job_id: int = 1) -> tuple[Any, ListSink]:
    sink = ListSink()
    result = (trainer or QLoRATrainer()).run(make_job(data, home, config, job_id=job_id), sink,
                                             control or NoControl())
    return result, sink


def losses(sink: ListSink) -> list[float]:
    return [e["loss"] for e in sink.of("step")]


def adapter(home: Path) -> dict[str, torch.Tensor]:
    return load_file(str(home / "current_model" / "adapter_model.safetensors"))


def assert_same_adapter(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


@pytest.fixture
def oom_when(monkeypatch: pytest.MonkeyPatch):
    """oom_when(pred): the micro-batch loss raises torch.OutOfMemoryError while pred(run, batch)."""
    orig = _RecipeRun._loss_sum

    def install(pred) -> list[tuple[int, int]]:
        hits: list[tuple[int, int]] = []

        def faulty(self: _RecipeRun, batch: Any) -> torch.Tensor:
            if pred(self, batch):
                hits.append((self.step + 1, int(batch.input_ids.shape[0])))
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
            return orig(self, batch)
        monkeypatch.setattr(_RecipeRun, "_loss_sum", faulty)
        return hits
    return install


# ---------------------------------------------------------------- out of memory

def test_oom_in_a_step_redoes_that_step_alone_exactly(tiny_base: Path, data: Path, tmp_path: Path, oom_when) -> None:
    config = cfg(tiny_base)
    ref, ref_sink = run(data, tmp_path / "ref", config)
    assert ref.outcome is Outcome.COMPLETED and len(losses(ref_sink)) >= 5

    # at step 3, any micro-batch of more than 2 rows runs out of memory (from then on)
    hits = oom_when(lambda r, b: r.model.training and r.step + 1 >= 3 and b.input_ids.shape[0] > 2)
    res, sink = run(data, tmp_path / "oom", config)
    assert res.outcome is Outcome.COMPLETED
    assert hits and hits[0][0] == 3
    steps = [e["step"] for e in sink.of("step")]
    assert steps == list(range(1, len(losses(ref_sink)) + 1)), "no step repeated, none lost"
    (backoff,) = sink.of("oom_backoff")
    assert backoff["step"] == 3 and backoff["micro_batch"] == 2 and backoff["gradient_accumulation"] == 2
    # the same losses: only the split into micro-batches (summation order) changed
    for a, b in zip(losses(ref_sink), losses(sink)):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-5), (losses(ref_sink), losses(sink))
    assert_same_adapter(adapter(tmp_path / "ref"), adapter(tmp_path / "oom"), atol=1e-5)
    state = json.loads(next((tmp_path / "oom" / "current_model").glob("trainer_state.json")).read_text())
    assert state["total_steps"] >= len(steps)


def test_oom_at_one_row_fails_the_job_with_a_clear_reason(tiny_base: Path, data: Path, tmp_path: Path,
                                                          oom_when) -> None:
    oom_when(lambda r, b: r.model.training and r.step + 1 >= 2)
    res, sink = run(data, tmp_path / "home", cfg(tiny_base, batch_size=2))
    assert res.outcome is Outcome.FAILED
    assert res.details.get("crash") is True and res.details.get("oom") is True
    assert "out of memory" in res.reason and "1 row per micro-batch" in res.reason and "max_length" in res.reason
    assert [e["micro_batch"] for e in sink.of("oom_backoff")] == [1]
    assert not (tmp_path / "home" / "current_model").exists(), "nothing published"


def test_oom_in_eval_halves_its_rows_and_gives_the_same_eval_loss(tiny_base: Path, data: Path, tmp_path: Path,
                                                                  oom_when) -> None:
    config = cfg(tiny_base, eval_fraction=0.25)
    ref, ref_sink = run(data, tmp_path / "ref", config)
    assert ref.outcome is Outcome.COMPLETED
    hits = oom_when(lambda r, b: not r.model.training and b.input_ids.shape[0] > 1)
    res, sink = run(data, tmp_path / "oom", config)
    assert res.outcome is Outcome.COMPLETED and hits
    ref_eval = [e["eval_loss"] for e in ref_sink.of("eval")]
    got_eval = [e["eval_loss"] for e in sink.of("eval")]
    assert ref_eval and len(got_eval) == len(ref_eval)
    for a, b in zip(ref_eval, got_eval):
        assert math.isclose(a, b, rel_tol=1e-5), (ref_eval, got_eval)
    assert any("out of memory in eval" in e.get("message", "") for e in sink.of("log"))
    assert losses(sink) == losses(ref_sink), "training itself untouched"


def test_oom_while_saving_a_checkpoint_is_retried(tiny_base: Path, data: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    orig = recipe_mod.save_adapter
    calls: list[int] = []

    def flaky(model: Any, d: Path) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory while copying to the host (injected)")
        return orig(model, d)
    monkeypatch.setattr(recipe_mod, "save_adapter", flaky)
    res, sink = run(data, tmp_path / "home", cfg(tiny_base, checkpoint_every_steps=2))
    assert res.outcome is Outcome.COMPLETED
    assert len(calls) >= 2 and sink.of("checkpoint")[0]["step"] == 2


# ---------------------------------------------------------------- precision

def test_precision_resolves_per_device() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32" and compute_dtype(cpu) == torch.float32
    assert resolve_precision("bf16", cpu) == "bf16" and compute_dtype(cpu, "fp16") == torch.float16


def test_fp16_trains_with_a_loss_scaler_saved_and_restored_for_resume(tiny_base: Path, data: Path,
                                                                      tmp_path: Path) -> None:
    config = cfg(tiny_base, precision="fp16", use_qlora=False, checkpoint_every_steps=2)
    ref, ref_sink = run(data, tmp_path / "ref", config)
    assert ref.outcome is Outcome.COMPLETED
    assert all(math.isfinite(x) for x in losses(ref_sink))

    sink = ListSink()
    job = make_job(data, tmp_path / "res", config, job_id=1)
    stopped = QLoRATrainer().run(job, sink, StopAfter(sink, 3))
    assert stopped.outcome is Outcome.STOPPED
    ckpt = Path(sink.of("checkpoint")[-1]["path"])
    scaler = json.loads((ckpt / "state.json").read_text())["grad_scaler"]
    assert scaler and scaler["scale"] > 0 and "_growth_tracker" in scaler
    sink2 = ListSink()
    resumed = QLoRATrainer().run(job, sink2, NoControl())
    assert resumed.outcome is Outcome.COMPLETED
    got = losses(sink)[:3] + losses(sink2)
    assert got == losses(ref_sink), "resume with the scaler's state is exact"
    assert_same_adapter(adapter(tmp_path / "ref"), adapter(tmp_path / "res"), atol=0)


def test_bf16_autocast_trains_on_cpu(tiny_base: Path, data: Path, tmp_path: Path) -> None:
    res, sink = run(data, tmp_path / "home", cfg(tiny_base, precision="bf16"))
    assert res.outcome is Outcome.COMPLETED
    assert all(math.isfinite(x) for x in losses(sink)) and losses(sink)[-1] < losses(sink)[0]
    a = adapter(tmp_path / "home")
    assert all(t.dtype == torch.float32 for t in a.values()), "LoRA weights train in fp32"


# ---------------------------------------------------------------- gradient checkpointing

def test_gradient_checkpointing_auto_by_size(tiny_base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    n = base_parameter_count(tiny_base)
    assert 0 < n < model_mod.GRADIENT_CHECKPOINTING_AUTO_PARAMS
    assert want_gradient_checkpointing("auto", tiny_base) is False
    assert want_gradient_checkpointing(True, tiny_base) is True
    monkeypatch.setattr(model_mod, "GRADIENT_CHECKPOINTING_AUTO_PARAMS", n - 1)
    assert want_gradient_checkpointing("auto", tiny_base) is True
    assert want_gradient_checkpointing(False, tiny_base) is False


def test_gradient_checkpointing_gives_the_same_training(tiny_base: Path, data: Path, tmp_path: Path) -> None:
    _, off = run(data, tmp_path / "off", cfg(tiny_base, gradient_checkpointing=False))
    _, on = run(data, tmp_path / "on", cfg(tiny_base, gradient_checkpointing=True))
    for a, b in zip(losses(off), losses(on)):
        assert math.isclose(a, b, rel_tol=1e-5)
    assert_same_adapter(adapter(tmp_path / "off"), adapter(tmp_path / "on"), atol=1e-5)


# ---------------------------------------------------------------- a base kept loaded

def test_a_warm_base_trains_two_jobs_like_two_cold_runs(tiny_base: Path, tmp_path: Path) -> None:
    files = []
    for i in range(2):
        p = tmp_path / f"d{i}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in generate_records(24, seed=30 + i)))
        files.append(p)
    config = cfg(tiny_base)
    warm = WarmBase()
    trainer = QLoRATrainer(warm=warm)
    sinks = [run(f, tmp_path / "warm", config, trainer, job_id=i + 1)[1] for i, f in enumerate(files)]
    for i, f in enumerate(files):
        run(f, tmp_path / "cold", config, job_id=i + 1)
    assert warm.reused == 1 and warm.model is not None
    notes = [[e["message"] for e in s.of("log")] for s in sinks]
    assert not any("base already loaded" in m for m in notes[0])
    assert any("base already loaded" in m for m in notes[1])
    assert_same_adapter(adapter(tmp_path / "warm"), adapter(tmp_path / "cold"), atol=1e-6)
    # other attention: another base key, the loaded base is dropped and loaded anew
    run(files[0], tmp_path / "other", cfg(tiny_base, attn_implementation="eager"), trainer, job_id=1)
    assert warm.reused == 1 and warm.key is not None and "eager" in repr(warm.key)


# ---------------------------------------------------------------- attention settings

def test_flash_attention_with_packed_rows_is_refused_unless_one_row(tmp_path: Path) -> None:
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"attn_implementation": "flash_attention_2", "batch_size": 4}))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "attn_implementation" in str(e.value) and "batch_size" in str(e.value)
    p.write_text(json.dumps({"attn_implementation": "flash_attention_2", "batch_size": 1}))
    assert load_config(p).attn_implementation == "flash_attention_2"
    p.write_text(json.dumps({"attn_implementation": "flash_attention_2", "batch_size": 4, "packing": False}))
    assert load_config(p).batch_size == 4


def test_flex_attention_mask_of_packed_rows_has_only_the_diagonal_blocks(tiny_base: Path) -> None:
    """With flex_attention (CUDA), our packed inputs (restarting position ids, no mask) give a
    BlockMask whose every 128-token query block visits only its own example's block."""
    from transformers import AutoConfig
    from transformers.masking_utils import create_causal_mask

    config = AutoConfig.from_pretrained(tiny_base)
    config._attn_implementation = "flex_attention"
    packed = torch.cat([torch.arange(128)] * 3).unsqueeze(0)          # three examples of 128 tokens
    emb = torch.zeros(1, 384, config.hidden_size)

    def blocks(position_ids: torch.Tensor) -> list[int]:
        m = create_causal_mask(config=config, inputs_embeds=emb, attention_mask=None, cache=None,
                               position_ids=position_ids)
        return (m.kv_num_blocks + m.full_kv_num_blocks)[0, 0].tolist()
    assert blocks(packed) == [1, 1, 1], "a query block of one example must not visit another's"
    assert blocks(torch.arange(384).unsqueeze(0)) == [1, 2, 3]        # one long example: causal


def test_flex_attention_off_cuda_trains_with_sdpa_and_says_so(tiny_base: Path, data: Path, tmp_path: Path) -> None:
    _, sdpa = run(data, tmp_path / "sdpa", cfg(tiny_base))
    res, flex = run(data, tmp_path / "flex", cfg(tiny_base, attn_implementation="flex_attention"))
    assert res.outcome is Outcome.COMPLETED and losses(flex) == losses(sdpa)
    assert any("flex_attention trains on CUDA only" in e["message"] for e in flex.of("log"))
