"""Packed rows must give exactly the loss of the examples run one by one."""
from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trainer.data import IGNORE_INDEX, Example
from trainer.packing import Batch, collate, loss_sum, make_batches, packing_efficiency, plan_batches

PAD = 3


def make_examples(n: int, seed: int = 0, lo: int = 3, hi: int = 24) -> list[Example]:
    r = random.Random(seed)
    out = []
    for k in range(n):
        length = r.randrange(lo, hi)
        ids = [r.randrange(4, 800) for _ in range(length)]
        labels = [IGNORE_INDEX] + [t if r.random() < 0.7 else IGNORE_INDEX for t in ids[1:]]
        if all(x == IGNORE_INDEX for x in labels):
            labels[-1] = ids[-1]
        out.append(Example(ids, labels, k + 1))
    return out


def token_losses(model, input_ids: torch.Tensor, labels: torch.Tensor, **kwargs) -> torch.Tensor:
    """Per-token CE (0 where label == -100), flattened in row order."""
    logits = model(input_ids=input_ids, **kwargs).logits[:, :-1].float()
    target = labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="none")


def summed_loss(model, input_ids, labels, **kwargs) -> float:
    return float(token_losses(model, input_ids, labels, **kwargs).sum())


@pytest.fixture(scope="module", params=["sdpa", "eager", "flex_attention"])
def sharp_model(request, tiny_base: Path):
    """The tiny base in fp32, with its matrices scaled up so that attention visibly matters.

    At random init (std 0.02) the logits are nearly uniform and a leak between examples moves
    the loss by < 1e-4; scaled by 20, the same leak moves it by several percent.
    """
    from transformers import AutoModelForCausalLM

    if request.param == "flex_attention":
        # torch 2.13's CPU flex-attention template fails to compile once shapes go dynamic
        # ("cur_qSplitSize4 was not declared"): compile each shape statically on CPU
        import torch._dynamo as dynamo
        was = dynamo.config.automatic_dynamic_shapes
        dynamo.config.automatic_dynamic_shapes = False
        request.addfinalizer(lambda: setattr(dynamo.config, "automatic_dynamic_shapes", was))
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32,
                                                 attn_implementation=request.param)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(20.0)
    model.train()  # dropout is 0 in Qwen3: train mode is deterministic, and it is what training uses
    return model


def alone_loss(model, examples: list[Example]) -> tuple[float, list[float]]:
    total, per = 0.0, []
    for ex in examples:
        ids = torch.tensor([ex.input_ids])
        lab = torch.tensor([ex.labels])
        t = token_losses(model, ids, lab, use_cache=False)
        per.extend(t[lab[0, 1:] != IGNORE_INDEX].tolist())
        total += float(t.sum())
    return total, per


@torch.no_grad()
def test_packed_equals_one_by_one(sharp_model) -> None:
    examples = make_examples(10, seed=1)
    batches = make_batches(examples, max_length=48, rows_per_batch=3, pad_token_id=PAD, seed=0)
    assert any(b.input_ids.shape[0] > 1 for b in batches)            # batch > 1 is exercised
    assert any(b.num_tokens < b.padded_tokens for b in batches)         # and a padding segment
    assert any(int((b.position_ids == 0).sum()) > b.shape[0] for b in batches)  # and packed rows
    assert sum(b.num_examples for b in batches) == len(examples)
    expected, _ = alone_loss(sharp_model, examples)
    got = sum(float(loss_sum(sharp_model, b)) for b in batches)      # the trainer's own forward
    assert math.isclose(got, expected, rel_tol=1e-4), (got, expected)
    assert sum(b.num_trained_tokens for b in batches) == sum(e.num_trained for e in examples)


@torch.no_grad()
def test_packed_batch_token_by_token(sharp_model) -> None:
    """One micro-batch of 2 packed rows with a padding segment: every token's loss matches."""
    examples = make_examples(5, seed=2)
    rows = [[0, 1, 2], [3, 4]]
    b = collate(examples, rows, PAD)
    assert b.shape[0] == 2 and b.num_tokens < b.padded_tokens          # one row carries padding
    packed = token_losses(sharp_model, b.input_ids, b.labels, position_ids=b.position_ids,
                          attention_mask=None, use_cache=False)
    packed = packed[b.labels[:, 1:].reshape(-1) != IGNORE_INDEX].tolist()
    _, alone = alone_loss(sharp_model, [examples[i] for row in rows for i in row])
    assert len(packed) == len(alone)
    assert max(abs(a - p) for a, p in zip(alone, packed)) < 1e-4


@torch.no_grad()
def test_test_catches_cross_example_attention(sharp_model) -> None:
    examples = make_examples(6, seed=3)
    b = collate(examples, [[0, 1, 2], [3, 4, 5]], PAD)
    expected, _ = alone_loss(sharp_model, examples)
    good = summed_loss(sharp_model, b.input_ids, b.labels, position_ids=b.position_ids,
                       attention_mask=None, use_cache=False)
    assert math.isclose(good, expected, rel_tol=1e-4)
    # 1. positions 0..L-1 over the packed row: one causal sequence, examples see each other
    flat = torch.arange(b.shape[1]).expand(b.shape[0], -1)
    leaky = summed_loss(sharp_model, b.input_ids, b.labels, position_ids=flat, use_cache=False)
    assert abs(leaky / expected - 1) > 1e-3
    # 2. right positions, but a 2-D attention mask: transformers then skips packed detection
    leaky = summed_loss(sharp_model, b.input_ids, b.labels, position_ids=b.position_ids,
                        attention_mask=torch.ones_like(b.input_ids), use_cache=False)
    assert abs(leaky / expected - 1) > 1e-3
    # 3. right positions, but the KV cache left on (the config default): detection skipped too
    leaky = summed_loss(sharp_model, b.input_ids, b.labels, position_ids=b.position_ids)
    assert abs(leaky / expected - 1) > 1e-3


def test_collate_layout() -> None:
    exs = [Example([10, 11, 12], [-100, 11, 12], 1), Example([20, 21], [-100, 21], 2),
           Example([30, 31, 32, 33], [-100, -100, 32, 33], 3)]
    b = collate(exs, [[0, 1], [2]], pad_token_id=PAD)
    assert b.input_ids.tolist() == [[10, 11, 12, 20, 21], [30, 31, 32, 33, PAD]]
    assert b.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert b.labels.tolist() == [[-100, 11, 12, -100, 21], [-100, -100, 32, 33, -100]]
    assert (b.num_tokens, b.num_trained_tokens, b.num_examples) == (9, 5, 3)
    assert b.model_inputs()["attention_mask"] is None and b.model_inputs()["use_cache"] is False
    # a label on a segment's first token is dropped: it would be predicted from the previous example
    b = collate([Example([1, 2], [1, 2], 1), Example([3, 4], [3, 4], 2)], [[0, 1]], PAD)
    assert b.labels.tolist() == [[-100, 2, -100, 4]]


def lognormal_lengths(n: int, max_length: int, seed: int = 0) -> list[int]:
    r = random.Random(seed)
    return [min(max_length, max(8, int(r.lognormvariate(math.log(max_length / 6), 0.8)))) for _ in range(n)]


def test_plan_covers_every_example_within_max_length() -> None:
    lengths = lognormal_lengths(3000, 512)
    plan = plan_batches(lengths, max_length=512, rows_per_batch=4, seed=0, epoch=0)
    flat = [i for batch in plan for row in batch for i in row]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 512 for batch in plan for row in batch)
    assert all(1 <= len(batch) <= 4 for batch in plan) and all(len(b) == 4 for b in plan[:-1])
    with pytest.raises(ValueError):
        plan_batches([5, 600], max_length=512, rows_per_batch=2)


def test_plan_deterministic_and_shuffled_per_epoch() -> None:
    lengths = lognormal_lengths(500, 256, seed=1)
    a = plan_batches(lengths, max_length=256, rows_per_batch=4, seed=7, epoch=0)
    assert a == plan_batches(list(lengths), max_length=256, rows_per_batch=4, seed=7, epoch=0)
    assert a != plan_batches(lengths, max_length=256, rows_per_batch=4, seed=7, epoch=1)
    assert a != plan_batches(lengths, max_length=256, rows_per_batch=4, seed=8, epoch=0)
    u = plan_batches(lengths, max_length=256, rows_per_batch=4, packing=False, seed=7, epoch=0)
    assert all(len(row) == 1 for batch in u for row in batch)
    assert u == plan_batches(lengths, max_length=256, rows_per_batch=4, packing=False, seed=7, epoch=0)
    assert u != plan_batches(lengths, max_length=256, rows_per_batch=4, packing=False, seed=7, epoch=1)


def test_packing_efficiency_lognormal() -> None:
    lengths = lognormal_lengths(2000, 512, seed=2)
    r = random.Random(0)
    examples = [Example([r.randrange(4, 800) for _ in range(n)], [-100] + [1] * (n - 1), i)
                for i, n in enumerate(lengths)]
    packed = make_batches(examples, max_length=512, rows_per_batch=8, pad_token_id=PAD, seed=0)
    unpacked = make_batches(examples, max_length=512, rows_per_batch=8, pad_token_id=PAD,
                            packing=False, seed=0)
    eff_p, eff_u = packing_efficiency(packed), packing_efficiency(unpacked)
    assert eff_p > 0.9
    assert eff_u < 0.6
    assert sum(b.num_tokens for b in packed) == sum(lengths) == sum(b.num_tokens for b in unpacked)
    assert len(packed) < len(unpacked) / 3
    assert all(isinstance(b, Batch) and b.input_ids.shape[1] <= 512 for b in packed)
