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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

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


REASON_LINES = 20   # line numbers kept per reason

#: what each reason of a data report means (the dashboard and ``trainer-ctl queue show`` use it)
REASON_TEXT = {
    "truncated": "cut to max_length (tokens_cut tokens; answer_tokens_cut of them trained)",
    "chunked": "plain text split into max_length pieces",
    "dropped_too_long": "longer than max_length, dropped (truncation: drop)",
    "dropped_empty": "no token left to train, dropped",
    "no_user_turn": "chat without a user turn (trained)",
    "no_assistant_turn": "chat without an assistant turn to train, dropped",
    "empty_assistant_content": "an assistant turn with empty content (trained)",
    "duplicate": "repeats an earlier line of the file (trained as given)",
    "unknown_keys": "keys this format does not read (ignored)",
}


@dataclass
class DataReport:
    """What became of every line of a file: counts, and per reason the count and first lines."""
    format: str | None
    truncation: str | None = None
    max_length: int | None = None
    records: int = 0            # good records read
    examples: int = 0           # examples produced (a chunked text gives several)
    tokens: int = 0             # tokens in the produced examples
    trained_tokens: int = 0     # of which carry a loss
    reasons: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, reason: str, line: int, **extra: Any) -> None:
        """Count *line* under *reason*; int extras are summed, others kept from the first line."""
        r = self.reasons.setdefault(reason, {"count": 0, "lines": []})
        r["count"] += 1
        if len(r["lines"]) < REASON_LINES:
            r["lines"].append(line)
        for k, v in extra.items():
            if isinstance(v, int):
                r[k] = r.get(k, 0) + v
            else:
                r.setdefault(k, v)

    def count(self, reason: str) -> int:
        return int(self.reasons.get(reason, {}).get("count", 0))

    @property
    def bad_records(self) -> int:
        """Lines that are not a good record of the file's format (not trained)."""
        return sum(r["count"] for k, r in self.reasons.items() if k not in REASON_TEXT)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["tokens_cut"] = sum(int(r.get("tokens_cut", 0)) for r in self.reasons.values())
        out["bad_records"] = self.bad_records
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "DataReport":
        known = {k: data[k] for k in ("format", "truncation", "max_length", "records", "examples",
                                      "tokens", "trained_tokens", "reasons") if k in data}
        return cls(**known)


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


def load_examples(path: Path, tokenizer: Any, *, max_length: int, truncation: str = "keep_answer",
                  progress: Callable[[str, int, int], None] | None = None) -> tuple[list[Example], DataReport]:
    """Every example of *path* as a list (small files and tests; the trainer uses the memory-mapped
    ``trainer.tokencache``). Raises DataError when the file has no good record.

    ``truncation``: see ``trainer.encode``. ``progress(phase, done, total)`` is called as it goes.
    """
    from trainer.encode import encode_file

    path = Path(path)
    total = count_lines(path)
    report = DataReport(format=None)
    on_lines = None if progress is None else (lambda done: progress("tokenizing", done, total))
    examples = [Example(input_ids=e.ids.tolist(), labels=labels_of(e.ids, e.mask), line=e.line)
                for e in encode_file(path, tokenizer, max_length=max_length, truncation=truncation,
                                     progress=on_lines, report=report)]
    if report.records == 0:
        raise DataError(f"{path.name}: no valid record ({report.reasons or 'empty file'})")
    log.info("%s: %s", path.name, report.to_json())
    return examples, report


def labels_of(ids: Any, mask: Any) -> list[int]:
    """Labels from ids and a 0/1 loss mask (numpy arrays)."""
    import numpy as np
    return np.where(np.asarray(mask, dtype=bool), ids, IGNORE_INDEX).tolist()


def count_lines(path: Path) -> int:
    """Lines in *path* (a last line without newline counts), read in 16 MiB blocks."""
    n, last = 0, b"\n"
    with open(path, "rb") as fh:
        while block := fh.read(1 << 24):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")


def split_indices(n: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) indices of n examples, deterministic for (n, fraction, seed), each in order.

    With ``eval_fraction > 0`` and at least 2 examples, eval gets at least 1 and train keeps at
    least 1.
    """
    if eval_fraction <= 0 or n < 2:
        return list(range(n)), []
    if eval_fraction >= 1:
        raise ValueError("eval_fraction must be < 1")
    n_eval = min(max(1, round(n * eval_fraction)), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = sorted(order[:n_eval])
    held_set = set(held)
    return [i for i in range(n) if i not in held_set], held


def split_eval(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, eval) examples, chosen by :func:`split_indices`; both keep file order."""
    train, held = split_indices(len(examples), eval_fraction, seed)
    return [examples[i] for i in train], [examples[i] for i in held]
