"""config.json: flat settings, validated on load, every problem gathered into one message.

Locked keys are recorded in state.db the first time a job uses them; a later edit of one is
refused (see core/statedb.py ``check_locked``) until ``trainer-ctl config unlock KEY``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from core.paths import resolve_under
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# the adapter's shape: an edit once an adapter exists would be silently ignored by it (the saved
# adapter keeps its own), so they are locked too; unlocking one makes the next job start a fresh
# adapter (trainer/recipe.py), and says so
LORA_KEYS: tuple[str, ...] = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
LOCKED_KEYS: tuple[str, ...] = ("base_model", "model_name", "max_length", "batch_size",
                                "gradient_accumulation") + LORA_KEYS
# learning-rate schedules that run across files: one AdamW and one step count, carried from job to
# job in current_model/ (trainer/continuity.py); the others restart AdamW and the schedule per file
CONTINUOUS_SCHEDULES: tuple[str, ...] = ("constant_with_warmup", "wsd")


class ConfigError(ValueError):
    """config.json is missing, not JSON, or has invalid keys; the message names every key."""


class _CrossKeyError(ValueError):
    """A problem of several keys together, reported under *keys[0]* (pydantic would say "(top level)")."""

    def __init__(self, keys: tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.keys = keys


class MonitorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    token: str | None = None
    allowed_hosts: list[str] = Field(default_factory=list)
    max_upload_bytes: int = Field(256 * 1024 * 1024, ge=1)


class AutoGenerateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    enabled: bool = False
    count: int = Field(200, ge=1)
    source: Literal["builtin", "http", "command"] = "builtin"
    url: str | None = None
    command: list[str] | None = None
    min_interval_s: float = Field(30.0, ge=0)


class DistributedConfig(BaseModel):
    """Data-parallel training over torchrun (trainer/distributed.py): ``nproc_per_node`` ranks per
    node ("auto": every visible NVIDIA GPU, 1 without one), ``nnodes`` nodes; with more than one
    node, ``rdzv_endpoint`` "HOST:PORT" is this (the main) node's address, where the followers
    (``trainerd --follow HOST:PORT``) meet it. ``timeout_s`` bounds every collective."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    nproc_per_node: int | Literal["auto"] = 1
    nnodes: int = Field(1, ge=1)
    rdzv_endpoint: str | None = None
    timeout_s: float = Field(1800.0, gt=0)

    @field_validator("nproc_per_node")
    @classmethod
    def _nproc(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be at least 1, or \"auto\" (every visible GPU)")
        return v

    @field_validator("rdzv_endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None:
            host, sep, port = v.rpartition(":")
            if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ValueError(f"must be \"HOST:PORT\" (the main node's address), not {v!r}")
        return v

    @model_validator(mode="after")
    def _nodes(self) -> "DistributedConfig":
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise ValueError(f"nnodes {self.nnodes} needs rdzv_endpoint \"HOST:PORT\": the main node's "
                             "address, where the followers meet it")
        return self

    def endpoint(self) -> tuple[str, int]:
        host, _, port = (self.rdzv_endpoint or "127.0.0.1:29500").rpartition(":")
        return host.strip("[]"), int(port)


class Config(BaseModel):
    """Every top-level key of config.json. Unknown keys are an error (typos must not pass)."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    # --- locked keys ---
    base_model: str | None = None          # local HF folder; relative paths are under the base dir
    model_name: str = "tiny-qwen3"
    max_length: int = Field(512, ge=8, le=1 << 20)
    batch_size: int = Field(4, ge=1)       # rows per micro-batch (each row packs up to max_length tokens)
    gradient_accumulation: int = Field(1, ge=1)
    # --- training ---
    trainer: Literal["qlora", "standin"] = "qlora"
    model_display_name: str | None = None
    use_qlora: bool = True
    lora_r: int = Field(16, ge=1)
    lora_alpha: float = Field(32, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_target_modules: str | list[str] = "all-linear"
    # "auto": on for bases of more than 200 M parameters (trainer/model.py GRADIENT_CHECKPOINTING_AUTO_PARAMS)
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    # "auto": bf16 autocast on a GPU that supports it, fp16 + GradScaler on one that does not,
    # fp32 on CPU; LoRA weights and optimizer state stay fp32 in every case
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    learning_rate: float = Field(2e-4, gt=0)
    # constant_with_warmup / wsd: continuous across files (warmup only while the adapter's optimizer
    # has made fewer than warmup_steps steps: the first job, after a consolidation); cosine / linear /
    # constant: per file (AdamW and the schedule, warmup included, restart with each file)
    lr_scheduler: Literal["constant_with_warmup", "wsd", "cosine", "linear", "constant"] = \
        "constant_with_warmup"
    warmup_steps: int = Field(0, ge=0)
    # wsd only: > 0 asks for the decay: the job's learning rate falls linearly to 0 over this last
    # share of it (e.g. the file before a consolidation); 0 (the default) stays stable
    wsd_decay_fraction: float = Field(0.0, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    max_nonfinite_steps: int = Field(10, ge=1)   # NaN/inf steps in a row that fail the job
    epochs: int = Field(1, ge=1)
    seed: int = 0
    truncation: Literal["keep_answer", "truncate", "drop"] = "keep_answer"
    # each file's retention set: this share of its lines (at most eval_max_examples) is held out,
    # never trained on, and evaluated after every later job (trainer-ctl eval); 0 turns it off
    eval_fraction: float = Field(0.02, ge=0, lt=1)
    eval_max_examples: int = Field(200, ge=1)
    retention_eval_datasets: int = Field(20, ge=0)   # the last K datasets' sets evaluated after a job
    retention_eval_max_s: float = Field(300.0, gt=0)  # time bound of that evaluation
    tensorboard: bool = False      # TensorBoard event files under runs/, one run per base (trainer/tboard.py)
    reference_eval_file: str | None = None   # a fixed JSONL set (e.g. general chat) evaluated after every job
    # probe prompts (trainer/probes.py): greedy answers at the base, every probe_every_steps (0: off)
    # and after every job (the dashboard's Samples): probe_prompts (a list, or a JSONL file under the
    # base dir; a missing file is a warning at job time) plus probe_retention_examples of each retention set
    probe_prompts: list[str] | str = Field(default_factory=list)
    probe_retention_examples: int = Field(2, ge=0)
    probe_every_steps: int = Field(0, ge=0)
    probe_max_new_tokens: int = Field(48, ge=1, le=4096)
    probe_max_s: float = Field(60.0, gt=0)      # per round; the prompts left are skipped (a warning)
    # replay (trainer/replay.py): this share of what a job trains is drawn from the pools (a sample of
    # at most replay_pool_examples training examples kept per file) of the last replay_datasets files
    replay_fraction: float = Field(0.0, ge=0, lt=1)
    replay_pool_examples: int = Field(1000, ge=0)
    replay_datasets: int = Field(20, ge=1)
    # the promotion gate: a finished adapter replaces current_model/ only if no earlier dataset's
    # retention loss rose by more than max_retention_regression (relative) against the adapter it
    # would replace; otherwise it is kept as a held snapshot (trainer-ctl promote / rollback)
    promotion_gate: bool = False
    max_retention_regression: float = Field(0.05, ge=0)
    packing: bool = True
    # "auto": sdpa (block-diagonal mask from the packed position ids); flash_attention_2/3 keep
    # packed examples apart only with one row per micro-batch (batch_size 1), checked below
    attn_implementation: Literal["auto", "sdpa", "eager", "flex_attention", "flash_attention_2",
                                 "flash_attention_3"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint_every_steps: int = Field(50, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    layer_activity_every_steps: int = Field(10, ge=1)
    worker_timeout_s: float = Field(600.0, gt=0)
    worker_idle_exit_s: float = Field(300.0, ge=0)   # a warm worker (base loaded) exits after this idle
    max_attempts: int = Field(3, ge=1)     # attempts in a row that crash without a new checkpoint
    retry_backoff_s: float = Field(30.0, ge=0)   # wait after such a crash; doubles each time (x64 max)
    standin_step_seconds: float = Field(0.05, ge=0)
    # --- queue / daemon ---
    inbox_stable_seconds: float = Field(1.0, ge=0)
    max_bad_record_fraction: float = Field(0.01, ge=0, lt=1)   # more bad records than this: file rejected
    rescan_interval_s: float = Field(5.0, gt=0)
    status_interval_s: float = Field(1.0, gt=0)
    min_free_disk_mb: float = Field(256.0, ge=0)   # below this no job starts: paused, disk full
    disk_retry_interval_s: float = Field(10.0, gt=0)   # how often a disk-full pause looks again
    # --- retention (bounded growth; see daemon/retention.py) ---
    keep_snapshots: int = Field(50, ge=1)        # newest snapshots kept (+ consolidation/manual ones)
    keep_events: int = Field(100_000, ge=100)    # newest rows kept in state.db's events table
    keep_set_aside: int = Field(10, ge=0)        # failed/skipped jobs whose checkpoints stay for a retry
    metrics_max_mb: float = Field(64.0, gt=0)    # metrics.jsonl is rotated before it grows past this
    metrics_keep_files: int = Field(3, ge=1)     # rotated metrics.jsonl.N files kept (read at start)
    # --- services ---
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    auto_generate: AutoGenerateConfig = Field(default_factory=AutoGenerateConfig)
    # --- presets: named overrides of the keys above; the active one is merged in on load ---
    presets: dict[str, dict[str, Any]] = Field(default_factory=dict)
    active_preset: str | None = None

    @field_validator("lora_target_modules")
    @classmethod
    def _targets(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("must name at least one module, or be 'all-linear'")
        return v

    @field_validator("probe_prompts")
    @classmethod
    def _probe_prompts(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, list) and any(not p.strip() for p in v):
            raise ValueError("a probe prompt must not be empty")
        if isinstance(v, str) and not v.strip():
            raise ValueError("must be a list of prompts or the path of a JSONL file of them")
        return v

    @model_validator(mode="after")
    def _packed_attention(self) -> "Config":
        if self.attn_implementation.startswith("flash_attention") and self.packing and self.batch_size > 1:
            raise _CrossKeyError(
                ("attn_implementation", "batch_size", "packing"),
                f"attn_implementation {self.attn_implementation} lets packed examples attend to each "
                f"other when a micro-batch has more than one row (batch_size {self.batch_size}): use "
                "batch_size 1 (and a larger max_length), packing false, or sdpa/flex_attention")
        return self

    @model_validator(mode="after")
    def _gate_needs_retention(self) -> "Config":
        if self.promotion_gate and (self.eval_fraction <= 0 or self.retention_eval_datasets <= 0):
            raise _CrossKeyError(
                ("promotion_gate", "eval_fraction", "retention_eval_datasets"),
                "promotion_gate judges an adapter by the retention sets: it needs eval_fraction > 0 "
                f"(now {self.eval_fraction:g}) and retention_eval_datasets > 0 (now "
                f"{self.retention_eval_datasets})")
        return self

    @model_validator(mode="after")
    def _decay_needs_wsd(self) -> "Config":
        if self.wsd_decay_fraction > 0 and self.lr_scheduler != "wsd":
            raise _CrossKeyError(
                ("wsd_decay_fraction", "lr_scheduler"),
                f"only lr_scheduler wsd decays when asked (lr_scheduler is {self.lr_scheduler}): "
                "set lr_scheduler to wsd, or wsd_decay_fraction to 0")
        return self

    @property
    def locked_namespace(self) -> str:
        """Locked keys are recorded per preset (state.db); "" when no preset is active."""
        return self.active_preset or ""

    def locked_values(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in LOCKED_KEYS}

    def base_model_path(self, home: Path) -> Path | None:
        return resolve_under(home, self.base_model)


PRESET_FORBIDDEN = ("presets", "active_preset")


def _problems(exc: ValidationError, prefix: str) -> list[str]:
    problems = []
    for err in exc.errors():
        cross = (err.get("ctx") or {}).get("error")
        if isinstance(cross, _CrossKeyError):
            problems.append(f"  {prefix}{cross.keys[0]}: {cross}")
            continue
        key = prefix + (".".join(str(p) for p in err["loc"]) or "(top level)")
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        problems.append(f"  {key}: {msg}")
    return problems


def _validate(raw: dict[str, Any], prefix: str = "") -> tuple[Config | None, list[str]]:
    try:
        return Config.model_validate(raw), []
    except ValidationError as exc:
        problems = _problems(exc, prefix)
        # a key's own error stops pydantic before the checks of keys together: run those on the
        # other keys too, so that one message names every problem
        bad = {str(err["loc"][0]) for err in exc.errors() if err["loc"]}
        if bad:
            try:
                Config.model_validate({k: v for k, v in raw.items() if k not in bad})
            except ValidationError as again:
                problems += [p for err, p in zip(again.errors(), _problems(again, prefix))
                             if isinstance(cross := (err.get("ctx") or {}).get("error"), _CrossKeyError)
                             and not bad.intersection(cross.keys)]
        return None, problems


def parse_config(raw: Any, source: str = "config.json") -> Config:
    """Validate config.json; with ``active_preset`` the result is the merged (effective) config.

    Every preset is validated too (merged over the top level), so a typo in an inactive preset
    is reported now, not on the day it is switched to.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: must be a JSON object, got {type(raw).__name__}")
    cfg, problems = _validate(raw)
    presets = raw.get("presets") if isinstance(raw.get("presets"), dict) else {}
    merged_active: Config | None = None
    for name, over in presets.items():
        if not isinstance(over, dict):
            problems.append(f"  presets.{name}: must be an object of config keys")
            continue
        bad = [k for k in over if k in PRESET_FORBIDDEN]
        if bad:
            problems.append(f"  presets.{name}: cannot set {', '.join(bad)}")
            continue
        merged, more = _validate({**raw, **over}, prefix=f"presets.{name}.")
        problems += more
        if name == raw.get("active_preset"):
            merged_active = merged
    active = raw.get("active_preset")
    if active is not None and active not in presets:
        problems.append(f"  active_preset: no preset named {active!r} (have: {', '.join(presets) or 'none'})")
    if problems:
        raise ConfigError(f"{source}: {len(problems)} problem(s):\n" + "\n".join(problems))
    assert cfg is not None
    return merged_active if merged_active is not None else cfg


def load_config(path: Path) -> Config:
    """Load and validate config.json; a missing file means all defaults."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Config()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}") from None
    return parse_config(raw, str(path))


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def base_model_value(raw: dict[str, Any]) -> Any:
    """The effective raw ``base_model`` of a config.json dict (the active preset's if it sets one)."""
    preset = (raw.get("presets") or {}).get(raw.get("active_preset") or "") or {}
    return preset["base_model"] if "base_model" in preset else raw.get("base_model")


def set_base_model(raw: dict[str, Any], value: str) -> dict[str, Any]:
    """Set ``base_model`` where it takes effect (the active preset if it sets one, else top level)."""
    preset = (raw.get("presets") or {}).get(raw.get("active_preset") or "")
    if isinstance(preset, dict) and "base_model" in preset:
        preset["base_model"] = value
    else:
        raw["base_model"] = value
    return raw


def locked_diffs(recorded: dict[str, Any], cfg: Config) -> dict[str, tuple[Any, Any]]:
    """Locked keys whose config.json value differs from the recorded one: key -> (recorded, now)."""
    current = cfg.locked_values()
    return {k: (v, current[k]) for k, v in sorted(recorded.items()) if k in current and current[k] != v}


def describe_locked_diffs(diffs: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{k}: recorded {a!r}, config.json has {b!r}" for k, (a, b) in diffs.items())


def locked_namespace(raw: dict[str, Any]) -> str:
    return raw.get("active_preset") or ""
