"""A sweep of malformed data files through the trainer's own loading code (data.prepare / load_reference_texts,
exactly what a run does before training): each must end in a DataError (exit 65) that names the file and,
where the problem sits in one row, the row or line. No other exception type, no hang. A few of these also run
through real pods in tests/e2e/test_bad_inputs.py.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/trainer/test_bad_data_sweep.py -q
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from kubetune_api.constants import ExitCode
from kubetune_api.finetunejob import DatasetSpec
from kubetune_trainer import data
from kubetune_trainer.errors import DataError

U = "user"
A = "assistant"


def msgs(*turns) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


OK_CHAT = msgs((U, "hi"), (A, "hello"))


def jsonl(*rows) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


# name -> (format, file name, content, words the message must contain)
CASES: dict[str, tuple[str, str, bytes, str]] = {
    "empty-file": ("text", "d.jsonl", b"", "no examples"),
    "blank-lines-only": ("text", "d.txt", b"\n  \n\n", "no examples"),
    "invalid-json-line": ("text", "d.jsonl", jsonl({"text": "a"}, "{not json"), "line 2 is not valid JSON"),
    "json-list-line": ("text", "d.jsonl", jsonl({"text": "a"}, "[1, 2]"), "line 2 is a JSON list"),
    "json-string-line": ("text", "d.jsonl", jsonl('"just text"'), "line 1 is a JSON str"),
    "utf8-bom": ("text", "d.jsonl", b"\xef\xbb\xbf" + jsonl({"text": "a"}), "line 1 is not valid JSON"),
    "not-utf8": ("text", "d.jsonl", b'{"text": "\xff\xfe"}\n', "not UTF-8"),
    "null-text": ("text", "d.jsonl", jsonl({"text": "a"}, {"text": None}), "first at row 2"),
    "number-text": ("text", "d.jsonl", jsonl({"text": 5}), "row 1 should be a non-empty string"),
    "mixed-types": ("text", "d.jsonl", jsonl({"text": "a"}, {"text": 5}), "string in row 1, number in row 2"),
    "empty-string": ("text", "d.jsonl", jsonl({"text": "a"}, {"text": ""}), "row 2 should be a non-empty string"),
    "missing-text-column": ("text", "d.jsonl", jsonl({"body": "a"}), "missing column 'text'"),
    "chat-no-assistant": ("chat", "c.jsonl", jsonl(OK_CHAT, msgs((U, "q"))), "row 2 has no assistant turn"),
    "chat-system-user-only": ("chat", "c.jsonl", jsonl(msgs(("system", "s"), (U, "q")), OK_CHAT),
                              "row 1 has no assistant turn"),
    "chat-empty-list": ("chat", "c.jsonl", jsonl(OK_CHAT, {"messages": []}), "row 2 should be a non-empty list"),
    "chat-missing-content": ("chat", "c.jsonl", jsonl({"messages": [{"role": "user"}]}), "row 1 should be"),
    "chat-content-number": ("chat", "c.jsonl", jsonl(OK_CHAT, msgs((U, 5), (A, "a"))),
                            "row 2, message 1: role and content must be strings"),
    "chat-role-number": ("chat", "c.jsonl", jsonl({"messages": [{"role": 1, "content": "x"}]}),
                         "row 1, message 1: role and content must be strings"),
    "chat-messages-object": ("chat", "c.jsonl", jsonl({"messages": {"role": U, "content": "x"}}),
                             "row 1 should be a non-empty list"),
    "chat-csv-cell-not-json": ("chat", "c.csv", b'messages\n"not a list"\n', "not a JSON list of messages"),
    "prompt-completion-missing": ("prompt_completion", "p.jsonl", jsonl({"prompt": "a"}),
                                  "missing column 'completion'"),
    "prompt-empty": ("prompt_completion", "p.jsonl", jsonl({"prompt": "", "completion": "b"}),
                     "column 'prompt' row 1 should be a non-empty string"),
    "preference-rejected-null": ("preference", "r.jsonl",
                                 jsonl({"prompt": "p", "chosen": "c", "rejected": "r"},
                                       {"prompt": "p", "chosen": "c", "rejected": None}),
                                 "column 'rejected' is empty in 1 row(s), first at row 2"),
    "unpaired-label-maybe": ("unpaired_preference", "u.jsonl",
                             jsonl({"prompt": "p", "completion": "c", "label": "maybe"}),
                             "column 'label' row 1 should be true or false"),
    "json-not-a-list": ("text", "d.json", b'{"a": 1}', "expected a JSON list of objects"),
    "json-two-lists": ("text", "d.json", b'{"a": [{"text": "x"}], "b": [{"text": "y"}]}',
                       "exactly one such list"),
    "json-invalid": ("text", "d.json", b'[{"text": "a"},', "not valid JSON"),
    "csv-missing-column": ("prompt_completion", "p.csv", b"prompt,answer\nq,a\n", "missing column 'completion'"),
    "parquet-corrupt": ("text", "d.parquet", b"PAR1 this is not parquet", "cannot read .parquet file"),
    "txt-for-chat": ("chat", "c.txt", b"hello\n", "missing column 'messages'"),
    "unsupported-suffix": ("text", "d.xlsx", b"", "unsupported file type .xlsx"),
}


def _spec(fmt: str, uri: str) -> DatasetSpec:
    return DatasetSpec.model_validate({"format": fmt, "train": [{"uri": uri}]})


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_data_file_is_a_data_error_naming_file_and_row(tmp_path, case):
    fmt, fname, content, words = CASES[case]
    path = tmp_path / fname
    path.write_bytes(content)
    uri = f"s3://bucket/sweep/{fname}"
    started = time.monotonic()
    with pytest.raises(DataError) as e:
        data.prepare(_spec(fmt, uri), [data.Source(uri, path)], seed=1)
    assert time.monotonic() - started < 10, "no slow path"
    assert e.value.exit_code == ExitCode.DATA_ERROR
    assert words in e.value.message, e.value.message
    assert e.value.field in (uri, "spec.dataset.train"), e.value.field
    if e.value.field == "spec.dataset.train":
        assert uri in e.value.message, "a problem of the whole dataset still lists the file"


def test_a_folder_without_data_files_names_the_folder(tmp_path):
    (tmp_path / "README.md").write_text("x")
    with pytest.raises(DataError) as e:
        data.prepare(_spec("text", "s3://bucket/folder/"), [data.Source("s3://bucket/folder/", tmp_path)])
    assert e.value.field == "s3://bucket/folder/" and "README.md" in e.value.message


def test_a_bad_conversation_far_past_the_sampled_rows_is_found(tmp_path):
    f = tmp_path / "big.jsonl"
    f.write_bytes(jsonl(*([OK_CHAT] * 1500), msgs((U, "q")), OK_CHAT))
    with pytest.raises(DataError) as e:
        data.prepare(_spec("chat", "s3://x/big.jsonl"), [data.Source("s3://x/big.jsonl", f)])
    assert e.value.field == "s3://x/big.jsonl" and "row 1501 has no assistant turn" in e.value.message


def test_a_malformed_eval_file_is_named_as_the_eval_file(tmp_path):
    good, bad = tmp_path / "t.jsonl", tmp_path / "e.jsonl"
    good.write_bytes(jsonl(OK_CHAT, OK_CHAT))
    bad.write_bytes(jsonl(msgs((U, "only a question"))))
    with pytest.raises(DataError) as e:
        data.prepare(_spec("chat", "s3://x/t.jsonl"), [data.Source("s3://x/t.jsonl", good)],
                     [data.Source("s3://x/e.jsonl", bad)])
    assert e.value.field == "s3://x/e.jsonl" and "row 1 has no assistant turn" in e.value.message


def test_an_empty_reference_file_is_named(tmp_path):
    ref = tmp_path / "general.jsonl"
    ref.write_bytes(b"")
    with pytest.raises(DataError) as e:
        data.load_reference_texts([data.Source("s3://x/general.jsonl", ref)], 10)
    assert e.value.field == "spec.evaluation.reference" and "s3://x/general.jsonl" in e.value.message


def test_the_sweep_is_large_enough():
    assert len(CASES) + 4 >= 30
