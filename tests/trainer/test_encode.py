"""The batched encoder (trainer/encode.py): the same tokens and masks as the per-record reference,
truncation that keeps the answer, text chunking, and a report that accounts for every line."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from test_data import CONV, PLAIN_CHATML, THINK_LAST, fresh_tok, trained_text, write_jsonl  # noqa: F401
from trainer import encode
from trainer.data import IGNORE_INDEX, DataReport, load_examples, tokenize_record

LONG = " ".join(f"word{i % 37}" for i in range(300))

RECORDS = {
    "messages": [{"messages": CONV}, {"messages": CONV[1:3]}, {"messages": CONV[:3]},
                 {"messages": [{"role": "assistant", "content": "I start."}, {"role": "user", "content": "ok"},
                               {"role": "assistant", "content": "Done 123."}]},
                 {"messages": [{"role": "user", "content": "  spaced  "}, {"role": "assistant", "content": " a \n"}]},
                 {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "no", "weight": 0},
                               {"role": "user", "content": "again"}, {"role": "assistant", "content": "yes"}]}],
    "sharegpt": [{"system": "Be brief.", "conversations": [{"from": "human", "value": "Hi"},
                                                          {"from": "gpt", "value": "Hello there."}]}],
    "prompt_completion": [{"prompt": "The cat sat on", "completion": " the mat."}],
    "alpaca": [{"instruction": "Add.", "input": "2 and 3", "output": "5"}, {"instruction": "Say hi.", "output": "hi"}],
    "text": [{"text": "The old mill stood by the river."}],
}


def _reference(tok, record: dict, fmt: str) -> tuple[list[int], list[int]]:
    ids, labels = tokenize_record(record, fmt, tok)
    return ids, labels


@pytest.mark.parametrize("template", ["markers", "plain", "think_last", "none"])
@pytest.mark.parametrize("fmt", list(RECORDS))
def test_batched_encoding_equals_the_reference(tmp_path: Path, fresh_tok, fmt: str, template: str) -> None:
    if template == "plain":
        fresh_tok.chat_template = PLAIN_CHATML
    elif template == "think_last":
        fresh_tok.chat_template = THINK_LAST
    elif template == "none":
        if fmt in ("messages", "sharegpt"):
            pytest.skip("chat formats need a template")
        fresh_tok.chat_template = None
    f = write_jsonl(tmp_path / "d.jsonl", RECORDS[fmt])
    exs, rep = load_examples(f, fresh_tok, max_length=4096)
    assert rep.format == fmt and rep.records == len(RECORDS[fmt]) == len(exs)
    for ex, rec in zip(exs, RECORDS[fmt]):
        ids, labels = _reference(fresh_tok, rec, fmt)
        assert ex.input_ids == ids
        assert ex.labels == labels, (fmt, template, trained_text(fresh_tok, ex))


def test_one_pass_search_is_checked_against_the_reference(tmp_path: Path, fresh_tok) -> None:
    """A template that changes the content (here: upper-cases it) cannot be searched: the encoder
    notices on the first records and uses the per-turn reference for the file."""
    fresh_tok.chat_template = PLAIN_CHATML.replace("message['content']", "message['content'] | upper")
    f = write_jsonl(tmp_path / "d.jsonl", [{"messages": CONV}] * 3)
    exs, _ = load_examples(f, fresh_tok, max_length=4096)
    ids, labels = _reference(fresh_tok, {"messages": CONV}, "messages")
    assert all(e.input_ids == ids and e.labels == labels for e in exs)
    assert trained_text(fresh_tok, exs[0]) == "4<|im_end|>IT IS 8, OF COURSE.<|im_end|>"


def test_keep_answer_cuts_the_prompt_from_the_left_and_keeps_the_system_turn(tmp_path: Path,
                                                                               tiny_tokenizer) -> None:
    rec = {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": LONG},
                        {"role": "assistant", "content": "Fine answer."}]}
    f = write_jsonl(tmp_path / "d.jsonl", [rec])
    full_ids, _ = tokenize_record(rec, "messages", tiny_tokenizer)
    (ex,), rep = load_examples(f, tiny_tokenizer, max_length=64)
    assert len(ex.input_ids) == 64
    text = tiny_tokenizer.decode(ex.input_ids)
    assert text.startswith("<|im_start|>system\nYou are terse.<|im_end|>")
    assert text.endswith("<|im_start|>assistant\nFine answer.<|im_end|>\n")
    assert trained_text(tiny_tokenizer, ex) == "Fine answer.<|im_end|>"
    assert rep.reasons["truncated"] == {"count": 1, "lines": [1], "tokens_cut": len(full_ids) - 64,
                                        "answer_tokens_cut": 0}
    # truncate: the end goes, and the answer with it
    (_, rep_t) = load_examples(f, tiny_tokenizer, max_length=64, truncation="truncate")
    assert rep_t.examples == 0 and rep_t.reasons["dropped_empty"]["lines"] == [1]


def test_keep_answer_multi_turn_keeps_the_last_answer_whole(tiny_tokenizer) -> None:
    """Cutting from the left may take earlier turns (counted); the last answer stays whole, and
    when it alone is too long its end is cut and counted."""
    rep = DataReport(format="messages")
    ids = np.arange(100, dtype=np.int32)
    mask = np.zeros(100, np.uint8)
    mask[20:30] = 1     # an earlier answer
    mask[80:100] = 1    # the last answer
    (out_ids, out_mask), = encode.fit(ids, mask, keep=5, max_length=60, policy="keep_answer", chunk=False,
                                      line=7, report=rep)
    assert out_ids.tolist() == list(range(5)) + list(range(45, 100))
    assert out_mask[5] == 0 and out_mask[-20:].all() and out_mask.sum() == 20
    assert rep.reasons["truncated"] == {"count": 1, "lines": [7], "tokens_cut": 40, "answer_tokens_cut": 10}
    (out_ids, out_mask), = encode.fit(ids, mask, keep=5, max_length=20, policy="keep_answer", chunk=False,
                                      line=8, report=rep)
    assert out_ids.tolist() == list(range(5)) + list(range(80, 95))
    assert out_mask[5] == 0 and out_mask[6:].all()
    assert rep.reasons["truncated"]["lines"] == [7, 8]


def test_long_text_is_split_into_chunks_not_cut(tmp_path: Path, tiny_tokenizer) -> None:
    rec = {"text": LONG}
    f = write_jsonl(tmp_path / "t.jsonl", [rec, {"text": "short one"}])
    full_ids, full_labels = tokenize_record(rec, "text", tiny_tokenizer)
    exs, rep = load_examples(f, tiny_tokenizer, max_length=50)
    pieces = [e for e in exs if e.line == 1]
    assert len(pieces) == -(-(len(full_ids) - 1) // 49) and all(len(e.input_ids) <= 50 for e in pieces)
    # overlapping by one token: together they are the document, and every token but the first is
    # trained exactly once
    joined = pieces[0].input_ids + [t for e in pieces[1:] for t in e.input_ids[1:]]
    assert joined == full_ids
    trained = [t for e in pieces for t, lab in zip(e.input_ids, e.labels) if lab != IGNORE_INDEX]
    assert trained == [t for t, lab in zip(full_ids, full_labels) if lab != IGNORE_INDEX]
    assert rep.reasons["chunked"] == {"count": 1, "lines": [1], "pieces": len(pieces)}
    assert "truncated" not in rep.reasons and rep.examples == len(pieces) + 1


def test_every_line_is_accounted_for(tmp_path: Path, tiny_tokenizer) -> None:
    good = {"messages": CONV[1:3]}
    lines = [json.dumps(good),                                                        # 1
             json.dumps({"messages": [{"role": "system", "content": "s"},
                                      {"role": "assistant", "content": "hi"}]}),     # 2 no user turn
             "{not json",                                                              # 3
             json.dumps(good),                                                        # 4 duplicate of 1
             json.dumps({**good, "id": 7, "source": "x"}),                             # 5 unknown keys
             "",                                                                       # 6 blank: not a record
             json.dumps({"messages": [{"role": "user", "content": "q"}]}),             # 7 no assistant
             json.dumps([1, 2]),                                                       # 8
             json.dumps({"prompt": "p", "completion": "c"})]                           # 9 other format
    f = tmp_path / "mixed.jsonl"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    exs, rep = load_examples(f, tiny_tokenizer, max_length=512)
    assert [e.line for e in exs] == [1, 2, 4, 5]
    r = rep.reasons
    assert r["no_user_turn"]["lines"] == [2] and r["duplicate"]["lines"] == [4]
    assert r["unknown_keys"] == {"count": 1, "lines": [5], "keys": ["id", "source"]}
    assert r["invalid_json"]["lines"] == [3] and r["no_assistant_message"]["lines"] == [7]
    assert r["not_an_object"]["lines"] == [8] and r["mixed_format"]["lines"] == [9]
    assert rep.records == 4 and rep.bad_records == 4
    js = rep.to_json()
    assert js["bad_records"] == 4 and js["tokens"] == sum(len(e.input_ids) for e in exs)
    assert DataReport.from_json(json.loads(json.dumps(js))).reasons == rep.reasons


def test_reason_lines_are_capped_but_counts_are_not(tmp_path: Path, tiny_tokenizer) -> None:
    f = write_jsonl(tmp_path / "d.jsonl", [{"messages": CONV[1:3]}] * 50)
    _, rep = load_examples(f, tiny_tokenizer, max_length=512)
    assert rep.reasons["duplicate"]["count"] == 49 and rep.reasons["duplicate"]["lines"] == list(range(2, 22))


def test_a_system_turn_too_long_to_keep_is_cut_too_not_the_answer(tiny_tokenizer) -> None:
    rep = DataReport(format="messages")
    ids = np.arange(100, dtype=np.int32)
    mask = np.zeros(100, np.uint8)
    mask[90:] = 1
    (out_ids, out_mask), = encode.fit(ids, mask, keep=60, max_length=50, policy="keep_answer", chunk=False,
                                      line=3, report=rep)
    assert out_ids.tolist() == list(range(50, 100)) and out_mask[-10:].all()


@pytest.mark.parametrize("fmt", ["prompt_completion", "alpaca"])
def test_keep_answer_for_prompt_formats_with_and_without_a_template(tmp_path: Path, fresh_tok, fmt: str) -> None:
    rec = ({"prompt": LONG, "completion": " the end."} if fmt == "prompt_completion"
           else {"instruction": LONG, "output": "the end."})
    f = write_jsonl(tmp_path / "p.jsonl", [rec])
    for template in (fresh_tok.chat_template, None):
        fresh_tok.chat_template = template
        (ex,), rep = load_examples(f, fresh_tok, max_length=40)
        assert len(ex.input_ids) == 40 and rep.reasons["truncated"]["answer_tokens_cut"] == 0
        assert trained_text(fresh_tok, ex).endswith(("the end.<|im_end|>", "the end.<|endoftext|>"))
        ids, _ = tokenize_record(rec, fmt, fresh_tok)
        assert ex.input_ids[-12:] == ids[-12:]    # the end (the answer) whole, the prompt cut from the left
