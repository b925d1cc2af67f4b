"""bitsandbytes on a CPU with AVX512-BF16 repacks a 4-bit weight for its inference kernel the
first time a layer runs in eval mode without grad, and keeps it so: training steps after an
evaluation would then run a kernel without autograd. The trainer's base never asks for it."""
from __future__ import annotations

from pathlib import Path

import torch

from trainer.model import keep_cpu_4bit_trainable, load_base_model


def packed(model) -> int:
    return sum(1 for m in model.modules()
               if getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False))


def eval_forward(model) -> None:
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    model.train()


def test_an_evaluation_leaves_the_4bit_weights_trainable(tiny_base: Path) -> None:
    model = load_base_model(tiny_base, use_qlora=True, device=torch.device("cpu"))
    eval_forward(model)
    assert packed(model) == 0
    assert keep_cpu_4bit_trainable(model) == 0          # already off for every 4-bit layer


def test_without_it_a_cpu_with_avx512_bf16_repacks(tiny_base: Path) -> None:
    """The quirk itself (where the CPU has AVX512-BF16): the reason for keep_cpu_4bit_trainable."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32), device_map={"": "cpu"})
    capable = [m for m in model.modules() if getattr(m, "support_avx512bf16_for_cpu", False)]
    eval_forward(model)
    assert packed(model) == len(capable)                 # 0 on a CPU without AVX512-BF16
