"""Built-in data generator: small chat tasks a tiny model visibly learns in minutes on CPU.

Kinds (all ``messages`` records: a fixed system prompt, one user turn, one short answer):

* ``arithmetic``: "What is 7 + 5?" -> "12": addition and non-negative subtraction of one-digit
  numbers, a few phrasings (190 distinct facts: a 2-layer LoRA learns them in minutes on CPU).
* ``arithmetic2``: the same with numbers below 100 ("What is 23 + 58?" -> "81"): harder, for
  larger bases.
* ``syllables``: "Join the syllables: ka + lo + mi" -> "kalomi" (2 to 4 syllables).

Every record is well under 64 tokens with the tiny base's tokenizer. Files are written the way
the inbox expects: a dot-prefixed ``.tmp`` file, fsync, rename to ``NAME.jsonl``, fsync of the
directory, so the daemon never sees a partial file.
"""
from __future__ import annotations

import json
import logging
import os
import random
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

from core.atomic import atomic_write

log = logging.getLogger(__name__)

KINDS = ("arithmetic", "arithmetic2", "syllables")

ARITHMETIC_SYSTEM = "You are a calculator. Answer with the number only."
SYLLABLES_SYSTEM = "You join syllables into one word. Answer with the word only."

_ARITH_PHRASES = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?",
                  "How much is {a} {op} {b}?")
_SYLLABLES = ("ka", "lo", "mi", "ten", "ru", "sa", "po", "ne", "vi", "da", "ko", "ri", "mu",
              "ta", "le", "fo", "zi", "ba", "no", "he")


def _arithmetic(r: random.Random, limit: int = 10) -> dict:
    a, b = r.randrange(limit), r.randrange(limit)
    if r.random() < 0.5:
        op, ans = "+", a + b
    else:
        a, b = max(a, b), min(a, b)
        op, ans = "-", a - b
    question = r.choice(_ARITH_PHRASES).format(a=a, b=b, op=op)
    return {"messages": [{"role": "system", "content": ARITHMETIC_SYSTEM},
                         {"role": "user", "content": question},
                         {"role": "assistant", "content": str(ans)}]}


def _syllables(r: random.Random) -> dict:
    parts = [r.choice(_SYLLABLES) for _ in range(r.randrange(2, 5))]
    return {"messages": [{"role": "system", "content": SYLLABLES_SYSTEM},
                         {"role": "user", "content": "Join the syllables: " + " + ".join(parts)},
                         {"role": "assistant", "content": "".join(parts)}]}


def generate_records(count: int, *, seed: int | None = None, kind: str = "arithmetic") -> list[dict]:
    """*count* chat records of *kind*; the same seed gives the same records (None: fresh random)."""
    if count < 0:
        raise ValueError("count must be >= 0")
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    r = random.Random(seed if seed is not None else secrets.randbits(64))
    if kind == "arithmetic":
        return [_arithmetic(r) for _ in range(count)]
    if kind == "arithmetic2":
        return [_arithmetic(r, 100) for _ in range(count)]
    return [_syllables(r) for _ in range(count)]


def write_jsonl_atomic(records: Iterable[dict], out_dir: Path, *, prefix: str = "autogen") -> Path:
    """Write *records* as ``out_dir/PREFIX_<utc timestamp>_<pid>_<rand>.jsonl``, atomically.

    Through core.atomic.atomic_write: a hidden temp name (ignored by the inbox), fsync,
    rename, fsync of the directory. A failed write leaves no file behind.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not prefix or "/" in prefix or prefix.startswith("."):
        raise ValueError(f"bad prefix {prefix!r}")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    name = f"{prefix}_{stamp}_{os.getpid()}_{secrets.token_hex(3)}"
    final = out_dir / f"{name}.jsonl"
    lines = [json.dumps(rec, ensure_ascii=False) + "\n" for rec in records]
    atomic_write(final, "".join(lines))      # hidden temp name, fsync, rename, fsync dir
    log.info("wrote %d records to %s", len(lines), final)
    return final
