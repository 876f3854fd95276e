"""Load raw records (a list of plain dicts) from local files or Hugging Face datasets.

Supported sources:

* local files ending in ``.jsonl``, ``.jsonl.gz``, ``.json``, ``.csv``, ``.tsv`` or ``.parquet``;
* ``hf:<dataset id>`` or ``hf:<dataset id>:<config>``, passed to ``datasets.load_dataset``.
  The id may also be a local dataset directory (``hf:/data/my_set``), which is how the
  tests exercise this path without a network.

Values read from CSV/TSV stay strings; mapping them to labels or numbers is the caller's job.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import json
from pathlib import Path

HF_PREFIX = "hf:"
# Longest suffixes first so ".jsonl.gz" is not mistaken for something else.
FILE_EXTENSIONS = (".jsonl.gz", ".jsonl", ".json", ".csv", ".tsv", ".parquet")


def load_records(source: str, *, split: str | None = None, limit: int | None = None) -> list[dict]:
    """Load records from a local file or a Hugging Face dataset.

    Args:
        source: A local path ending in one of ``FILE_EXTENSIONS``, or ``hf:<id>`` /
            ``hf:<id>:<config>`` for ``datasets.load_dataset``. Relative paths resolve
            from the current working directory.
        split: Dataset split for ``hf:`` sources (default ``"train"``). Must be None for
            local files, which hold a single split each.
        limit: If given, keep only the first ``limit`` records.

    Returns:
        The records, each a plain dict mapping column name to value.

    Raises:
        ValueError: If the source is missing, empty, malformed, has an unsupported
            extension, or a row is not an object.
    """
    if not isinstance(source, str) or not source.strip():
        raise ValueError(
            f"data source must be a non-empty string, got {source!r}; give a file path "
            f"(one of {', '.join(FILE_EXTENSIONS)}) or 'hf:<dataset id>[:<config>]'"
        )
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")

    if source.startswith(HF_PREFIX):
        records = _load_hf(source, split=split, limit=limit)
    else:
        if split is not None:
            raise ValueError(
                f"split={split!r} only applies to 'hf:' sources; a local file like {source!r} "
                "holds one split, so point at the file for that split and drop `split`"
            )
        records = _load_file(source, limit=limit)

    if not records:
        raise ValueError(f"data source {source!r} contains no records; check that it is the right file/split")
    return records


def require_fields(records: list[dict], fields: list[str], source: str) -> None:
    """Check that every record has all the given fields.

    Args:
        records: Records as returned by ``load_records``.
        fields: Field names every record must have.
        source: Where the records came from, used in the error message.

    Raises:
        ValueError: Naming the first record (1-based) that lacks a field, the fields it
            does have, and a close match when the name looks like a typo.
    """
    for row_number, record in enumerate(records, start=1):
        missing = [field for field in fields if field not in record]
        if not missing:
            continue
        available = sorted(str(key) for key in record)
        hints = []
        for field in missing:
            close = difflib.get_close_matches(field, available, n=1, cutoff=0.6)
            if close:
                hints.append(f"did you mean {close[0]!r} instead of {field!r}?")
        message = (
            f"{source}: record {row_number} has no field {missing[0]!r}"
            + (f" (also missing: {', '.join(repr(f) for f in missing[1:])})" if len(missing) > 1 else "")
            + f"; its fields are {available}. "
        )
        message += " ".join(hints) if hints else "Rename the column in the data or point the config at an existing field."
        raise ValueError(message)


def _load_file(source: str, *, limit: int | None) -> list[dict]:
    path = Path(source).expanduser()
    name = path.name.lower()
    extension = next((ext for ext in FILE_EXTENSIONS if name.endswith(ext)), None)
    if extension is None:
        raise ValueError(
            f"unsupported data file {source!r}: the name must end in one of "
            f"{', '.join(FILE_EXTENSIONS)} (or use 'hf:<dataset id>' for a Hugging Face dataset)"
        )
    if not path.exists():
        raise ValueError(
            f"data file {source!r} does not exist (resolved to {path.resolve()}); relative paths "
            "resolve from the current working directory, so run from the project root or give an absolute path"
        )
    if not path.is_file():
        raise ValueError(f"data source {source!r} is a directory, not a file; point at a {'/'.join(FILE_EXTENSIONS)} file")
    if path.stat().st_size == 0:
        raise ValueError(f"data file {source!r} is empty; it must hold at least one record")

    try:
        if extension in (".jsonl", ".jsonl.gz"):
            rows = _read_jsonl(path, source, limit)
        elif extension == ".json":
            rows = _read_json(path, source)
        elif extension in (".csv", ".tsv"):
            rows = _read_delimited(path, source, "\t" if extension == ".tsv" else ",", limit)
        else:
            rows = _read_parquet(path, limit)
    except (UnicodeDecodeError, EOFError, OSError) as err:  # binary garbage, a truncated .gz, a non-gzip .gz
        what = f"{err.reason} at byte {err.start}" if isinstance(err, UnicodeDecodeError) else str(err)
        raise ValueError(f"data file {source!r} cannot be read as {extension} text ({what}); is it the right "
                         f"file? {extension} files must be UTF-8 text"
                         f"{' compressed with gzip' if extension.endswith('.gz') else ''}.") from None
    return rows[:limit] if limit is not None else rows


def _read_jsonl(path: Path, source: str, limit: int | None) -> list[dict]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    rows: list[dict] = []
    with opener(path, "rt", encoding="utf-8-sig") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue  # blank lines (often a trailing newline) carry no record
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{source}, line {line_number}: not valid JSON ({error.msg} at column {error.colno}); "
                    "each line of a .jsonl file must be one complete JSON object"
                ) from None
            _check_object(row, f"{source}, line {line_number}")
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break  # large files: stop reading as soon as we have enough
    return rows


def _read_json(path: Path, source: str) -> list[dict]:
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise ValueError(f"data file {source!r} is empty; it must hold at least one record")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{source}, line {error.lineno}: not valid JSON ({error.msg} at column {error.colno}); "
            "a .json file must hold a list of objects (use .jsonl for one object per line)"
        ) from None
    if isinstance(data, dict):
        list_keys = [key for key, value in data.items() if isinstance(value, list)]
        if len(list_keys) != 1:
            raise ValueError(
                f"{source}: a top-level JSON object must have exactly one list-valued key holding the records "
                f"(like {{\"data\": [...]}}), found {len(list_keys)}: {list_keys}; "
                "make the file a plain list of objects instead"
            )
        data = data[list_keys[0]]
    if not isinstance(data, list):
        raise ValueError(
            f"{source}: expected a list of objects at the top level, got {type(data).__name__}; "
            "write the records as [{...}, {...}]"
        )
    for index, row in enumerate(data, start=1):
        _check_object(row, f"{source}, record {index}")
    return data


def _read_delimited(path: Path, source: str, delimiter: str, limit: int | None) -> list[dict]:
    kind = "TSV" if delimiter == "\t" else "CSV"
    rows: list[dict] = []
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        if not reader.fieldnames:
            raise ValueError(f"{source}: no header row; the first line of a {kind} file must name the columns")
        for row in reader:
            # DictReader files surplus cells under None and fills short rows with None;
            # both mean the row does not match the header, which silently corrupts data.
            if None in row or any(value is None for value in row.values()):
                raise ValueError(
                    f"{source}, line {reader.line_num}: expected {len(reader.fieldnames)} columns "
                    f"({', '.join(reader.fieldnames)}) but the row has a different count; "
                    f"fix that line (quote cells that contain the delimiter)"
                )
            rows.append(dict(row))
            if limit is not None and len(rows) >= limit:
                break
    return rows


def _read_parquet(path: Path, limit: int | None) -> list[dict]:
    import pyarrow.parquet as pq  # imported lazily: pyarrow is heavy and only parquet needs it

    table = pq.read_table(path)
    if limit is not None:
        table = table.slice(0, limit)
    return table.to_pylist()


def _parse_hf_source(source: str) -> tuple[str, str | None]:
    spec = source[len(HF_PREFIX):]
    dataset_id, _, config = spec.partition(":")
    if not dataset_id:
        raise ValueError(
            f"data source {source!r} names no dataset; write 'hf:<dataset id>' or 'hf:<dataset id>:<config>', "
            "e.g. 'hf:glue:sst2'"
        )
    return dataset_id, (config or None)


def _load_hf(source: str, *, split: str | None, limit: int | None) -> list[dict]:
    import datasets  # imported lazily: `datasets` is slow to import and only hf: sources need it

    dataset_id, config = _parse_hf_source(source)
    split_name = split or "train"
    try:
        dataset = datasets.load_dataset(dataset_id, config, split=split_name)
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetGenerationError) as error:
        reason = str(error).rstrip(". ")
        raise ValueError(
            f"could not load {source!r} (dataset {dataset_id!r}, config {config!r}, split {split_name!r}): {reason}. "
            "Check the dataset id, config and split names; without network access only local "
            "dataset directories or already-cached datasets can be loaded"
        ) from error
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset.to_list()


def _check_object(row: object, where: str) -> None:
    if not isinstance(row, dict):
        raise ValueError(
            f"{where}: expected a JSON object like {{\"text\": ..., \"label\": ...}}, got "
            f"{type(row).__name__} {str(row)[:60]!r}; every record must be an object"
        )
