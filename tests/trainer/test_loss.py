"""The chunked loss: the vocabulary is projected only at labelled positions, a chunk at a time.

Same value and same gradients as the plain full-logits cross-entropy (within 1e-5 on CPU), for
the frozen head LoRA leaves alone (one pass, no recompute) and for a trainable head
(checkpointed chunks); tiny chunks so that several are taken.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.data import IGNORE_INDEX, Example
from trainer.packing import _full_logits_loss, chunked_linear_cross_entropy, collate, loss_sum


def _examples(n: int, vocab: int, seed: int) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(5, 40, (1,), generator=g))
        ids = torch.randint(8, vocab, (length,), generator=g).tolist()
        prompt = int(torch.randint(1, length - 2, (1,), generator=g))
        out.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:], len(out) + 1))
    return out


@pytest.mark.parametrize("trainable_head", [False, True])
def test_chunked_linear_cross_entropy_matches_full(trainable_head: bool) -> None:
    torch.manual_seed(0)
    n, d, vocab = 300, 32, 517
    head = torch.nn.Linear(d, vocab, bias=True)
    head.requires_grad_(trainable_head)
    h1 = torch.randn(n, d, requires_grad=True)
    h2 = h1.detach().clone().requires_grad_(True)
    target = torch.randint(0, vocab, (n,))
    ref = F.cross_entropy(head(h1).float(), target, reduction="sum")
    ref.backward()
    ref_head = head.weight.grad.clone() if trainable_head else None
    if trainable_head:
        head.weight.grad = None
    got = chunked_linear_cross_entropy(h2, head, target, chunk_bytes=4 * vocab * 37)   # 37 rows a chunk
    got.backward()
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-5)
    assert torch.allclose(h2.grad, h1.grad, rtol=1e-5, atol=1e-6)
    if trainable_head:
        assert torch.allclose(head.weight.grad, ref_head, rtol=1e-5, atol=1e-6)


def test_trainer_loss_equals_full_logits_loss(tiny_base) -> None:
    """loss_sum (decoder + chunked head at labelled positions) against the plain forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    vocab = model.config.vocab_size
    batch = collate(_examples(9, vocab, seed=3), [[0, 1, 2], [3, 4], [5, 6, 7, 8]], pad_token_id=0)
    assert batch.target_index.numel() == batch.num_trained_tokens
    ref = _full_logits_loss(model, batch)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.get_output_embeddings().weight.requires_grad_(False)   # as under LoRA: the head is frozen
    got = loss_sum(model, batch, chunk_bytes=4 * vocab * 16)
    got.backward()
    assert abs(got.item() - ref.item()) <= 1e-5 * abs(ref.item())
    for n, p in model.named_parameters():
        if p.requires_grad and n in ref_grads and "embed_tokens" not in n and "lm_head" not in n:
            assert torch.allclose(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6), n


def test_loss_memory_scales_with_the_chunk_not_the_batch() -> None:
    """The frozen path keeps one chunk of logits: its autograd graph saves only d(loss)/dh."""
    n, d, vocab = 2048, 16, 4096
    head = torch.nn.Linear(d, vocab, bias=False).requires_grad_(False)
    h = torch.randn(n, d, requires_grad=True)
    target = torch.randint(0, vocab, (n,))
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = chunked_linear_cross_entropy(h, head, target, chunk_bytes=4 * vocab * 128)
    assert sum(saved) <= n * d * 4          # grad_h only, never (n, vocab) logits (32 MiB here)
    loss.backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()
