"""Chat records rendered once each, and the trained character spans found in the rendered text.

With ``{% generation %}`` markers in the template, ``render_jinja_template`` gives the spans
itself; else the turns are searched for in the one rendered text (trainer/encode.py checks the
search against the per-turn reference on a file's first records). The spans become a token mask
through the tokenizer's character offsets (``mask_by_boundaries``, ``mask_from_spans``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from trainer.data import _chat_template, _render, has_generation_markers


def mask_from_spans(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """1 for every token overlapping a character span (the rule of return_assistant_tokens_mask)."""
    mask = np.zeros(len(offsets), dtype=np.uint8)
    if not len(offsets):
        return mask
    a, b = offsets[:, 0], offsets[:, 1]
    for s, e in spans:
        mask |= (((a < e) & (b > s)) | ((a == b) & (a >= s) & (a < e))).astype(np.uint8)
    return mask


def tokens_before(offsets: np.ndarray, char_end: int) -> int:
    """Number of leading tokens that start before *char_end*."""
    return int(np.searchsorted(offsets[:, 0], char_end, side="left")) if len(offsets) else 0


def mask_by_boundaries(enc: Any, n: int, spans: list[tuple[int, int]], sys_end: int
                       ) -> tuple[np.ndarray, int] | None:
    """The span mask and the system turn's token count from the tokens at the span boundaries
    (same result as :func:`mask_from_spans`, without converting every offset); None when a
    boundary character belongs to no token."""
    mask = np.zeros(n, dtype=np.uint8)
    for s, e in spans:
        if e <= s:
            continue
        a, b = enc.char_to_token(s), enc.char_to_token(e - 1)
        if a is None or b is None:
            return None
        mask[a:b + 1] = 1
    keep = 0
    if sys_end:
        last = enc.char_to_token(sys_end - 1)
        if last is None:
            return None
        keep = last + 1
    return mask, keep


class ChatRenderer:
    """Renders conversations once each and finds the trained character spans."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.template = _chat_template(tokenizer)
        self.markers = has_generation_markers(tokenizer)
        self.specials = sorted((t for t in getattr(tokenizer, "all_special_tokens", []) if t),
                               key=len, reverse=True)
        self.header = self._generation_header()
        self.search_ok: bool | None = None if not self.markers else True   # verified on first records

    def _generation_header(self) -> str | None:
        probe = [{"role": "user", "content": "x"}]
        try:
            with_prompt = _render(self.tok, probe, add_generation_prompt=True)
            without = _render(self.tok, probe)
        except Exception:   # a template that refuses a lone user turn
            return None
        if with_prompt.startswith(without) and len(with_prompt) > len(without):
            return with_prompt[len(without):]
        return None

    def _special_after(self, text: str, pos: int) -> int:
        for tok in self.specials:
            if text.startswith(tok, pos):
                return pos + len(tok)
        return pos

    def _find(self, text: str, content: str, start: int) -> int:
        """Where *content* is in *text* from *start*: the first place followed by a special token
        (a turn's end marker), else the first place; -1 if nowhere."""
        first = pos = text.find(content, start)
        while pos >= 0:
            if self._special_after(text, pos + len(content)) > pos + len(content):
                return pos
            pos = text.find(content, pos + 1)
        return first

    def _search(self, text: str, msgs: list[dict[str, str]], trained: list[bool]
                ) -> tuple[list[tuple[int, int]], int] | None:
        """Trained spans and the end of the system turn, found in one rendered text; None when a
        turn cannot be found (the caller then uses the reference)."""
        cursor, spans, sys_end = 0, [], 0
        for i, m in enumerate(msgs):
            content = m["content"]
            start = cursor
            if m["role"] == "assistant" and self.header:
                h = text.find(self.header, cursor)
                if h < 0:
                    return None
                start = h + len(self.header)
            pos = self._find(text, content, start) if content else start
            if pos < 0 and content.strip():
                content = content.strip()
                pos = self._find(text, content, start)
            if pos < 0:
                return None
            end = self._special_after(text, pos + len(content))
            if m["role"] == "assistant" and trained[i]:
                spans.append((start if self.header else pos, end))
            if i == 0 and m["role"] == "system":
                sys_end = end
            cursor = end
        return spans, sys_end

    def render(self, convs: list[tuple[list[dict[str, str]], list[bool]]]
               ) -> list[tuple[str, list[tuple[int, int]], int] | None]:
        """(text, trained spans, system end) per conversation; None = use the reference."""
        out: list[tuple[str, list[tuple[int, int]], int] | None] = []
        if self.markers:
            from transformers.utils.chat_template_utils import render_jinja_template

            plain = [c for c in convs if all(t == (m["role"] == "assistant") for m, t in zip(*c))]
            texts, indices = render_jinja_template(
                conversations=[m for m, _ in plain], chat_template=self.template,
                return_assistant_tokens_mask=True, **self.tok.special_tokens_map) if plain else ([], [])
            it = iter(zip(texts, indices))
            for msgs, trained in convs:
                if all(t == (m["role"] == "assistant") for m, t in zip(msgs, trained)):
                    text, gen = next(it)
                    found = self._search(text, msgs, trained)
                    out.append((text, [tuple(g) for g in gen], found[1] if found else 0))
                else:
                    out.append(None)
            return out
        for msgs, trained in convs:
            text = _render(self.tok, msgs)
            found = self._search(text, msgs, trained) if self.search_ok is not False else None
            out.append(None if found is None else (text, found[0], found[1]))
        return out
