"""Padding-free packing with per-example (block-diagonal) attention.

Examples are packed into rows of at most ``max_length`` tokens (best-fit-decreasing). Inside a
row, ``position_ids`` restart at 0 for every example. A micro-batch is ``rows_per_batch`` rows,
padded to its longest row; the padding is a segment of its own (positions restarting at 0,
labels -100), so no attention mask is needed.

Why this is exact (transformers 5.23, ``masking_utils``): when ``attention_mask is None`` and
``past_key_values is None``, ``_preprocess_mask_arguments`` calls
``find_packed_sequence_indices(position_ids)``, which marks a new segment wherever consecutive
positions do not step by +1 (``(diff != 1).cumsum(-1)``), computed per row, shape
``(batch, L)``. ``packed_sequence_mask_function`` then allows attention only where
``seg[b, q] == seg[b, kv]`` and the causal rule is applied to the remapped positions, so every
row of the batch gets its own block-diagonal causal mask: batch > 1 works, no flattening needed.
This holds for sdpa, eager and flex_attention (the mask is built from the same mask function;
flex_attention turns it into a BlockMask that skips the masked blocks).

Two conditions the caller MUST meet, or examples silently attend to each other:
* pass ``attention_mask=None`` (a 2-D padding mask switches the packed detection off);
* pass ``use_cache=False`` (Qwen3's forward creates a DynamicCache whenever ``use_cache`` is
  true, which is the config default even in train mode, and a cache switches detection off).
``Batch.model_inputs()`` returns exactly these arguments.

Labels: the first label of every segment is -100, so the causal shift in the loss never makes
the last token of one example predict the first token of the next.
"""
from __future__ import annotations

import bisect
import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch

from trainer.data import IGNORE_INDEX

if TYPE_CHECKING:
    from trainer.data import Example

log = logging.getLogger(__name__)


@dataclass
class Batch:
    input_ids: torch.LongTensor      # (rows, L)
    labels: torch.LongTensor         # (rows, L), -100 where no loss
    position_ids: torch.LongTensor   # (rows, L), restarting at 0 per example and for padding
    num_tokens: int                  # real (non-pad) tokens
    num_trained_tokens: int          # labels != -100
    num_examples: int
    # flat positions of (rows, L-1) that carry a label: the loss projects only these
    target_index: torch.LongTensor | None = None

    def __post_init__(self) -> None:
        if self.target_index is None:
            self.target_index = (self.labels[:, 1:].reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)  # type: ignore[return-value]

    @property
    def padded_tokens(self) -> int:
        return int(self.input_ids.numel())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return Batch(self.input_ids.to(device, non_blocking=non_blocking),
                     self.labels.to(device, non_blocking=non_blocking),
                     self.position_ids.to(device, non_blocking=non_blocking),
                     self.num_tokens, self.num_trained_tokens, self.num_examples,
                     self.target_index.to(device, non_blocking=non_blocking))

    def model_inputs(self) -> dict[str, Any]:
        """Forward kwargs that give block-diagonal attention (labels not included)."""
        return {"input_ids": self.input_ids, "position_ids": self.position_ids,
                "attention_mask": None, "use_cache": False}


# Rows of logits computed at once by the chunked loss: CHUNK_BYTES of fp32 logits per chunk
# (151,936-token vocab: 441 positions, ~256 MiB; the tiny base's 512: 131,072 positions).
LOSS_CHUNK_BYTES = 256 << 20


def _causal_lm(model: Any) -> Any:
    """The transformers CausalLM under a PeftModel (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def loss_sum(model: Any, batch: Batch, chunk_bytes: int = LOSS_CHUNK_BYTES) -> torch.Tensor:
    """Summed next-token cross-entropy over the trained tokens of a (packed) batch.

    The one forward the trainer uses: block-diagonal attention comes from ``model_inputs()``
    (restarting position ids, no attention mask, no KV cache). Tests check this very function
    against the same examples run one by one.

    The vocabulary projection is made only at the positions that carry a label, a chunk at a
    time, in fp32 (``chunked_linear_cross_entropy``): the full ``(rows, L, vocab)`` logits are
    never built. For Qwen3-0.6B at 4 x 2048 tokens that is ~13 GiB less at peak.
    """
    lm = _causal_lm(model)
    head = lm.get_output_embeddings()
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    if decoder is None or not isinstance(head, torch.nn.Linear) or \
            getattr(lm.config, "final_logit_softcapping", None):
        return _full_logits_loss(model, batch)      # a head we cannot split: the plain way
    hidden = decoder(**batch.model_inputs()).last_hidden_state
    index = batch.target_index
    h = hidden[:, :-1, :].reshape(-1, hidden.size(-1)).index_select(0, index)
    target = batch.labels[:, 1:].reshape(-1).index_select(0, index)
    return chunked_linear_cross_entropy(h, head, target, chunk_bytes)


def _full_logits_loss(model: Any, batch: Batch) -> torch.Tensor:
    import torch.nn.functional as F

    logits = model(**batch.model_inputs()).logits[:, :-1, :].float()
    target = batch.labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_linear_cross_entropy(h: torch.Tensor, head: torch.nn.Linear, target: torch.Tensor,
                                 chunk_bytes: int = LOSS_CHUNK_BYTES) -> torch.Tensor:
    """``sum(cross_entropy(head(h), target))`` without holding more than one chunk of logits.

    A frozen head (LoRA leaves lm_head alone): one pass per chunk computes the loss and the
    gradient with respect to *h* (softmax - one-hot, times W), kept for backward; nothing is
    recomputed. A trainable head: each chunk is checkpointed (its logits recomputed in backward).
    """
    rows = max(1, chunk_bytes // (4 * head.out_features))
    if not (head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad)):
        return _FrozenHeadCE.apply(h, head.weight, head.bias, target, rows)
    from torch.utils.checkpoint import checkpoint

    total = h.new_zeros((), dtype=torch.float32)
    for k in range(0, h.size(0), rows):
        total = total + checkpoint(_chunk_ce, head, h[k:k + rows], target[k:k + rows], use_reentrant=False)
    return total


def _chunk_ce(head: torch.nn.Module, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F
    return F.cross_entropy(head(h).float(), target, reduction="sum")


class _FrozenHeadCE(torch.autograd.Function):
    """Loss and d(loss)/dh in one chunked pass over a frozen ``W`` (and bias)."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                target: torch.Tensor, rows: int) -> torch.Tensor:
        need_grad = ctx.needs_input_grad[0]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_grad else None
        w = weight if weight.dtype == h.dtype else weight.to(h.dtype)
        for k in range(0, h.size(0), rows):
            hc, tc = h[k:k + rows], target[k:k + rows]
            logits = (hc @ w.t()).float()
            if bias is not None:
                logits += bias.float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
            if need_grad:
                logits.sub_(lse[:, None]).exp_()                          # softmax, in place
                logits[torch.arange(tc.numel(), device=tc.device), tc] -= 1.0
                grad_h[k:k + rows] = (logits.to(w.dtype) @ w).to(h.dtype)
            del logits
        ctx.save_for_backward(grad_h if need_grad else None)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        (grad_h,) = ctx.saved_tensors
        gh = None if grad_h is None else grad_h * grad_out.to(grad_h.dtype)
        return gh, None, None, None, None


def _rng(seed: int, epoch: int, salt: str = "") -> random.Random:
    # str seeds are hashed with sha512: stable across processes and Python versions
    return random.Random(f"packing:{seed}:{epoch}" + (f":{salt}" if salt else ""))


def _best_fit_decreasing(order: list[int], lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Pack items (visited longest first, ties in *order*'s order) into bins of *capacity*."""
    items = sorted(order, key=lambda i: -lengths[i])  # stable: ties keep the shuffled order
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, bin id)
    for i in items:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            rem, b = free.pop(k)
            bins[b].append(i)
            rem -= n
        else:
            b = len(bins)
            bins.append([i])
            rem = capacity - n
        if rem > 0:
            bisect.insort(free, (rem, b))
    return bins


def plan_batches(lengths: list[int], *, max_length: int, rows_per_batch: int, packing: bool = True,
                 seed: int = 0, epoch: int = 0, salt: str = "") -> list[list[list[int]]]:
    """batches -> rows -> example indices; a pure function of its arguments.

    Each epoch shuffles: with packing, ties between equal lengths (and so which examples share a
    row) and the order of rows; without packing, the order of examples (one per row).
    Every index appears exactly once. Raises ValueError for an example longer than max_length.
    ``salt`` tells apart plans of the same epoch (the windows of trainer/plan.py).
    """
    if rows_per_batch < 1:
        raise ValueError("rows_per_batch must be >= 1")
    if max_length < 1:
        raise ValueError("max_length must be >= 1")
    for i, n in enumerate(lengths):
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens > max_length {max_length}")
        if n < 1:
            raise ValueError(f"example {i} is empty")
    rng = _rng(seed, epoch, salt)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if packing:
        rows = _best_fit_decreasing(order, lengths, max_length)
        rng.shuffle(rows)
    else:
        rows = [[i] for i in order]
    return [rows[k:k + rows_per_batch] for k in range(0, len(rows), rows_per_batch)]


def collate(examples: Sequence["Example"], rows: list[list[int]], pad_token_id: int) -> Batch:
    """Build one micro-batch: each row is the concatenation of its examples, padded as a segment."""
    if not rows or any(not r for r in rows):
        raise ValueError("collate needs at least one non-empty row")
    row_ids: list[list[int]] = []
    row_labels: list[list[int]] = []
    row_pos: list[list[int]] = []
    n_examples = 0
    for row in rows:
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        for i in row:
            ex = examples[i]
            ids.extend(ex.input_ids)
            labels.append(IGNORE_INDEX)          # a segment's first token is never predicted
            labels.extend(ex.labels[1:])
            pos.extend(range(len(ex.input_ids)))
            n_examples += 1
        row_ids.append(ids)
        row_labels.append(labels)
        row_pos.append(pos)
    width = max(len(r) for r in row_ids)
    num_tokens = sum(len(r) for r in row_ids)
    for ids, labels, pos in zip(row_ids, row_labels, row_pos):
        pad = width - len(ids)
        if pad:
            ids.extend([pad_token_id] * pad)
            labels.extend([IGNORE_INDEX] * pad)
            pos.extend(range(pad))               # its own segment: attention_mask stays None
    input_ids = torch.tensor(row_ids, dtype=torch.long)
    labels_t = torch.tensor(row_labels, dtype=torch.long)
    position_ids = torch.tensor(row_pos, dtype=torch.long)
    return Batch(input_ids=input_ids, labels=labels_t, position_ids=position_ids,
                 num_tokens=num_tokens, num_trained_tokens=int((labels_t != IGNORE_INDEX).sum()),
                 num_examples=n_examples)


def make_batches(examples: Sequence["Example"], *, max_length: int, rows_per_batch: int,
                 pad_token_id: int, packing: bool = True, seed: int = 0, epoch: int = 0) -> list[Batch]:
    plan = plan_batches([len(e.input_ids) for e in examples], max_length=max_length,
                        rows_per_batch=rows_per_batch, packing=packing, seed=seed, epoch=epoch)
    batches = [collate(examples, rows, pad_token_id) for rows in plan]
    log.debug("epoch %d: %d examples -> %d micro-batches, efficiency %.3f", epoch, len(examples),
              len(batches), packing_efficiency(batches))
    return batches


def packing_efficiency(batches: Iterable[Batch]) -> float:
    """Real tokens / all tokens computed (padding included); 1.0 for no batches."""
    real = total = 0
    for b in batches:
        real += b.num_tokens
        total += b.padded_tokens
    return real / total if total else 1.0
