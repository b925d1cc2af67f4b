"""The base model and its LoRA: locate, fingerprint, load (4-bit nf4 or plain), attach LoRA.

Fingerprint: sha256 over ``config.json`` and the weight files (``*.safetensors``, ``*.bin``,
``*.pt``, ``*.pth`` and the shard index) of the base folder, each file hashed on its own and
combined as ``name\\0sha256\\n`` lines in name order. Per-file hashes are cached in a small JSON
(``checkpoints/.base_fingerprints.json``) keyed by absolute path + size + mtime_ns, so a multi-GB
base is hashed once, not every job. A changed size or mtime re-hashes that file.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from core.atomic import atomic_write_json, give_default_modes, sha256_file
from core.paths import resolve_under

log = logging.getLogger(__name__)

# gradient_checkpointing "auto" turns it on above this many base parameters: Qwen3-0.6B (0.6 B)
# and up, whose activations at 8 x 2048 tokens would not fit beside an 8B base; the tiny test base
# and other toys stay off (recomputing the forward costs ~25-30 % of a step)
GRADIENT_CHECKPOINTING_AUTO_PARAMS = 200_000_000
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
FINGERPRINT_CACHE_NAME = ".base_fingerprints.json"


class BaseModelError(RuntimeError):
    """The base model folder is missing or unusable."""


class BaseMismatchError(RuntimeError):
    """An adapter or checkpoint belongs to another base than the configured one."""


# ----------------------------------------------------------------------------- locating

def resolve_base_path(config: dict[str, Any], home: Path) -> Path:
    """``base_model`` from config, relative to *home* unless absolute; a clear error if missing."""
    raw = config.get("base_model")
    if not raw:
        raise BaseModelError("config has no base_model: set it to a local Hugging Face model folder "
                             "(e.g. `trainer-ctl init-base --tiny`)")
    p = resolve_under(home, raw)
    assert p is not None
    if not p.is_dir():
        raise BaseModelError(f"base model folder not found: {p}")
    if not (p / "config.json").is_file():
        raise BaseModelError(f"base model folder has no config.json: {p}")
    return p.resolve()


def pick_device(setting: str = "auto") -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return torch.device("cpu")


# ----------------------------------------------------------------------------- fingerprint

def _fingerprint_files(base: Path) -> list[Path]:
    files = [base / "config.json"]
    for p in sorted(base.iterdir()):
        if p.is_file() and (p.name.endswith(WEIGHT_SUFFIXES) or p.name.endswith(".index.json")):
            files.append(p)
    return files


def base_fingerprint(base: Path, cache_file: Path | None = None) -> str:
    """sha256 of the base's config.json + weight files, using/updating the per-file hash cache."""
    base = Path(base).resolve()
    cache: dict[str, Any] = {}
    if cache_file is not None:
        try:
            cache = json.loads(Path(cache_file).read_text(encoding="utf-8"))
            if not isinstance(cache, dict):
                cache = {}
        except (OSError, ValueError):
            cache = {}
    changed = False
    h = hashlib.sha256()
    for p in _fingerprint_files(base):
        st = p.stat()
        key = str(p)
        entry = cache.get(key)
        if isinstance(entry, dict) and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
            digest = entry["sha256"]
        else:
            log.info("hashing %s (%d bytes)", p, st.st_size)
            digest = sha256_file(p, 1 << 22)
            cache[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
            changed = True
        h.update(f"{p.name}\0{digest}\n".encode())
    if cache_file is not None and changed:
        try:
            Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(Path(cache_file), cache)
        except OSError as exc:  # a cache is an optimisation: never fail training for it
            log.warning("could not write fingerprint cache %s: %s", cache_file, exc)
    return h.hexdigest()


def check_same_base(what: str, recorded_path: str | None, recorded_fp: str | None,
                    base: Path, fingerprint: str) -> None:
    """Refuse to continue *what* (an adapter or checkpoint) made on another base."""
    if recorded_fp and recorded_fp != fingerprint:
        raise BaseMismatchError(
            f"{what} was trained on base {recorded_path} (fingerprint {recorded_fp[:16]}), but the "
            f"configured base is {base} (fingerprint {fingerprint[:16]}); refusing to train on a "
            f"different base (consolidate or move the adapter away first)")


# ----------------------------------------------------------------------------- loading

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_precision(setting: str, device: torch.device) -> str:
    """``precision`` "auto": bf16 on a GPU that supports it, fp16 (+ GradScaler) on one that does
    not (T4, V100), fp32 on CPU, so CPU runs stay exact. An explicit value is kept."""
    if setting != "auto":
        return setting
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def compute_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    return PRECISIONS[resolve_precision(precision, device)]


def enable_tf32() -> None:
    """TF32 for the fp32 matmuls that remain on an Ampere+ GPU (LoRA's, outside autocast)."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def base_parameter_count(base: Path) -> int:
    """The base's parameter count from its weight files' headers (safetensors), without loading.

    A ``.bin``/``.pt`` base (no header to read) is estimated at 2 bytes a parameter."""
    total = 0
    for p in sorted(Path(base).iterdir()):
        if p.name.endswith(".safetensors"):
            with open(p, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            for name, info in header.items():
                if name != "__metadata__":
                    count = 1
                    for d in info.get("shape", []):
                        count *= int(d)
                    total += count
        elif p.name.endswith((".bin", ".pt", ".pth")):
            total += p.stat().st_size // 2
    return total


def want_gradient_checkpointing(setting: bool | str, base: Path) -> bool:
    """``gradient_checkpointing`` "auto": on above GRADIENT_CHECKPOINTING_AUTO_PARAMS parameters."""
    if setting == "auto":
        return base_parameter_count(base) > GRADIENT_CHECKPOINTING_AUTO_PARAMS
    return bool(setting)


def load_tokenizer(base: Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def keep_cpu_4bit_trainable(model: Any) -> int:
    """bitsandbytes on a CPU with AVX512-BF16 repacks a 4-bit weight for its inference kernel the
    first time the layer runs in eval mode without grad (our evaluation), for good: later training
    steps then run that kernel, which has no autograd (other numerics, and no gradient through the
    base to earlier layers' LoRA). A trainer evaluates between steps, so it never asks for that."""
    n = 0
    for m in model.modules():
        if getattr(m, "support_avx512bf16_for_cpu", False):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def load_base_model(base: Path, *, use_qlora: bool, device: torch.device,
                    attn_implementation: str = "auto", gradient_checkpointing: bool = False,
                    precision: str = "auto") -> Any:
    """The frozen base, 4-bit nf4 (double quant) when *use_qlora*, ready for LoRA.

    Unlike peft's ``prepare_model_for_kbit_training`` nothing is upcast to fp32: embeddings, norms
    and lm_head stay in the compute dtype (bf16 on a GPU: half the memory, and autocast runs them
    in bf16 anyway); only the LoRA weights train in fp32 (``attach_lora``). On CPU the compute
    dtype is fp32, as before. Gradient checkpointing uses ``use_reentrant=False``.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = compute_dtype(device, precision)
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True,
                              "attn_implementation": "sdpa" if attn_implementation == "auto" else attn_implementation}
    if use_qlora:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": device.index if device.type == "cuda" else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(str(base), **kwargs)
    if not use_qlora:
        model.to(device)
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    keep_cpu_4bit_trainable(model)
    if gradient_checkpointing:
        # inputs of the first checkpointed block must require grad for its recompute to backprop
        model.enable_input_require_grads()
        kwargs_ = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24 (the old name is deprecated)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs_)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs_)
    return model


def lora_config(config: dict[str, Any]) -> Any:
    from peft import LoraConfig

    targets = config.get("lora_target_modules", "all-linear")
    return LoraConfig(r=int(config.get("lora_r", 16)), lora_alpha=float(config.get("lora_alpha", 32)),
                      lora_dropout=float(config.get("lora_dropout", 0.05)),
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")


def attach_lora(model: Any, config: dict[str, Any], adapter_dir: Path | None = None) -> Any:
    """A trainable PeftModel: continue the adapter in *adapter_dir*, or a fresh LoRA from config."""
    from peft import PeftModel, get_peft_model

    if adapter_dir is not None:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    else:
        peft_model = get_peft_model(model, lora_config(config))
    for n, p in peft_model.named_parameters():
        if "lora_" in n and p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # LoRA weights train in fp32 (bf16 only in compute)
    return peft_model


def adapter_state_dict(model: Any) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model: Any, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"adapter state has unexpected keys: {list(unexpected)[:5]}")


def save_adapter(model: Any, directory: Path) -> None:
    """adapter_config.json + adapter_model.safetensors into *directory* (files not yet fsynced)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    cfg = model.peft_config["default"]
    cfg.save_pretrained(str(directory))
    save_file(adapter_state_dict(model), str(directory / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    give_default_modes(directory)           # safetensors writes 0600; the configs are 0644


def trainable_parameters(model: Any) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
