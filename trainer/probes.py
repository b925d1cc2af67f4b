"""Probe prompts: the model's greedy answers to a few fixed prompts, at the base, during and
after every job (the dashboard's Samples, GET /api/samples; core/probetable.py keeps them).

Which prompts, in this order:

* ``probe_prompts``: a list of prompts, or a JSONL file (a path under the base dir) with one per
  line: a JSON string, ``{"prompt": ..., "reference": ...}``, or a chat / prompt-completion /
  alpaca record whose last assistant turn is the reference answer. A file that is missing or
  unusable is a warning at job time; the other probes still run;
* ``probe_retention_examples`` examples of each retention set (trainer/retention_eval.py) of the
  adapter's last ``retention_eval_datasets`` datasets, newest first: an example's tokens up to its
  first labelled token are the prompt, that labelled run is the reference answer. The first
  examples of a set (its order is a seeded shuffle of the file), so always the same ones.

When: ``probe_base`` before the first step, with the adapter disabled: the base's own answers
(phase ``base``, step 0), for the prompts that have none on this base yet (state.db says which);
``probe_step`` every ``probe_every_steps`` (0: off, the default); ``probe_end`` after the retention
eval, before the adapter is published: the base's answers for the prompts new since (this job's
retention set), then the adapter's (phase ``end``), which also go into the snapshot's
snapshot.json (``probes``).

How: one prompt at a time (no padding, so an answer does not depend on the other prompts),
greedy, at most ``probe_max_new_tokens`` new tokens, under no_grad in eval mode (back to train
mode after), every RNG state restored after (an exact resume stays exact), within ``probe_max_s``
per round: the prompts left are skipped and a warning says how many. A probe never fails a job.
"""
from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.paths import Layout, resolve_under
from core.probetable import CONFIG_SOURCE, recorded_base
from core.records import detect_format
from trainer.checkpoint import capture_rng_state, restore_rng_state
from trainer.data import IGNORE_INDEX, _chat_template, _render, _special_prefix, record_to_messages
from trainer.retention_eval import load_set, set_path
from trainer.tokencache import tokenizer_hash

log = logging.getLogger("trainer.recipe")
MAX_FILE_PROMPTS = 1000       # a probe_prompts file is read up to this many prompts


@dataclass(frozen=True)
class Probe:
    prompt: str                 # as shown
    source: str                 # "config", or the dataset whose retention set it comes from
    ids: tuple[int, ...]        # the tokens the model continues
    reference: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.source, self.prompt


def split_example(input_ids: Any, labels: Any) -> tuple[list[int], list[int]] | None:
    """(prompt tokens, reference tokens) of a tokenized example: the tokens before its first
    labelled one, and that run of labelled tokens; None without a prompt or a label."""
    labels = list(labels)
    first = next((i for i, v in enumerate(labels) if v != IGNORE_INDEX), None)
    if not first:
        return None
    end = first
    while end < len(labels) and labels[end] != IGNORE_INDEX:
        end += 1
    return [int(t) for t in input_ids[:first]], [int(t) for t in input_ids[first:end]]


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The prompt as the model is trained to continue it: the chat template with the generation
    prompt, or (no template) the text after the tokenizer's own prefix."""
    if _chat_template(tokenizer):
        enc = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                            return_dict=True)
        return [int(t) for t in enc["input_ids"]]
    text = "\n\n".join(m["content"] for m in messages)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return _special_prefix(tokenizer) + [int(t) for t in ids]


class PromptText:
    """A rendered prompt shown as its turns' text (``shown``) when the chat template made it from
    one user turn, or a system and a user turn; else as its decoded text without special tokens."""

    MARKS = ("\u2063probe-a\u2063", "\u2063probe-b\u2063")
    SHAPES = (("user",), ("system", "user"))

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.patterns: list[tuple[tuple[str, ...], re.Pattern[str]]] = []
        if not _chat_template(tokenizer):
            return
        for roles in self.SHAPES:
            try:
                text = _render(tokenizer, [{"role": r, "content": m} for r, m in zip(roles, self.MARKS)],
                               add_generation_prompt=True)
            except Exception:  # noqa: BLE001 - a template that refuses this shape
                continue
            pieces = re.split("|".join(map(re.escape, self.MARKS[:len(roles)])), text)
            if len(pieces) == len(roles) + 1:
                self.patterns.append((roles, re.compile("(.*?)".join(map(re.escape, pieces)), re.DOTALL)))

    def __call__(self, ids: list[int]) -> str:
        text = self.tok.decode(ids, skip_special_tokens=False)
        for roles, pattern in self.patterns:
            m = pattern.fullmatch(text)
            if m:
                return shown([{"role": r, "content": c.strip()} for r, c in zip(roles, m.groups())])
        return self.tok.decode(ids, skip_special_tokens=True).strip()


def parse_prompt(rec: Any) -> tuple[list[dict[str, str]], str | None] | None:
    """(messages, reference) of one probe_prompts entry; None when it is no prompt."""
    if isinstance(rec, str):
        return ([{"role": "user", "content": rec}], None) if rec.strip() else None
    if not isinstance(rec, dict):
        return None
    if isinstance(rec.get("prompt"), str) and rec["prompt"].strip():
        ref = rec.get("reference", rec.get("completion"))
        return [{"role": "user", "content": rec["prompt"]}], ref if isinstance(ref, str) else None
    fmt = detect_format(rec)
    if fmt not in ("messages", "sharegpt", "alpaca"):
        return None
    try:
        msgs, _ = record_to_messages(rec, fmt)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    ref = msgs.pop()["content"] if msgs and msgs[-1]["role"] == "assistant" else None
    return (msgs, ref) if any(m["role"] == "user" for m in msgs) else None


def shown(messages: list[dict[str, str]]) -> str:
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def config_probes(value: Any, home: Path, tokenizer: Any) -> tuple[list[Probe], str | None]:
    """The probes of ``probe_prompts`` and a warning when its file cannot be used."""
    if not value:
        return [], None
    warning = None
    entries: list[Any] = list(value) if isinstance(value, list) else []
    if isinstance(value, str):
        path = resolve_under(home, value)
        try:
            with open(path, encoding="utf-8") as fh:           # type: ignore[arg-type]
                for n, line in enumerate(fh, 1):
                    if line.strip() and len(entries) < MAX_FILE_PROMPTS:
                        try:
                            entries.append(json.loads(line))
                        except ValueError:
                            warning = warning or f"probe_prompts {value}: line {n} is not JSON (skipped)"
        except (OSError, UnicodeDecodeError) as exc:
            return [], f"probe_prompts {value}: cannot be read ({getattr(exc, 'strerror', None) or exc}); " \
                       "no configured probes this job"
    probes = []
    for rec in entries:
        parsed = parse_prompt(rec)
        if parsed is None:
            warning = warning or f"probe_prompts: an entry is no prompt ({str(rec)[:60]!r}; skipped)"
            continue
        msgs, ref = parsed
        probes.append(Probe(shown(msgs), CONFIG_SOURCE, tuple(chat_ids(tokenizer, msgs)), ref))
    return probes, warning


def retention_probes(layout: Layout, job_id: int, n: int, tokenizer: Any, text: PromptText) -> list[Probe]:
    """The first *n* usable examples of a job's retention set as probes ([] when it has none,
    or was made with another tokenizer)."""
    loaded = load_set(set_path(layout, job_id))
    if loaded is None or n <= 0:
        return []
    meta, examples = loaded
    if meta.get("tokenizer") != tokenizer_hash(tokenizer):
        return []
    out: list[Probe] = []
    seen: set[str] = set()
    for ex in examples:
        parts = split_example(ex.input_ids, ex.labels)
        if parts is None:
            continue
        prompt = text(parts[0])
        if not prompt or prompt in seen:
            continue
        seen.add(prompt)
        out.append(Probe(prompt, str(meta.get("name") or f"job {job_id}"), tuple(parts[0]),
                         tokenizer.decode(parts[1], skip_special_tokens=True).strip()))
        if len(out) == n:
            break
    return out


class ProbeMixin:
    """The probe side of a run (trainer/recipe.py's ``_RecipeRun``): reads its cfg, job, layout,
    tokenizer, model, device, fingerprint, step; sets ``end_probes`` (the snapshot's)."""

    end_probes: dict[str, Any] | None = None

    def _probe_list(self) -> list[Probe]:
        """Configured prompts first, then the retention sets' of the newest datasets first."""
        if getattr(self, "_probe_cfg", None) is None:
            self._probe_text = PromptText(self.tokenizer)
            self._probe_sets: dict[int, list[Probe]] = {}
            self._probe_base_done: set[tuple[str, str]] = set()
            self._probe_cfg, warning = config_probes(self.cfg.get("probe_prompts"), Path(self.job.home),
                                                     self.tokenizer)
            if warning:
                self.note(warning, "warning")
        out, keys = list(self._probe_cfg), {p.key for p in self._probe_cfg}
        n = int(self.cfg.get("probe_retention_examples") or 0)
        k = int(self.cfg.get("retention_eval_datasets") or 0)
        if n > 0 and k > 0:
            done = [d.get("job_id") for d in (self.parent_state or {}).get("datasets") or []]
            ids = [j for j in dict.fromkeys(done + [self.job.job_id]) if isinstance(j, int)]
            for j in reversed(ids[-k:]):
                if j not in self._probe_sets and set_path(self.layout, j).is_file():
                    self._probe_sets[j] = retention_probes(self.layout, j, n, self.tokenizer,
                                                           self._probe_text)
                out += [p for p in self._probe_sets.get(j, []) if p.key not in keys]
                keys |= {p.key for p in self._probe_sets.get(j, [])}
        return out

    def probe_base(self) -> None:
        """The base's own answers (adapter disabled) for the probes it has none for yet."""
        if not self.ranks.is_main:      # rank 0 alone probes and records
            return
        try:
            probes = self._probe_list()
            if not probes:
                return
            done = recorded_base(self.layout.state_db, self.fingerprint) | self._probe_base_done
            todo = [p for p in probes if p.key not in done]
            if todo:
                with self.model.disable_adapter():
                    self._probe_round("base", todo)
        except Exception as exc:  # noqa: BLE001 - a probe never fails a job
            self.note(f"probes at the base failed ({type(exc).__name__}: {exc})", "warning")

    def probe_step(self) -> None:
        every = int(self.cfg.get("probe_every_steps") or 0)
        if every > 0 and self.ranks.is_main and self.step % every == 0:
            try:
                self._probe_round("step", self._probe_list())
            except Exception as exc:  # noqa: BLE001
                self.note(f"probes at step {self.step} failed ({type(exc).__name__}: {exc})", "warning")

    def probe_end(self) -> None:
        """The base's answers for the prompts new since the start, then the adapter's."""
        self.probe_base()
        try:
            self.end_probes = self._probe_round("end", self._probe_list())
        except Exception as exc:  # noqa: BLE001
            self.note(f"probes after the job failed ({type(exc).__name__}: {exc})", "warning")

    def _probe_round(self, phase: str, probes: list[Probe]) -> dict[str, Any] | None:
        """Answer *probes* within probe_max_s and emit one ``probe`` event; the RNG and the
        train/eval mode are left as they were."""
        if not probes:
            return None
        budget = float(self.cfg.get("probe_max_s") or 60.0)
        t0, answers = time.monotonic(), []
        rng, training = capture_rng_state(), self.model.training
        self.model.eval()
        try:
            for p in probes:            # at least one, then while the budget lasts
                answers.append({"prompt": p.prompt, "answer": self._generate(p.ids), "reference": p.reference,
                                "source": p.source})
                if time.monotonic() - t0 > budget:
                    break
        finally:
            self.model.train(training)
            restore_rng_state(rng)
        seconds = round(time.monotonic() - t0, 3)
        if len(answers) < len(probes):
            self.note(f"probes ({phase}): {len(probes) - len(answers)} of {len(probes)} prompts skipped, the "
                      f"time budget (probe_max_s {budget:g}) was spent", "warning")
        if phase == "base":
            self._probe_base_done |= {(a["source"], a["prompt"]) for a in answers}
        ev = {"step": 0 if phase == "base" else self.step, "job_id": self.job.job_id, "phase": phase,
              "seconds": seconds, "probes": answers}
        log.info("probes (%s, step %d): %d answers in %.2f s", phase, ev["step"], len(answers), seconds)
        self.emit("probe", **ev)
        return ev

    @torch.no_grad()
    def _generate(self, ids: tuple[int, ...]) -> str:
        """One greedy answer (the prompt cut from the left to max_length)."""
        x = torch.tensor([list(ids)[-int(self.cfg["max_length"]):]], dtype=torch.long, device=self.device)
        with self._autocast():
            out = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                                      max_new_tokens=int(self.cfg.get("probe_max_new_tokens") or 48),
                                      use_cache=True, pad_token_id=self.pad_id)
        return self.tokenizer.decode(out[0, x.shape[1]:].tolist(), skip_special_tokens=True)
