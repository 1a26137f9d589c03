"""Datasets: fetched files -> `datasets.Dataset` in the column layout TRL expects for the spec's format.

Every problem a person can fix in their data becomes a `DataError` (exit 65, fails the job at once) that names
the file (by its URI, not the pod's cache path), the column, and what was found instead, so the condition
message on the FineTuneJob is enough to fix it without reading pod logs.

Files load through `datasets.load_dataset` into memory-mapped Arrow files in the node's cache: host memory
stays flat whatever the file size and the number of ranks (bench/data_loading_rss.py). Files are checked
without reading them into Python: nulls through Arrow's null counts, value types on the first rows; a file the
builder cannot parse, or a column that mixes value types, gets a streaming pass that names the line.

Order of operations, all deterministic given `training.seed`:
    load each file -> rename columns (dataset.columns) -> check the format's columns -> keep only those
    -> concatenate sources -> shuffle(seed) -> hold out eval (eval sources, or evalFraction of train)
    -> cap train at maxSamples.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from kubetune_api.defaults import effective_eval_fraction
from kubetune_api.finetunejob import ColumnMapping, DatasetSpec

from .errors import DataError

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt")

# Columns each format needs, in TRL's names. prompt_only keeps any extra columns too: RL reward functions
# receive them as keyword arguments (e.g. `answer`).
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "unpaired_preference": ("prompt", "completion", "label"),
    "prompt_only": ("prompt",),
}
KEEPS_EXTRA_COLUMNS = {"prompt_only"}

# How many rows per file get a per-value type check (the null check covers every row).
_TYPE_CHECK_ROWS = 1000


@dataclass
class Source:
    """One dataset URI and where storage.fetch put it locally; `split` (spec.dataset.*[i].split) picks one
    split's files out of a folder laid out like a Hub dataset (an hf:// snapshot)."""

    uri: str
    path: Path
    split: Optional[str] = None


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset
    eval: Optional[Any]  # datasets.Dataset or None (evaluation disabled)
    train_files: list[dict] = field(default_factory=list)  # [{"uri", "sha256", "bytes", "rows"}]
    eval_files: list[dict] = field(default_factory=list)
    eval_source: str = "none"  # "eval" (dataset.eval), "fraction" (held out of train) or "none"


# ------------------------------------------------------------------------------------------------ files
def _datasets():
    """datasets, with its per-operation progress bars off: the CLI and the monitor report progress, and
    dozens of bars in a pod log bury the lines that matter."""
    import datasets

    datasets.disable_progress_bars()
    return datasets


def list_files(source: Source) -> list[tuple[str, Path]]:
    """(display name, local path) of every supported file under a fetched source. Hidden files and the
    storage layer's markers (`_COMPLETE`, `.tmp-*`) are skipped."""
    p = source.path
    if source.split and p.is_dir():
        return _split_files(source)
    if p.is_file():
        if p.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise DataError(f"unsupported file type {p.suffix or '(none)'}; supported: "
                            f"{', '.join(SUPPORTED_SUFFIXES)}", field=source.uri)
        return [(source.uri, p)]
    if not p.is_dir():
        raise DataError("no such file or folder", field=source.uri)
    files = []
    for f in sorted(p.rglob("*")):
        rel = f.relative_to(p)
        if not f.is_file() or any(part.startswith((".", "_")) for part in rel.parts):
            continue
        if f.suffix.lower() in SUPPORTED_SUFFIXES:
            files.append((f"{source.uri.rstrip('/')}/{rel.as_posix()}", f))
    if not files:
        found = sorted(x.name for x in p.iterdir())[:20]
        raise DataError(f"folder holds no {', '.join(SUPPORTED_SUFFIXES)} files (found: {found or 'nothing'})",
                        field=source.uri)
    return files


def _split_files(source: Source) -> list[tuple[str, Path]]:
    """The files of one split of a Hub-style dataset folder, found the way `datasets` finds them: the README's
    `configs:` data_files when it has them, else the Hub's naming conventions (data/train-00000-of-00001.parquet,
    train.jsonl, train/..., test*, validation*/dev*, ...). Without this every file of a snapshot would be read,
    and test or validation examples would leak into training."""
    datasets = _datasets()
    p = source.path
    try:
        found = {str(k): [Path(f) for f in v] for k, v in
                 datasets.load_dataset_builder(str(p)).config.data_files.items()}
    except Exception:  # noqa: BLE001 - mixed file types or an unusual README: fall back to the naming conventions
        from datasets.data_files import DataFilesDict, get_data_patterns

        try:
            found = {str(k): [Path(f) for f in v] for k, v in
                     DataFilesDict.from_patterns(get_data_patterns(str(p)), base_path=str(p)).items()}
        except Exception:  # noqa: BLE001 - no recognisable layout at all
            found = {}
    if source.split not in found:
        raise DataError(f"no split {source.split!r} in this dataset (splits found: {sorted(found) or 'none'}); "
                        "set split to one of them", field=source.uri)
    files = []
    for f in sorted(found[source.split]):
        rel = f.resolve().relative_to(p.resolve())
        if f.suffix.lower() in SUPPORTED_SUFFIXES and not any(part.startswith((".", "_")) for part in rel.parts):
            files.append((f"{source.uri.rstrip('/')}/{rel.as_posix()}", f))
    if not files:
        raise DataError(f"split {source.split!r} holds no {', '.join(SUPPORTED_SUFFIXES)} files", field=source.uri)
    return files


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_rows(name: str, path: Path, fmt: str, cache_dir: Optional[Path] = None):
    """The file as a datasets.Dataset with the file's own columns, built by `datasets.load_dataset`: Arrow
    files written once into `cache_dir` and memory-mapped, so a multi-GB file costs page cache, not Python
    objects, and other ranks (and re-runs) reuse the cache instead of parsing again. When the builder fails,
    or infers a column of mixed value types, a streaming pass over the file finds the line and column to name
    (`_diagnose_json`)."""
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        return _datasets().Dataset.from_dict({})
    try:
        if suffix in (".jsonl", ".json"):
            return _load_json(name, path, cache_dir)
        if suffix == ".parquet":
            return _builder("parquet", path, cache_dir)
        if suffix == ".csv":
            # "NA", "null", "" stay strings, as written: pandas' default would turn them into missing values.
            return _builder("csv", path, cache_dir, keep_default_na=False)
        if suffix == ".txt":
            # format text: one example per line (blank lines skipped); other formats have no columns in a
            # .txt, so the whole file becomes one `text` row and the column check explains what is missing.
            if fmt != "text":
                return _builder("text", path, cache_dir, sample_by="document")
            ds = _builder("text", path, cache_dir)
            return ds.filter(lambda b: [bool(t.strip()) for t in b["text"]], batched=True).flatten_indices()
    except DataError:
        raise
    except Exception as exc:  # builder/pyarrow/pandas parse errors: the file is malformed
        if _caused_by(exc, UnicodeDecodeError):
            raise DataError("not UTF-8 text", field=name) from None
        raise DataError(f"cannot read {suffix} file: {_root_message(exc)}", field=name) from None
    raise DataError(f"unsupported file type {suffix}", field=name)


def _builder(kind: str, path: Path, cache_dir: Optional[Path], **kwargs):
    import logging

    datasets = _datasets()
    # The json builder logs a full error before raising; the DataError raised from here says it better.
    quiet = logging.getLogger("datasets")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        return datasets.load_dataset(kind, data_files=str(path), split="train",
                                     cache_dir=str(cache_dir) if cache_dir else None, **kwargs)
    finally:
        quiet.setLevel(level)


def _caused_by(exc: BaseException, kind: type) -> bool:
    while exc is not None:
        if isinstance(exc, kind):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _root_message(exc: BaseException) -> str:
    while (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__
    return f"{type(exc).__name__}: {exc}"[:300]


def _load_json(name: str, path: Path, cache_dir: Optional[Path]):
    """JSON lines (.jsonl, and .json files that are really JSON lines), a JSON list of objects, or a JSON
    object holding exactly one such list."""
    try:
        ds = _builder("json", path, cache_dir)
    except Exception:
        _diagnose_json(name, path)  # raises the DataError that names the line
        raise
    if path.suffix.lower() == ".json" and len(ds) == 1:
        # One object: the rows are the one list it holds (like {"data": [...]}).
        lists = [c for c, f in ds.features.items()
                 if isinstance(f, list) or type(f).__name__ in ("List", "LargeList", "Sequence")]
        if len(lists) != 1:
            raise DataError("expected a JSON list of objects (or an object holding exactly one such list)", field=name)
        ds = _builder("json", path, cache_dir, field=lists[0])
    if not _first_line_is_object(path) and path.suffix.lower() == ".jsonl":
        _diagnose_json(name, path)
    # datasets gives a column whose rows hold different JSON types the catch-all Json feature. Different
    # nested shapes (messages with and without tool calls) are fine; a column that is a string in one row and a
    # number in another is a mistake to name.
    if any(type(f).__name__ == "Json" for f in ds.features.values()):
        _diagnose_json(name, path)
    return ds


def _first_line_is_object(path: Path) -> bool:
    with path.open("rb") as f:
        for line in f:
            if line.strip():
                return line.lstrip().startswith(b"{") and _is_json_object(line)
    return False


def _is_json_object(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object"}.get(type(v), type(v).__name__)


def _check_kinds(first: dict, row: dict, i: int, name: str) -> None:
    """Arrow cannot hold a column that mixes value types ("Expected bytes, got a 'int' object" names neither
    the column nor the row): name both. The same holds per key of a list's objects (e.g. chat messages)."""
    def check(where: str, v: Any) -> None:
        kind = _kind(v)
        seen = first.setdefault(where, (kind, i))
        if seen[0] != kind:
            raise DataError(f"{where} mixes value types: {seen[0]} in row {seen[1]}, {kind} in row {i}", field=name)

    for col, v in row.items():
        if v is None:
            continue
        check(f"column '{col}'", v)
        if isinstance(v, list):
            for item in v:
                if isinstance(item, dict):
                    for key, x in item.items():
                        if x is not None:
                            check(f"column '{col}' key '{key}'", x)


def _diagnose_json(name: str, path: Path) -> None:
    """Find what makes a JSON file unusable, and raise a DataError naming the line (JSON lines, read one line at
    a time: constant memory) or the structure (a single JSON document). Returns when nothing is wrong."""
    try:
        if path.suffix.lower() == ".json":
            try:
                obj = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                if "Extra data" not in exc.msg:  # "Extra data": many ".json" files are really JSON lines
                    raise DataError(f"not valid JSON ({exc.msg} at line {exc.lineno})", field=name) from None
            else:
                if isinstance(obj, dict):
                    lists = [v for v in obj.values() if isinstance(v, list)]
                    if len(lists) != 1:
                        raise DataError("expected a JSON list of objects (or an object holding exactly one such "
                                        "list)", field=name)
                    obj = lists[0]
                if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
                    raise DataError("expected a JSON list of objects", field=name)
                first: dict = {}
                for i, row in enumerate(obj, 1):
                    _check_kinds(first, row, i, name)
                return
        first = {}
        rows = 0
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"line {i} is not valid JSON ({exc.msg})", field=name) from None
                if not isinstance(row, dict):
                    raise DataError(f"line {i} is a JSON {type(row).__name__}, expected an object", field=name)
                rows += 1
                _check_kinds(first, row, rows, name)
    except UnicodeDecodeError:
        raise DataError("not UTF-8 text", field=name) from None


# ------------------------------------------------------------------------------------------------ columns
def _renames(columns: Optional[ColumnMapping]) -> dict[str, str]:
    """{source column: canonical column} from dataset.columns ({canonical: source} on the wire)."""
    if columns is None:
        return {}
    return {src: canon for canon, src in columns.model_dump(exclude_none=True).items() if src != canon}


def _apply_columns(ds, name: str, fmt: str, columns: Optional[ColumnMapping]):
    renames = _renames(columns)
    required = REQUIRED_COLUMNS[fmt]
    found = list(ds.column_names)
    missing = []
    for canon in required:
        src = next((s for s, c in renames.items() if c == canon), canon)
        if src not in found:
            via = f" (mapped to {canon} by spec.dataset.columns.{canon})" if src != canon else ""
            missing.append(f"'{src}'{via}")
    if missing:
        raise DataError(
            f"missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} needed by dataset format {fmt} "
            f"(needs {', '.join(required)}); columns found: {found}. Rename them in the file or map them with "
            f"spec.dataset.columns", field=name)
    present = {s: c for s, c in renames.items() if s in found}
    # A rename onto a column that already exists would silently shadow it: drop the old one first.
    clash = [c for c in present.values() if c in found and c not in present]
    if clash:
        ds = ds.remove_columns(clash)
    if present:
        ds = ds.rename_columns(present)
    keep = list(ds.column_names) if fmt in KEEPS_EXTRA_COLUMNS else list(required)
    ds = ds.select_columns(keep)
    return _check_values(ds, name, fmt)


def _is_messages(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in v)


def _check_values(ds, name: str, fmt: str):
    """Nulls anywhere, and the value types of the first rows: strings for text columns (or message lists,
    which TRL's conversational variants take), message lists for chat, booleans for labels."""
    required = REQUIRED_COLUMNS[fmt]
    for col in required:
        nulls = ds.data.column(col).null_count
        if nulls:
            import pyarrow.compute as pc

            first = pc.index(pc.is_null(ds.data.column(col)), True).as_py()
            raise DataError(f"column '{col}' is empty in {nulls} row(s), first at row {first + 1}", field=name)
    sample = ds.select(range(min(len(ds), _TYPE_CHECK_ROWS)))
    if fmt == "chat" and len(sample) and isinstance(sample[0]["messages"], str):
        ds = ds.map(lambda r: {"messages": _parse_json_cell(r["messages"], name)})  # CSV: JSON-encoded cells
        sample = ds.select(range(min(len(ds), _TYPE_CHECK_ROWS)))
    for col in required:
        for i, v in enumerate(sample[col]):
            if col == "messages":
                ok = _is_messages(v) and len(v) > 0
                want = "a non-empty list of {role, content} messages"
            elif col == "label":
                ok = isinstance(v, bool) or v in (0, 1) or (isinstance(v, str) and v.lower() in ("true", "false"))
                want = "true or false"
            else:
                ok = (isinstance(v, str) and v != "") or _is_messages(v)
                want = "a non-empty string"
            if not ok:
                raise DataError(f"column '{col}' row {i + 1} should be {want}, got {str(v)[:60]!r}", field=name)
    if fmt == "chat":
        _check_conversations(ds, name)
    if fmt == "unpaired_preference" and ds.features["label"].dtype != "bool":
        ds = ds.map(lambda r: {"label": r["label"] in (True, 1) or str(r["label"]).lower() == "true"})
        ds = ds.cast_column("label", _bool_feature())
    return ds


def _check_conversations(ds, name: str) -> None:
    """Every conversation (all rows, not a sample: one bad row anywhere fails the run) has string roles and
    contents and at least one assistant turn: SFT learns the assistant's turns, and without one TRL fails deep
    in tokenization with an error about chat templates that names neither the file nor the row."""
    row = 0
    for batch in ds.iter(batch_size=1000):
        for messages in batch["messages"]:
            row += 1
            if not _is_messages(messages) or not messages:
                raise DataError(f"column 'messages' row {row} should be a non-empty list of {{role, content}} "
                                f"messages, got {str(messages)[:60]!r}", field=name)
            for turn, m in enumerate(messages):
                if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise DataError(f"row {row}, message {turn + 1}: role and content must be strings, got "
                                    f"{str(m)[:80]!r}", field=name)
            if not any(m["role"] == "assistant" for m in messages):
                roles = [m["role"] for m in messages]
                raise DataError(f"row {row} has no assistant turn (roles: {roles}); each conversation needs at "
                                "least one message with role 'assistant' to learn from", field=name)


def _bool_feature():
    return _datasets().Value("bool")


def _parse_json_cell(v: Any, name: str):
    if not isinstance(v, str):
        return v
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        raise DataError(f"column 'messages' holds a string that is not a JSON list of messages: {v[:60]!r}",
                        field=name) from None


# ------------------------------------------------------------------------------------------------ loading
def load_sources(sources: Iterable[Source], fmt: str, columns: Optional[ColumnMapping] = None,
                 what: str = "spec.dataset.train", cache_dir: Optional[Path] = None):
    """Load, check and concatenate every file of every source. Returns (dataset, file records).
    cache_dir: where datasets writes its Arrow files (None: datasets' default, HF_DATASETS_CACHE)."""
    datasets = _datasets()

    parts, records, names = [], [], []
    for src in sources:
        for name, path in list_files(src):
            ds = _read_rows(name, path, fmt, cache_dir)
            rec = {"uri": name, "sha256": file_digest(path), "bytes": path.stat().st_size, "rows": len(ds)}
            records.append(rec)
            if len(ds) == 0:
                continue
            parts.append(_apply_columns(ds, name, fmt, columns))
            names.append(name)
    if not parts:
        listed = ", ".join(r["uri"] for r in records) or "(no files)"
        raise DataError(f"no examples: every file is empty ({listed})", field=what)
    if len(parts) == 1:
        return parts[0], records
    try:
        return datasets.concatenate_datasets(parts), records
    except Exception:
        # Same columns, different inferred types (e.g. a prompt_only extra column that is int in one file
        # and str in another): align on the first file's schema, and name the file that cannot be aligned.
        aligned = [parts[0]]
        for part, name in zip(parts[1:], names[1:]):
            if sorted(part.column_names) != sorted(parts[0].column_names):
                raise DataError(f"columns {sorted(part.column_names)} differ from {names[0]}'s "
                                f"{sorted(parts[0].column_names)}; sources are concatenated, so they must match",
                                field=name) from None
            try:
                aligned.append(part.cast(parts[0].features))
            except Exception as exc:
                raise DataError(f"column types differ from {names[0]}'s ({exc})", field=name) from None
        return datasets.concatenate_datasets(aligned), records


def prepare(spec: DatasetSpec, train: list[Source], eval_sources: Optional[list[Source]] = None,
            seed: int = 42, cache_dir: Optional[Path] = None) -> PreparedData:
    """The datasets a stage trains and evaluates on (see the module docstring for the order).

    In a multi-process run call it on the node's first process first (distributed.local_main_first): the
    others then find every Arrow file, including the shuffled copy, in cache_dir and only memory-map it."""
    fmt = spec.format
    train_ds, train_files = load_sources(train, fmt, spec.columns, "spec.dataset.train", cache_dir)
    train_ds = train_ds.shuffle(seed=seed).flatten_indices()
    eval_ds, eval_files, eval_source = None, [], "none"
    if eval_sources:
        eval_ds, eval_files = load_sources(eval_sources, fmt, spec.columns, "spec.dataset.eval", cache_dir)
        eval_source = "eval"
        if spec.max_samples:
            train_ds = train_ds.select(range(min(len(train_ds), spec.max_samples)))
    else:
        frac = effective_eval_fraction(spec)
        used = min(len(train_ds), spec.max_samples) if spec.max_samples else len(train_ds)
        # Held out from the shuffled data, sized on what is actually used for training; at least one
        # example so a tiny dataset still gets an eval loss, and never all of it.
        n_eval = 0
        if frac > 0 and len(train_ds) >= 2:
            n_eval = min(len(train_ds) - 1, max(1, int(round(frac * used))))
        if n_eval:
            eval_ds = train_ds.select(range(n_eval))
            eval_source = "fraction"
        rest = train_ds.select(range(n_eval, len(train_ds)))
        train_ds = rest.select(range(min(len(rest), spec.max_samples))) if spec.max_samples else rest
    if len(train_ds) == 0:
        raise DataError("no training examples left after holding out evaluation data", field="spec.dataset.train")
    return PreparedData(train=train_ds, eval=eval_ds, train_files=train_files, eval_files=eval_files,
                        eval_source=eval_source)


def load_reference_texts(sources: list[Source], max_samples: int, seed: int = 42,
                         cache_dir: Optional[Path] = None) -> tuple[list[str], list[dict]]:
    """General-domain text for the forgetting check (format text). Returns (texts, file records)."""
    ds, records = load_sources(sources, "text", None, "spec.evaluation.reference", cache_dir)
    ds = ds.shuffle(seed=seed)
    return list(ds.select(range(min(len(ds), max_samples)))["text"]), records
