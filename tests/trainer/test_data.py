"""data.py: every file type loads into TRL's column layout; every fixable data problem is a DataError naming the
file and the column; the eval split is deterministic.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/trainer/test_data.py -q
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from kubetune_api.finetunejob import DatasetSpec
from kubetune_trainer import data
from kubetune_trainer.errors import DataError


def spec(fmt: str, **kw) -> DatasetSpec:
    return DatasetSpec.model_validate({"format": fmt, "train": [{"uri": "file:///data/train.jsonl"}], **kw})


def src(path: Path) -> data.Source:
    return data.Source(f"file://{path}", path)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name,fmt,columns", [
    ("chat", "chat", ["messages"]),
    ("prompt_completion", "prompt_completion", ["prompt", "completion"]),
    ("preference", "preference", ["prompt", "chosen", "rejected"]),
    ("unpaired_preference", "unpaired_preference", ["prompt", "completion", "label"]),
    ("prompt_only", "prompt_only", ["prompt", "answer"]),  # extra columns reach the reward functions
    ("domain", "text", ["text"]),
])
def test_each_format_comes_out_in_trls_columns(tiny_data, name, fmt, columns):
    p = data.prepare(spec(fmt), [src(tiny_data[name])], seed=1)
    assert sorted(p.train.column_names) == sorted(columns)
    assert len(p.train) + len(p.eval) == 400 and len(p.eval) == 40  # default evalFraction 0.1
    assert p.eval_source == "fraction"
    assert p.train_files[0]["sha256"] == hashlib.sha256(tiny_data[name].read_bytes()).hexdigest()
    if fmt == "unpaired_preference":
        assert p.train.features["label"].dtype == "bool"


def test_json_parquet_csv_and_txt_files_load(tmp_path):
    import pandas as pd

    rows = [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(6)]
    (tmp_path / "a.json").write_text(json.dumps(rows[:2]))
    pd.DataFrame(rows[2:4]).to_parquet(tmp_path / "b.parquet")
    pd.DataFrame(rows[4:]).to_csv(tmp_path / "c.csv", index=False)
    (tmp_path / "_COMPLETE").write_text("{}")  # storage markers are not data
    p = data.prepare(spec("prompt_completion", evalFraction=0), [src(tmp_path)], seed=0)
    assert sorted(p.train["prompt"]) == sorted(r["prompt"] for r in rows)
    assert [f["uri"].rsplit("/", 1)[1] for f in p.train_files] == ["a.json", "b.parquet", "c.csv"]
    assert p.eval is None

    txt = tmp_path / "lines.txt"
    txt.write_text("first line\n\nsecond line\n")
    t = data.prepare(spec("text", evalFraction=0), [src(txt)])
    assert sorted(t.train["text"]) == ["first line", "second line"]


def test_csv_chat_cells_holding_json_are_parsed(tmp_path):
    import pandas as pd

    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    pd.DataFrame({"messages": [json.dumps(msgs)] * 3}).to_csv(tmp_path / "chat.csv", index=False)
    p = data.prepare(spec("chat", evalFraction=0), [src(tmp_path / "chat.csv")])
    assert p.train[0]["messages"] == msgs


def test_column_mapping_renames_to_the_formats_names(tmp_path):
    f = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"q{i}", "good": "y", "bad": "n"} for i in range(5)])
    p = data.prepare(spec("preference", evalFraction=0, columns={"prompt": "question", "chosen": "good",
                                                                  "rejected": "bad"}), [src(f)])
    assert sorted(p.train.column_names) == ["chosen", "prompt", "rejected"]
    assert p.train[0]["chosen"] == "y"


def test_missing_column_names_file_column_and_what_was_found(tiny_data):
    with pytest.raises(DataError) as e:
        data.prepare(spec("preference"), [src(tiny_data["chat"])])
    msg = str(e.value)
    assert e.value.field == f"file://{tiny_data['chat']}"
    assert "'chosen'" in msg and "'rejected'" in msg and "['messages']" in msg and "preference" in msg


def test_missing_mapped_column_says_it_came_from_the_mapping(tiny_data):
    with pytest.raises(DataError) as e:
        data.prepare(spec("prompt_completion", columns={"prompt": "question"}), [src(tiny_data["prompt_completion"])])
    assert "'question' (mapped to prompt by spec.dataset.columns.prompt)" in str(e.value)
    assert "columns found: ['prompt', 'completion']" in str(e.value)


def test_file_in_a_folder_is_named_by_its_uri(tmp_path):
    (tmp_path / "ok.jsonl").write_text(json.dumps({"text": "fine"}) + "\n")
    write_jsonl(tmp_path / "bad.jsonl", [{"body": "no text column"}])
    with pytest.raises(DataError) as e:
        data.prepare(spec("text"), [data.Source("s3://bucket/corpus/", tmp_path)])
    assert e.value.field == "s3://bucket/corpus/bad.jsonl"


@pytest.mark.parametrize("content,expected", [
    ("", "no examples"),
    ('{"text": "a"}\n{not json}\n', "line 2 is not valid JSON"),
    ('{"text": "a"}\n{"text": null}\n', "column 'text' is empty in 1 row(s), first at row 2"),
    ('{"text": "a"}\n{"text": 5}\n', "column 'text' mixes value types: string in row 1, number in row 2"),
    ('{"text": 5}\n', "column 'text' row 1 should be a non-empty string"),
    ('[1, 2]\n', "line 1 is a JSON list"),
])
def test_malformed_data_is_a_data_error(tmp_path, content, expected):
    f = tmp_path / "d.jsonl"
    f.write_text(content)
    with pytest.raises(DataError) as e:
        data.prepare(spec("text"), [src(f)])
    assert expected in str(e.value)


def test_bad_messages_and_unsupported_files(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user"}]}])
    with pytest.raises(DataError, match="list of {role, content} messages"):
        data.prepare(spec("chat"), [src(f)])
    (tmp_path / "x.xlsx").write_text("")
    with pytest.raises(DataError, match="unsupported file type .xlsx"):
        data.prepare(spec("chat"), [src(tmp_path / "x.xlsx")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="folder holds no"):
        data.prepare(spec("chat"), [src(empty)])


def test_split_is_deterministic_disjoint_and_capped(tiny_data):
    a = data.prepare(spec("text", evalFraction=0.2, maxSamples=100), [src(tiny_data["domain"])], seed=7)
    b = data.prepare(spec("text", evalFraction=0.2, maxSamples=100), [src(tiny_data["domain"])], seed=7)
    c = data.prepare(spec("text", evalFraction=0.2, maxSamples=100), [src(tiny_data["domain"])], seed=8)
    assert a.train["text"] == b.train["text"] and a.eval["text"] == b.eval["text"]
    assert a.train["text"] != c.train["text"]
    assert len(a.train) == 100 and len(a.eval) == 20  # eval sized on what trains
    assert not set(a.train["text"]) & set(a.eval["text"])


def test_explicit_eval_sources_and_no_eval(tiny_data):
    p = data.prepare(spec("text", eval=[{"uri": "file:///x"}]), [src(tiny_data["domain"])],
                     [src(tiny_data["general"])])
    assert p.eval_source == "eval" and len(p.train) == 400 and len(p.eval) == 400
    assert p.eval_files[0]["uri"].endswith("general.jsonl")
    none = data.prepare(spec("text", evalFraction=0), [src(tiny_data["domain"])])
    assert none.eval is None and none.eval_source == "none" and len(none.train) == 400


def test_sources_are_concatenated(tiny_data, tmp_path):
    extra = write_jsonl(tmp_path / "more.jsonl", [{"text": f"extra {i}"} for i in range(10)])
    p = data.prepare(spec("text", evalFraction=0), [src(tiny_data["domain"]), src(extra)])
    assert len(p.train) == 410 and len(p.train_files) == 2


def test_reference_texts(tiny_data):
    texts, files = data.load_reference_texts([src(tiny_data["general"])], max_samples=16, seed=3)
    again, _ = data.load_reference_texts([src(tiny_data["general"])], max_samples=16, seed=3)
    assert len(texts) == 16 and texts == again and all(isinstance(t, str) and t for t in texts)
    assert files[0]["rows"] == 400


def test_files_become_memory_mapped_arrow_that_a_second_rank_reuses(tiny_data, tmp_path):
    """What the pods rely on: the first process of a node writes Arrow files into the node cache, and every
    dataset the stage gets is backed by them (memory-mapped, not Python objects); a second process preparing
    the same job reads those files instead of parsing the JSONL again."""
    cache = tmp_path / "cache"
    first = data.prepare(spec("chat"), [src(tiny_data["chat"])], seed=3, cache_dir=cache)
    assert first.train.cache_files and first.eval.cache_files
    for ds in (first.train, first.eval):
        assert all(Path(f["filename"]).is_relative_to(cache) for f in ds.cache_files)
    written = sorted(p.name for p in cache.rglob("*.arrow"))
    assert written

    second = data.prepare(spec("chat"), [src(tiny_data["chat"])], seed=3, cache_dir=cache)
    assert sorted(p.name for p in cache.rglob("*.arrow")) == written  # nothing parsed or shuffled again
    assert second.train.cache_files == first.train.cache_files
    assert second.train["messages"] == first.train["messages"]


def test_json_object_holding_one_list_and_json_lines_named_json(tmp_path):
    rows = [{"text": f"t{i}"} for i in range(3)]
    (tmp_path / "wrapped.json").write_text(json.dumps({"version": 1, "data": rows}))
    assert sorted(data.prepare(spec("text", evalFraction=0), [src(tmp_path / "wrapped.json")]).train["text"]) == \
        ["t0", "t1", "t2"]
    lines = write_jsonl(tmp_path / "lines.json", rows)
    assert len(data.prepare(spec("text", evalFraction=0), [src(lines)]).train) == 3
    (tmp_path / "two.json").write_text(json.dumps({"a": rows, "b": rows}))
    with pytest.raises(DataError, match="object holding exactly one such list"):
        data.prepare(spec("text"), [src(tmp_path / "two.json")])
    (tmp_path / "mixed.json").write_text(json.dumps([{"text": "a"}, {"text": 3}]))
    with pytest.raises(DataError, match="column 'text' mixes value types: string in row 1, number in row 2"):
        data.prepare(spec("text"), [src(tmp_path / "mixed.json")])
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        data.prepare(spec("text"), [src(tmp_path / "latin1.jsonl")])


def _hub_snapshot(root: Path) -> Path:
    """A folder laid out like an hf:// dataset snapshot: one parquet/jsonl shard per split under data/."""
    import pandas as pd

    (root / "data").mkdir(parents=True)
    for split, n in (("train", 6), ("test", 3), ("validation", 2)):
        pd.DataFrame({"text": [f"{split} {i}" for i in range(n)]}).to_parquet(
            root / "data" / f"{split}-00000-of-00001.parquet")
    (root / "README.md").write_text("# a dataset card without a configs block\n")
    return root


def test_hf_split_reads_only_that_splits_files(tmp_path):
    snap = _hub_snapshot(tmp_path / "snap")
    uri = "hf://datasets/acme/stories"
    train = data.prepare(spec("text", evalFraction=0), [data.Source(uri, snap, split="train")])
    assert sorted(train.train["text"]) == [f"train {i}" for i in range(6)]  # no test/validation leak
    assert [f["uri"] for f in train.train_files] == [f"{uri}/data/train-00000-of-00001.parquet"]
    test = data.prepare(spec("text", evalFraction=0), [data.Source(uri, snap, split="test")])
    assert sorted(test.train["text"]) == ["test 0", "test 1", "test 2"]
    whole = data.prepare(spec("text", evalFraction=0), [data.Source(uri, snap)])
    assert len(whole.train) == 11  # no split: every file, as before
    with pytest.raises(DataError) as e:
        data.prepare(spec("text"), [data.Source(uri, snap, split="dev2")])
    assert e.value.field == uri and "splits found: ['test', 'train', 'validation']" in str(e.value)


def test_hf_split_follows_the_dataset_cards_configs(tmp_path):
    root = tmp_path / "snap"
    (root / "raw").mkdir(parents=True)
    write_jsonl(root / "raw" / "a.jsonl", [{"text": "kept"}])
    write_jsonl(root / "raw" / "b.jsonl", [{"text": "held out"}])
    (root / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n"
                                    "  - split: train\n    path: raw/a.jsonl\n  - split: test\n    path: raw/b.jsonl\n"
                                    "---\n# card\n")
    p = data.prepare(spec("text", evalFraction=0), [data.Source("hf://datasets/acme/x", root, split="train")])
    assert p.train["text"] == ["kept"]
