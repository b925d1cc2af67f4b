from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.data import (IGNORE_INDEX, DataError, Example, chat_tokens_fallback,
                          chat_tokens_with_markers, has_generation_markers, load_examples,
                          split_eval)

PLAIN_CHATML = (  # the tiny template without generation markers
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

# Like Qwen3's: the last assistant turn gets an (empty) think block, earlier ones do not, so a
# conversation prefix does not render as a prefix of the whole.
THINK_LAST = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' and loop.last %}{{- '<think></think>' }}{%- endif %}"
    "{{- message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

CONV = [{"role": "system", "content": "You add numbers."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": "It is 8, of course."}]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def trained_text(tok, ex: Example) -> str:
    return tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX])


def check_labels(ex: Example) -> None:
    assert len(ex.input_ids) == len(ex.labels)
    assert ex.labels[0] == IGNORE_INDEX
    assert all(lab in (IGNORE_INDEX, tid) for tid, lab in zip(ex.input_ids, ex.labels))


@pytest.fixture()
def fresh_tok(tiny_base: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


def test_messages_multi_turn(tmp_path: Path, tiny_tokenizer) -> None:
    f = write_jsonl(tmp_path / "m.jsonl", [{"messages": CONV}, {"messages": CONV[:3]}])
    exs, rep = load_examples(f, tiny_tokenizer, max_length=512)
    assert rep.format == "messages" and rep.records == 2 and rep.examples == 2
    for ex in exs:
        check_labels(ex)
    assert trained_text(tiny_tokenizer, exs[0]) == "4<|im_end|>It is 8, of course.<|im_end|>"
    assert trained_text(tiny_tokenizer, exs[1]) == "4<|im_end|>"
    assert [e.line for e in exs] == [1, 2]
    assert rep.tokens == sum(len(e.input_ids) for e in exs)
    assert rep.trained_tokens == sum(e.num_trained for e in exs)
    # the whole example is the chat template's rendering
    assert tiny_tokenizer.decode(exs[0].input_ids) == tiny_tokenizer.apply_chat_template(CONV, tokenize=False)


def test_messages_weight_zero_not_trained(tmp_path: Path, tiny_tokenizer) -> None:
    conv = [dict(m) for m in CONV]
    conv[2]["weight"] = 0
    f = write_jsonl(tmp_path / "w.jsonl", [{"messages": conv}])
    (ex,), _ = load_examples(f, tiny_tokenizer, max_length=512)
    assert trained_text(tiny_tokenizer, ex) == "It is 8, of course.<|im_end|>"


def test_sharegpt(tmp_path: Path, tiny_tokenizer) -> None:
    rec = {"conversations": [{"from": "system", "value": "Be brief."},
                             {"from": "human", "value": "Name a colour."},
                             {"from": "gpt", "value": "Blue."},
                             {"from": "human", "value": "Another?"},
                             {"from": "gpt", "value": "Red."}]}
    f = write_jsonl(tmp_path / "s.jsonl", [rec])
    (ex,), rep = load_examples(f, tiny_tokenizer, max_length=512)
    assert rep.format == "sharegpt"
    check_labels(ex)
    assert trained_text(tiny_tokenizer, ex) == "Blue.<|im_end|>Red.<|im_end|>"
    assert tiny_tokenizer.decode(ex.input_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")


def test_prompt_completion_and_alpaca_as_chat(tmp_path: Path, tiny_tokenizer) -> None:
    f = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "What is 3 + 4?", "completion": "7"}])
    (ex,), rep = load_examples(f, tiny_tokenizer, max_length=512)
    assert rep.format == "prompt_completion"
    check_labels(ex)
    assert trained_text(tiny_tokenizer, ex) == "7<|im_end|>"
    assert tiny_tokenizer.decode(ex.input_ids) == "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n7<|im_end|>\n"

    f = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Add the numbers.", "input": "3 and 4", "output": "7"},
        {"instruction": "Say hello.", "input": "", "output": "Hello."}])
    exs, rep = load_examples(f, tiny_tokenizer, max_length=512)
    assert rep.format == "alpaca" and rep.examples == 2
    assert [trained_text(tiny_tokenizer, e) for e in exs] == ["7<|im_end|>", "Hello.<|im_end|>"]
    assert "user\nAdd the numbers.\n\n3 and 4<|im_end|>" in tiny_tokenizer.decode(exs[0].input_ids)
    assert "user\nSay hello.<|im_end|>" in tiny_tokenizer.decode(exs[1].input_ids)


def test_prompt_completion_without_chat_template(tmp_path: Path, fresh_tok) -> None:
    fresh_tok.chat_template = None
    f = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "The cat sat on", "completion": " the mat."}])
    (ex,), _ = load_examples(f, fresh_tok, max_length=512)
    check_labels(ex)
    assert trained_text(fresh_tok, ex) == " the mat.<|endoftext|>"
    assert fresh_tok.decode(ex.input_ids) == "The cat sat on the mat.<|endoftext|>"


def test_text(tmp_path: Path, tiny_tokenizer) -> None:
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "The old mill stood by the river."}])
    (ex,), rep = load_examples(f, tiny_tokenizer, max_length=512)
    assert rep.format == "text"
    check_labels(ex)
    # every text token is trained (the document-start token in front lets the first be predicted)
    assert trained_text(tiny_tokenizer, ex) == "The old mill stood by the river.<|endoftext|>"
    assert ex.num_trained == len(ex.input_ids) - 1


def test_truncate_drop_and_empty(tmp_path: Path, tiny_tokenizer) -> None:
    long_answer = "word " * 100
    recs = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
            {"messages": [{"role": "user", "content": "Talk"}, {"role": "assistant", "content": long_answer}]},
            # the prompt alone is longer than max_length: nothing left to train after truncation
            {"messages": [{"role": "user", "content": long_answer}, {"role": "assistant", "content": "ok"}]}]
    f = write_jsonl(tmp_path / "l.jsonl", recs)
    exs, rep = load_examples(f, tiny_tokenizer, max_length=48, truncation="truncate")
    counts = lambda r: tuple(r.count(k) for k in ("truncated", "dropped_empty", "dropped_too_long"))  # noqa: E731
    assert (rep.records, rep.examples, *counts(rep)) == (3, 2, 2, 1, 0)
    assert all(len(e.input_ids) <= 48 for e in exs)
    assert len(exs[1].input_ids) == 48 and exs[1].labels[-1] != IGNORE_INDEX
    assert [e.line for e in exs] == [1, 2]
    assert rep.reasons["truncated"]["lines"] == [2, 3] and rep.reasons["dropped_empty"]["lines"] == [3]

    exs, rep = load_examples(f, tiny_tokenizer, max_length=48, truncation="drop")
    assert (rep.records, rep.examples, *counts(rep)) == (3, 1, 0, 0, 2)
    assert json.loads(json.dumps(rep.to_json()))["reasons"]["dropped_too_long"] == {
        "count": 2, "lines": [2, 3], "tokens": rep.reasons["dropped_too_long"]["tokens"]}

    # keep_answer (the default): the long prompt is cut from the left, the answer "ok" is kept
    exs, rep = load_examples(f, tiny_tokenizer, max_length=48)
    assert (rep.records, rep.examples, *counts(rep)) == (3, 3, 2, 0, 0)
    assert trained_text(tiny_tokenizer, exs[2]) == "ok<|im_end|>"
    assert len(exs[2].input_ids) == 48


def test_invalid_records_skipped_and_invalid_file_rejected(tmp_path: Path, tiny_tokenizer) -> None:
    f = write_jsonl(tmp_path / "mixed.jsonl", [
        {"messages": CONV[:3]},
        {"messages": [{"role": "user", "content": "no answer"}]},  # no assistant: invalid
        {"messages": CONV}])
    exs, rep = load_examples(f, tiny_tokenizer, max_length=512)
    assert (rep.records, rep.examples, rep.bad_records) == (2, 2, 1)
    assert rep.reasons["no_assistant_message"] == {"count": 1, "lines": [2]}
    assert [e.line for e in exs] == [1, 3]

    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    with pytest.raises(DataError):
        load_examples(bad, tiny_tokenizer, max_length=512)


def test_fallback_mask_equals_generation_marker_mask(fresh_tok, tiny_tokenizer) -> None:
    assert has_generation_markers(tiny_tokenizer)
    convs = [CONV, CONV[1:3], CONV[:3], [{"role": "assistant", "content": "I start."},
                                         {"role": "user", "content": "ok"},
                                         {"role": "assistant", "content": "Done 123."}]]
    fresh_tok.chat_template = PLAIN_CHATML
    assert not has_generation_markers(fresh_tok)
    for conv in convs:
        assert chat_tokens_fallback(tiny_tokenizer, conv) == chat_tokens_with_markers(tiny_tokenizer, conv)
        assert chat_tokens_fallback(fresh_tok, conv) == chat_tokens_with_markers(tiny_tokenizer, conv)


def test_fallback_used_by_load_examples(tmp_path: Path, fresh_tok, tiny_tokenizer) -> None:
    f = write_jsonl(tmp_path / "m.jsonl", [{"messages": CONV}])
    (with_markers,), _ = load_examples(f, tiny_tokenizer, max_length=512)
    fresh_tok.chat_template = PLAIN_CHATML
    (fallback,), _ = load_examples(f, fresh_tok, max_length=512)
    assert fallback == with_markers


def test_fallback_with_inconsistent_prefix_template(fresh_tok) -> None:
    fresh_tok.chat_template = THINK_LAST
    ids, mask = chat_tokens_fallback(fresh_tok, CONV)
    trained = fresh_tok.decode([t for t, m in zip(ids, mask) if m])
    # turn 1 is found by content search; the last turn's span is what follows the generation
    # prompt, think block included (that is what the model produces after the prompt)
    assert trained == "4<|im_end|><think></think>It is 8, of course.<|im_end|>"


def test_split_eval() -> None:
    exs = [Example([1, 2], [-100, 2], i) for i in range(1, 21)]
    tr, ev = split_eval(exs, 0.1, seed=3)
    assert len(ev) == 2 and len(tr) == 18
    assert split_eval(exs, 0.1, seed=3) == (tr, ev)
    assert split_eval(exs, 0.1, seed=4) != (tr, ev)
    assert sorted(e.line for e in tr + ev) == list(range(1, 21))
    assert [e.line for e in tr] == sorted(e.line for e in tr)
    assert split_eval(exs, 0.0, seed=0) == (exs, [])
    tr, ev = split_eval(exs[:2], 0.01, seed=0)
    assert len(tr) == 1 and len(ev) == 1
    assert split_eval(exs[:1], 0.5, seed=0) == (exs[:1], [])
