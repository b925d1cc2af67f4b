"""Validated JSONL records -> token examples with loss masks.

Every format ends up as ``Example(input_ids, labels, line)`` with ``labels == -100`` where no loss
is taken:

* ``messages`` / ``sharegpt``: rendered with the tokenizer's chat template; loss on every
  assistant turn (its content and the template's end-of-turn marker, e.g. ``<|im_end|>``).
  The mask comes from ``return_assistant_tokens_mask`` when the template has
  ``{% generation %}`` markers, else from a fallback that renders the conversation prefix
  before and after each assistant turn and maps the character span to tokens. An assistant
  message with ``"weight": 0`` (OpenAI fine-tuning format) is rendered but not trained.
* ``prompt_completion`` / ``alpaca``: rendered as a user turn + an assistant turn through the
  chat template when the tokenizer has one (loss on the completion/output), else
  ``prompt + completion + EOS`` with loss on ``completion + EOS``.
* ``text``: loss on every token plus an appended EOS. A document-start token (BOS, or EOS when
  the tokenizer has no BOS, as in Qwen's pretraining stream) is put in front so that the first
  text token is predicted too.

``labels[0]`` is always -100: a causal LM never predicts position 0, and keeping it explicit
makes ``trained_tokens`` honest and packed rows exact (no label straddles two examples).
"""
from __future__ import annotations

import logging
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

IGNORE_INDEX = -100

log = logging.getLogger(__name__)

_GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")

SHAREGPT_ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                     "system": "system", "function_call": "assistant", "observation": "tool",
                     "tool": "tool"}


class DataError(ValueError):
    """The file cannot be turned into examples (rejected by validation, or unknown format)."""


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]     # IGNORE_INDEX (-100) where no loss is taken
    line: int             # 1-based line of the record in its JSONL file

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclass
class DataReport:
    format: str
    records: int = 0            # valid records read
    examples: int = 0           # examples produced
    truncated: int = 0          # examples cut to max_length (truncation="truncate")
    dropped_too_long: int = 0   # records longer than max_length dropped (truncation="drop")
    dropped_empty: int = 0      # records with no trained token (after truncation)
    tokens: int = 0             # tokens in the produced examples
    trained_tokens: int = 0     # of which carry a loss
    skipped_invalid: int = 0    # records skipped by validation (counted in its report)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# records -> conversations


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


def record_to_messages(record: dict, fmt: str) -> tuple[list[dict[str, str]], list[bool]]:
    """The record as chat messages, plus per message whether it is trained (assistant, weight!=0)."""
    if fmt == "messages":
        msgs = [{"role": str(m.get("role")), "content": _content_text(m.get("content"))}
                for m in record["messages"]]
        train = [m.get("role") == "assistant" and m.get("weight", 1) != 0
                 for m in record["messages"]]
    elif fmt == "sharegpt":
        msgs = []
        if isinstance(record.get("system"), str) and record["system"]:
            msgs.append({"role": "system", "content": record["system"]})
        for turn in record["conversations"]:
            msgs.append({"role": SHAREGPT_ROLE_MAP.get(turn["from"], turn["from"]),
                         "content": _content_text(turn.get("value"))})
        train = [m["role"] == "assistant" for m in msgs]
    elif fmt in ("prompt_completion", "alpaca"):
        prompt, completion = prompt_and_completion(record, fmt)
        msgs = []
        if fmt == "alpaca" and isinstance(record.get("system"), str) and record["system"]:
            msgs.append({"role": "system", "content": record["system"]})
        msgs += [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        train = [False] * (len(msgs) - 1) + [True]
    else:
        raise DataError(f"format {fmt!r} is not a chat format")
    return msgs, train


def prompt_and_completion(record: dict, fmt: str) -> tuple[str, str]:
    if fmt == "prompt_completion":
        return record["prompt"], record["completion"]
    instruction, inp = record["instruction"], record.get("input") or ""
    return (instruction + "\n\n" + inp if inp else instruction), record["output"]


# --------------------------------------------------------------------------------------------
# tokenization


def _chat_template(tokenizer: Any) -> str | None:
    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):
        tpl = tpl.get("default") or next(iter(tpl.values()), None)
    return tpl or None


def has_generation_markers(tokenizer: Any) -> bool:
    tpl = _chat_template(tokenizer)
    return bool(tpl and _GENERATION_RE.search(tpl))


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def chat_tokens_with_markers(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """input_ids and the assistant mask (0/1) from the template's generation markers."""
    enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids = list(enc["input_ids"])
    mask = [int(bool(x)) for x in enc["assistant_masks"]]
    return ids, mask


def chat_tokens_fallback(tokenizer: Any, messages: list[dict[str, str]],
                         trained: list[bool] | None = None) -> tuple[list[int], list[int]]:
    """input_ids and assistant mask without generation markers.

    For each trained assistant turn i the span is ``render(messages[:i+1])`` minus
    ``render(messages[:i], add_generation_prompt=True)`` (trailing whitespace after the
    end-of-turn marker excluded); when the template does not render prefixes consistently, the
    span is the turn's content found in the full text, plus a special token right after it.
    Characters are mapped to tokens by offsets: a token is trained if it overlaps a span (the
    same rule as ``return_assistant_tokens_mask``).
    """
    if trained is None:
        trained = [m["role"] == "assistant" for m in messages]
    full = _render(tokenizer, messages)
    spans: list[tuple[int, int]] = []
    cursor = 0
    specials = sorted((t for t in getattr(tokenizer, "all_special_tokens", []) if t),
                      key=len, reverse=True)
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        try:
            pre: str | None = _render(tokenizer, messages[:i], add_generation_prompt=True)
        except Exception:  # some templates cannot render an empty conversation
            pre = None
        post = _render(tokenizer, messages[: i + 1])
        if (pre is not None and full.startswith(pre) and full.startswith(post)
                and len(post) > len(pre) and len(pre) >= cursor):
            start, end = len(pre), len(post)
            while end > start and full[end - 1].isspace():
                end -= 1
        else:
            content = msg["content"]
            if pre is not None and full.startswith(pre) and len(pre) >= cursor:
                cursor = len(pre)  # the turn starts after its (consistently rendered) prefix
            start = full.find(content, cursor) if content else -1
            if start < 0:
                log.debug("fallback mask: assistant turn %d not found in the rendered text", i)
                continue
            end = start + len(content)
            for tok in specials:
                if full.startswith(tok, end):
                    end += len(tok)
                    break
        cursor = end
        if trained[i] and end > start:
            spans.append((start, end))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    mask = [0] * len(ids)
    for k, (a, b) in enumerate(enc["offset_mapping"]):
        for s, e in spans:
            if a < e and b > s or (a == b and s <= a < e):
                mask[k] = 1
                break
    return ids, mask


def _special_prefix(tokenizer: Any) -> list[int]:
    """Tokens the tokenizer puts in front of a text by itself (e.g. BOS), without a trailing EOS."""
    ids = list(tokenizer("", add_special_tokens=True)["input_ids"])
    if ids and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return ids


def _eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token")
    return int(tokenizer.eos_token_id)


def tokenize_record(record: dict, fmt: str, tokenizer: Any) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one record, untruncated."""
    tpl = _chat_template(tokenizer)
    if fmt in ("messages", "sharegpt") or (fmt in ("prompt_completion", "alpaca") and tpl):
        if not tpl:
            raise DataError(f"format {fmt!r} needs a chat template and the tokenizer has none")
        msgs, trained = record_to_messages(record, fmt)
        if has_generation_markers(tokenizer) and all(t == (m["role"] == "assistant")
                                                     for m, t in zip(msgs, trained)):
            ids, mask = chat_tokens_with_markers(tokenizer, msgs)
        else:
            ids, mask = chat_tokens_fallback(tokenizer, msgs, trained)
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    elif fmt in ("prompt_completion", "alpaca"):
        prompt, completion = prompt_and_completion(record, fmt)
        p_ids = _special_prefix(tokenizer) + list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        c_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"]) + [_eos_id(tokenizer)]
        ids = p_ids + c_ids
        labels = [IGNORE_INDEX] * len(p_ids) + c_ids
    elif fmt == "text":
        start = _special_prefix(tokenizer)
        if not start:
            start = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else _eos_id(tokenizer)]
        body = list(tokenizer(record["text"], add_special_tokens=False)["input_ids"]) + [_eos_id(tokenizer)]
        ids = start + body
        labels = [IGNORE_INDEX] * len(start) + body
    else:
        raise DataError(f"unknown format {fmt!r}")
    if labels:
        labels[0] = IGNORE_INDEX
    return ids, labels


# --------------------------------------------------------------------------------------------
# files


def load_examples(path: Path, tokenizer: Any, *, max_length: int, truncation: str = "truncate",
                  progress: Callable[[str, int, int], None] | None = None) -> tuple[list[Example], DataReport]:
    """Validate *path*, then tokenize its valid records into examples.

    Raises DataError when validation rejects the file. ``truncation``: "truncate" cuts an
    over-long example to ``max_length`` tokens, "drop" drops it; either way it is counted.
    ``progress(phase, done, total)`` is called as it goes ("validating" 0/0 first, then
    "tokenizing" done/total records, often: the caller throttles).
    """
    from daemon.validation import iter_records, validate_file

    if truncation not in ("truncate", "drop"):
        raise ValueError(f"truncation must be 'truncate' or 'drop', not {truncation!r}")
    if max_length < 2:
        raise ValueError("max_length must be at least 2")
    path = Path(path)
    if progress is not None:
        progress("validating", 0, 0)
    vrep = validate_file(path)
    if not vrep.ok or vrep.format is None:
        raise DataError(f"{path.name}: {vrep.reason or 'no format detected'}")
    total = vrep.valid_records
    on_record = None if progress is None else (lambda done: progress("tokenizing", done, total))
    examples, report = examples_from_records(iter_records(path), vrep.format, tokenizer,
                                             max_length=max_length, truncation=truncation,
                                             on_record=on_record)
    report.skipped_invalid = vrep.records - vrep.valid_records
    log.info("%s: %s", path.name, report.to_json())
    return examples, report


def examples_from_records(records: Iterable[tuple[int, dict]], fmt: str, tokenizer: Any, *,
                          max_length: int, truncation: str = "truncate",
                          on_record: Callable[[int], None] | None = None) -> tuple[list[Example], DataReport]:
    """Tokenize already-validated ``(line, record)`` pairs of format *fmt*.
    ``on_record(records done)`` is called after each record (progress)."""
    report = DataReport(format=fmt)
    examples: list[Example] = []
    for line, record in records:
        if on_record is not None and report.records:
            on_record(report.records)
        report.records += 1
        ids, labels = tokenize_record(record, fmt, tokenizer)
        if len(ids) > max_length:
            if truncation == "drop":
                report.dropped_too_long += 1
                continue
            ids, labels = ids[:max_length], labels[:max_length]
            report.truncated += 1
        n_trained = sum(1 for x in labels if x != IGNORE_INDEX)
        if n_trained == 0:
            report.dropped_empty += 1
            continue
        examples.append(Example(input_ids=ids, labels=labels, line=line))
        report.tokens += len(ids)
        report.trained_tokens += n_trained
    report.examples = len(examples)
    if on_record is not None:
        on_record(report.records)
    return examples, report


def split_eval(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, eval), deterministic for (examples, fraction, seed); both keep file order.

    With ``eval_fraction > 0`` and at least 2 examples, eval gets at least 1 and train keeps at
    least 1.
    """
    n = len(examples)
    if eval_fraction <= 0 or n < 2:
        return list(examples), []
    if eval_fraction >= 1:
        raise ValueError("eval_fraction must be < 1")
    n_eval = min(max(1, round(n * eval_fraction)), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    eval_idx = set(order[:n_eval])
    train = [e for i, e in enumerate(examples) if i not in eval_idx]
    held = [e for i, e in enumerate(examples) if i in eval_idx]
    return train, held
