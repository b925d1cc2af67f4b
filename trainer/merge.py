"""Merging an adapter into its base in full precision, checked by probe logits.

``merge(base, adapter_dir, tolerance)``: the base in float32 on CPU (not 4-bit), the adapter
loaded with ``PeftModel.from_pretrained`` (every tensor checked to be the file's), probe logits
of base+adapter, ``merge_and_unload`` and the same probe again: max |diff| <= tolerance.
ops/consolidate.py publishes and switches to the result.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from core.switch import ConsolidationError

log = logging.getLogger("trainer.merge")

# A fixed probe batch: short plain and chat-shaped texts, each run on its own (no padding).
PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "<|im_start|>user\nWhat is 12 plus 7?<|im_end|>\n<|im_start|>assistant\n19<|im_end|>\n",
    "Once upon a time, in a small village by the sea, there lived",
    "def add(a, b):\n    return a + b\n",
)


def probe_inputs(tokenizer: Any) -> list[Any]:
    import torch

    out = []
    for text in PROBE_TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:64]
        if ids:
            out.append(torch.tensor([ids], dtype=torch.long))
    if not out:
        raise ConsolidationError("the base's tokenizer produced no tokens for the probe texts")
    return out


def probe(model: Any, inputs: list[Any]) -> list[Any]:
    import torch

    model.eval()
    with torch.no_grad():
        return [model(input_ids=x, use_cache=False).logits.detach().float().clone() for x in inputs]


def max_diff(a: list[Any], b: list[Any]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def load_full_precision(path: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
    model.to("cpu")
    model.eval()
    return model


def _check_adapter_loaded(peft_model: Any, adapter_dir: Path) -> None:
    """The adapter's weights in the model are exactly those in the file (nothing silently missing)."""
    import torch
    from safetensors.torch import load_file

    from trainer.model import adapter_state_dict

    on_disk = load_file(str(adapter_dir / "adapter_model.safetensors"))
    loaded = adapter_state_dict(peft_model)
    if set(on_disk) != set(loaded):
        missing = sorted(set(on_disk) ^ set(loaded))[:5]
        raise ConsolidationError(f"adapter {adapter_dir} does not fit the base: keys differ ({missing})")
    for k, v in on_disk.items():
        if not torch.equal(v.float(), loaded[k].float()):
            raise ConsolidationError(f"adapter weight {k} did not load as saved")


def merge(base: Path, adapter_dir: Path, tolerance: float) -> tuple[Any, Any, list[Any], list[Any], dict[str, float]]:
    """(merged model, tokenizer, probe inputs, merged probe logits, probe numbers)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    inputs = probe_inputs(tokenizer)
    model = load_full_precision(base)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    peft_model.eval()
    _check_adapter_loaded(peft_model, adapter_dir)
    with peft_model.disable_adapter():
        base_logits = probe(peft_model, inputs)
    unmerged = probe(peft_model, inputs)
    merged = peft_model.merge_and_unload()
    merged.eval()
    merged_logits = probe(merged, inputs)
    diff = max_diff(unmerged, merged_logits)
    effect = max_diff(base_logits, unmerged)
    numbers = {"max_abs_diff": diff, "tolerance": tolerance, "adapter_effect_max_abs": effect,
               "texts": len(inputs), "tokens": int(sum(x.numel() for x in inputs))}
    log.info("probe: merged vs base+adapter max |diff| %.3g (tolerance %.3g); adapter effect %.3g",
             diff, tolerance, effect)
    if not diff <= tolerance:  # also catches NaN
        raise ConsolidationError(f"merged model does not reproduce base+adapter: probe max |diff| "
                                 f"{diff:.3g} > tolerance {tolerance:.3g}; nothing was changed")
    return merged, tokenizer, inputs, merged_logits, numbers
