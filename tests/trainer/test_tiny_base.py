from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from trainer.tiny_base import build_tiny_base


def test_loads_offline_and_forward_is_finite(tiny_base: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_base, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(tiny_base, local_files_only=True)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.config.tie_word_embeddings
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    assert len(tok) <= model.config.vocab_size
    for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"):
        assert tok.convert_tokens_to_ids(t) is not None and tok.convert_tokens_to_ids(t) < len(tok)
    assert tok.pad_token == "<|pad|>" and tok.eos_token == "<|endoftext|>"
    ids = tok("What is 23 + 58? The answer is 81.", return_tensors="pt")["input_ids"]
    assert tok.decode(ids[0]) == "What is 23 + 58? The answer is 81."
    out = model(input_ids=ids, labels=ids, use_cache=False)
    assert math.isfinite(out.loss.item())
    # random init: a wide output distribution, no better than uniform
    assert math.log(model.config.vocab_size) - 0.5 < out.loss.item() < 20

    meta = json.loads((tiny_base / "base.json").read_text())
    assert meta["kind"] == "tiny-qwen3" and meta["seed"] == 0
    assert meta["parameters"] == sum(p.numel() for p in model.parameters())
    assert "created_at" in meta


def test_loads_in_4bit(tiny_base: Path) -> None:
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, quantization_config=q,
                                                 dtype=torch.float32, local_files_only=True)
    n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert n4 == 2 * 7  # q,k,v,o,gate,up,down per layer
    ids = torch.tensor([[1, 20, 30, 40, 2]])
    out = model(input_ids=ids, labels=ids, use_cache=False)
    assert math.isfinite(out.loss.item())


def test_chat_template_renders(tiny_base: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    msgs = [{"role": "system", "content": "You are a calculator."},
            {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": "5"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a calculator.<|im_end|>\n"
                    "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
                    "<|im_start|>assistant\n5<|im_end|>\n")
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
    enc = tok.apply_chat_template(msgs, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    trained = [i for i, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert tok.decode(trained) == "5<|im_end|>"


def test_deterministic_and_refuses_existing(tmp_path: Path, tiny_base: Path) -> None:
    a = build_tiny_base(tmp_path / "a", seed=0)
    assert (a / "model.safetensors").read_bytes() == (tiny_base / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (tiny_base / "tokenizer.json").read_bytes()
    b = build_tiny_base(tmp_path / "b", seed=1)
    assert (a / "model.safetensors").read_bytes() != (b / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError):
        build_tiny_base(a)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temp dirs left


def test_does_not_disturb_global_rng(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_base(tmp_path / "x", seed=5)
    assert torch.equal(torch.rand(3), expected)
