"""Load a data source into a DataFrame, split it, sample it, fingerprint it.

Every frame returned by `load_table` is indexed by the 1-based data row number: the N-th data
record of the source, not counting a CSV/TSV header or blank lines. In a JSONL file with no blank
lines row N is line N; in a CSV/TSV file it is line N + 1 (when no quoted field spans lines).
Splitting and sampling keep that index, so a validation report can name rows as the user sees
them in the file.

Anything that cannot be read raises `DataError` with the path, what is wrong and the fix; no raw
pandas, pyarrow or datasets exception escapes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DataError

FORMATS = ("csv", "tsv", "jsonl", "parquet", "datasets")
"""Formats `load_table` reads (plus `auto`, which picks one from the extension)."""

_EXTENSIONS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_DATASETS_MARKERS = ("dataset_info.json", "state.json")


def load_table(path: str | os.PathLike, format: str = "auto") -> pd.DataFrame:
    """Read CSV, TSV, JSONL, Parquet or a saved `datasets` folder into a DataFrame.

    The index is the 1-based data row number (see the module docstring). Text stays text: CSV and
    TSV cells are read as strings with no NA guessing ("NA" and "null" are text, a missing field
    is ""), JSONL and Parquet keep their own types.
    """
    p = Path(path).expanduser()
    fmt = _detect_format(p, format)
    if fmt == "datasets":
        df = _read_datasets(p)
    elif fmt == "parquet":
        df = _read_parquet(p)
    else:
        text = _read_text(p)
        df = _read_jsonl(p, text) if fmt == "jsonl" else _read_delimited(p, text, fmt)
    if len(df.columns) == 0:
        raise DataError(f"{p}: no columns found. Fix: give the file a header row or named fields.")
    if len(df) == 0:
        raise DataError(
            f"{p}: has columns {list(map(str, df.columns))} but no data rows. Fix: add rows or point to another file."
        )
    df.index = pd.RangeIndex(1, len(df) + 1)
    return df


def _detect_format(p: Path, format: str) -> str:
    """Return the concrete format of `p`, checking that it exists and fits."""
    if format != "auto" and format not in FORMATS:
        raise DataError(f"{p}: unknown format {format!r}. Fix: use one of auto, {', '.join(FORMATS)}.")
    if not p.exists():
        raise DataError(f"{p}: no such file or folder. Fix: check data.train_path / data.eval_path.")
    if p.is_dir():
        if format not in ("auto", "datasets"):
            raise DataError(f"{p}: is a folder, not a {format} file. Fix: point to the file itself.")
        if not any((p / m).is_file() for m in (*_DATASETS_MARKERS, "dataset_dict.json")):
            raise DataError(
                f"{p}: is a folder but not one saved by `datasets.Dataset.save_to_disk` "
                f"(no {' or '.join(_DATASETS_MARKERS)}). Fix: point to a data file or a saved dataset folder."
            )
        return "datasets"
    if format == "datasets":
        raise DataError(
            f"{p}: format 'datasets' needs a folder saved by `save_to_disk`, got a file. "
            f"Fix: set format to the file's type."
        )
    if format != "auto":
        return format
    fmt = _EXTENSIONS.get(p.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{p}: unknown extension {p.suffix or '(none)'!r}. Fix: use one of "
            f"{', '.join(sorted(_EXTENSIONS))}, or set data.format explicitly."
        )
    return fmt


MAX_READ_BYTES = 4 * 2**30
"""Largest file the in-memory loader reads whole; above it `data.loader: ray_data` streams."""


def _read_text(p: Path) -> str:
    """Read a whole text file as strict UTF-8 (a leading BOM is dropped)."""
    if not p.is_file():  # a device (/dev/zero), a FIFO or a socket never ends or never answers
        raise DataError(f"{p}: is not a regular file. Fix: point to a data file.")
    if p.stat().st_size > MAX_READ_BYTES:
        raise DataError(f"{p}: is {p.stat().st_size / 2**30:.1f} GiB, more than the in-memory loader reads "
                        f"({MAX_READ_BYTES / 2**30:.0f} GiB). Fix: set data.loader: ray_data to stream it.")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise DataError(
            f"{p}: cannot be read ({exc.strerror or exc}). Fix: check the path and its permissions."
        ) from exc
    if not raw.strip():
        raise DataError(f"{p}: is empty. Fix: point to a file with a header and data rows.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{p}: is not UTF-8 text: byte 0x{raw[exc.start]:02x} at offset {exc.start} (line {line}) "
            f"cannot be decoded. Fix: re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
        ) from None
    return text.removeprefix("\ufeff")


def _read_delimited(p: Path, text: str, fmt: str) -> pd.DataFrame:
    """Parse CSV (quoted fields allowed) or TSV (quotes are literal, as in SST-2)."""
    options = {"sep": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {"sep": ","}
    _check_header_unique(p, text, options)
    try:
        return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_values=[], **options)
    except Exception as exc:  # pandas raises ParserError, ValueError, EmptyDataError, ...
        detail = str(exc).strip().replace("Error tokenizing data. C error: ", "") or type(exc).__name__
        raise DataError(
            f"{p}: cannot be parsed as {fmt.upper()}: {detail}. Fix: every row needs the same number of "
            f"{'tab-separated' if fmt == 'tsv' else 'comma-separated'} fields as the header"
            f"{'' if fmt == 'tsv' else ', and quotes must be closed'}."
        ) from exc


def _check_header_unique(p: Path, text: str, options: dict) -> None:
    """Refuse repeated column names, which pandas would silently rename to `name.1`."""
    try:
        header = next(
            csv.reader(io.StringIO(text), delimiter=options["sep"], quoting=options.get("quoting", csv.QUOTE_MINIMAL)),
            [],
        )
    except (csv.Error, StopIteration):
        return  # the parser reports malformed input below
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise DataError(f"{p}: the header repeats column name(s) {repeated}. Fix: give every column a unique name.")


def _read_jsonl(p: Path, text: str) -> pd.DataFrame:
    """Parse one JSON object per line; blank lines are skipped and not counted as rows."""
    records = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as exc:
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else f"{type(exc).__name__}: {str(exc)[:100]}"
            column = f", column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
            raise DataError(
                f"{p}: line {number} is not valid JSON ({reason}{column}). "
                f"Fix: JSON Lines needs one complete JSON object per line."
            ) from None
        if not isinstance(record, dict):
            raise DataError(
                f"{p}: line {number} is a JSON {type(record).__name__}, not an object. "
                f'Fix: write each row as an object, e.g. {{"text": "...", "label": 1}}.'
            )
        records.append(record)
    if not records:
        raise DataError(f"{p}: has no JSON objects. Fix: point to a file with one JSON object per line.")
    try:
        return pd.DataFrame.from_records(records)
    except Exception as exc:
        raise DataError(f"{p}: JSON objects cannot form a table ({type(exc).__name__}: {exc}).") from exc


def _read_parquet(p: Path) -> pd.DataFrame:
    """Read a Parquet file with pyarrow."""
    if p.stat().st_size == 0:
        raise DataError(f"{p}: is empty. Fix: point to a Parquet file with data rows.")
    try:
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pandas()
    except Exception as exc:  # ArrowInvalid, OSError, ArrowNotImplementedError, ...
        raise DataError(
            f"{p}: is not a readable Parquet file ({type(exc).__name__}: {_first_line(exc)}). "
            f"Fix: re-export it (e.g. `DataFrame.to_parquet`) or set data.format to its real type."
        ) from exc


def _read_datasets(p: Path) -> pd.DataFrame:
    """Read a folder saved by `Dataset.save_to_disk` (one split, not a DatasetDict)."""
    if (p / "dataset_dict.json").is_file():
        splits = sorted(d.name for d in p.iterdir() if d.is_dir())
        raise DataError(
            f"{p}: holds a DatasetDict with splits {splits}, not one dataset. "
            f"Fix: point to one split's folder, e.g. {p / (splits[0] if splits else 'train')}."
        )
    try:
        import datasets

        ds = datasets.load_from_disk(str(p))
        return ds.to_pandas()
    except Exception as exc:
        raise DataError(
            f"{p}: cannot be loaded as a saved dataset ({type(exc).__name__}: {_first_line(exc)}). "
            f"Fix: re-save it with `Dataset.save_to_disk`."
        ) from exc


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no details"


def header_hint(columns: list[str], expected: list[str]) -> str:
    """Why none of the `expected` columns was read, when the header says so: one field holding
    another delimiter, or a first row of data where the header should be ("" otherwise)."""
    if any(c in columns for c in expected):
        return ""
    if len(columns) == 1 and (sep := next((d for d in ";|\t" if d in columns[0]), None)):
        return (f". The header is one field holding {sep!r}: the file separates fields with {sep!r}, "
                f"not ','; convert it to CSV (or tabs to .tsv)")
    return f". If the first row is data, not a header, add the header row: {','.join(expected)}"


def split_train_eval(df: pd.DataFrame, eval_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split rows into (train, eval) with a seeded shuffle; both keep the source order and index."""
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be between 0 and 1 (exclusive), got {eval_fraction}.")
    n = len(df)
    if n < 2:
        raise DataError(
            f"cannot split {n} row(s) into train and eval: both need at least one row. "
            f"Fix: add rows or give data.eval_path."
        )
    n_eval = min(max(1, round(n * eval_fraction)), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    eval_pos = np.sort(order[:n_eval])
    train_pos = np.sort(order[n_eval:])
    return df.iloc[train_pos], df.iloc[eval_pos]


def sample_rows(df: pd.DataFrame, max_rows: int | None, seed: int) -> pd.DataFrame:
    """Return at most `max_rows` rows, a seeded sample in source order; unchanged if already small."""
    if max_rows is None or len(df) <= max_rows:
        return df
    if max_rows < 1:
        raise DataError(f"max_rows must be at least 1, got {max_rows}.")
    picked = np.sort(np.random.default_rng(seed).choice(len(df), size=max_rows, replace=False))
    return df.iloc[picked]


def fingerprint(*frames: pd.DataFrame) -> str:
    """sha256 hex of the frames' content (column names and cell values, in order).

    Independent of the index and of dtype quirks (object vs str, int vs a float holding an int,
    None vs NaN vs NA), so equal data gives an equal fingerprint and any changed cell changes it.
    """
    return fingerprints(*frames)[0]


def fingerprints(*frames: pd.DataFrame) -> tuple[str, list[str]]:
    """`fingerprint(*frames)` and each frame's own `fingerprint(frame)`, in one pass over the rows."""
    whole, own = hashlib.sha256(), [hashlib.sha256(b"frames:1\n") for _ in frames]
    whole.update(f"frames:{len(frames)}\n".encode())
    for df, h in zip(frames, own):
        def add(chunk: bytes, h=h) -> None:
            whole.update(chunk)
            h.update(chunk)

        add(_dump([str(c) for c in df.columns]) + b"\n")
        add(f"rows:{len(df)}\n".encode())
        for row in df.itertuples(index=False, name=None):
            add(_dump([canonical_value(v) for v in row]) + b"\n")
    return whole.hexdigest(), [h.hexdigest() for h in own]


def source_fingerprint(*paths: str | os.PathLike | None) -> str:
    """sha256 hex of the raw sources as stored: file bytes, or every file of a folder with its
    relative path; for a URI (`s3://...`), each object's path, size and modification time.

    Cheap to compute before any parsing, so a run can be named by its inputs before validation."""
    h = hashlib.sha256()
    for path in paths:
        if path is None:
            h.update(b"none\n")
            continue
        path = str(path)
        if "://" in path:
            _hash_uri(path, h)
            continue
        p = Path(path).expanduser()
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            h.update(f"file:{f.relative_to(p) if p.is_dir() else f.name}\n".encode())
            try:
                with open(f, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
            except OSError as exc:
                raise DataError(f"{f}: cannot be read ({exc.strerror}). Fix: check data.train_path / data.eval_path.") from None
    return h.hexdigest()


def _hash_uri(uri: str, h) -> None:
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(uri)
        info = fs.get_file_info(root)
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True)) if info.type == pafs.FileType.Directory else [info]
    except (OSError, ValueError) as exc:
        raise DataError(f"{uri}: cannot be listed ({exc}). Fix: check the URI and the storage credentials.") from None
    for i in sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path):
        h.update(f"object:{i.path}:{i.size}:{i.mtime_ns}\n".encode())


def _dump(value) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=str).encode("utf-8")


def canonical_value(v):
    """A JSON-able, dtype-independent form of one cell (1 == 1.0 == np.int64(1); None == NaN == NA)."""
    if isinstance(v, (list, tuple, np.ndarray)):
        return {"list": [canonical_value(x) for x in v]}
    if isinstance(v, dict):
        return {"dict": sorted(((str(k), canonical_value(x)) for k, x in v.items()), key=lambda kv: kv[0])}
    if v is None or v is pd.NA or v is pd.NaT:
        return None
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if math.isnan(f):
            return None
        if f.is_integer():
            return int(f)
        return {"float": repr(f)}
    if isinstance(v, str):
        return v
    if isinstance(v, bytes):
        return {"bytes": v.hex()}
    return {type(v).__name__: str(v)}
