"""Labelled multiple-choice VQA from local files, for measuring what merging costs in accuracy.

The layout is the one MMStar, MMBench, RealWorldQA and the lmms-eval / VLMEvalKit TSV exports share.
One row per question, with the columns

- ``index``: the row's id (the data-row number when the column is absent);
- ``question``; optional ``hint`` (context shown before the question);
- options ``A``, ``B``, ... up to ``H``: at least two, consecutive from ``A`` (rows may have fewer
  than the file: MMBench mixes 2- and 4-option rows);
- ``answer``: the correct option's letter;
- ``image``: base64 image bytes (an optional ``data:...;base64,`` prefix is dropped), a JSON list of
  them for several images; or ``image_path``: a path (or JSON list of paths) relative to the dataset
  file's folder. Parquet may also hold raw image bytes or Hugging Face ``{"bytes", "path"}`` structs.
- optional ``category`` (else ``l2-category`` / ``l2_category``).

Other columns are ignored. A cell that is empty, null, NaN or the text ``nan`` (what pandas writes for a
missing value) counts as missing. Files are read by extension: ``.tsv``, ``.jsonl``, ``.parquet``.

Errors name the file and the 1-based *data row* as a user counts them: for TSV the header is not a
row (row 1 is the line after it; a quoted cell may span lines), for JSONL row n is line n. Rows are
read lazily, so ``limit`` stops early and a bad row past the limit is never seen. Blank lines at the
end of a file are ignored; a blank row followed by more rows is an error.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import math
import re
from collections.abc import Iterator, Mapping
from contextlib import closing
from itertools import islice
from pathlib import Path
from typing import Any

from PIL import Image

from .demo_vqa import demo_item, demo_split
from .items import (
    LETTERS,
    MCQItem,
    options_problem,
)

SUFFIXES = (".tsv", ".jsonl", ".parquet")
#: The instruction for models scored by the likelihood of each option's text (``answer="text"``).
_MISSING_TEXTS = ("", "nan")


class DatasetError(ValueError):
    """A dataset file or row that cannot be used: ``{path}: row {n}: {reason}`` (or ``{path}: {reason}``)."""


class _RowError(Exception):
    """Reason a row is malformed; `read_dataset` adds the path and row number."""


# ---------------------------------------------------------------------------------------------
# Cells and images
# ---------------------------------------------------------------------------------------------


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in _MISSING_TEXTS


def _text(row: Mapping[str, Any], key: str) -> str | None:
    value = row.get(key)
    if _is_missing(value):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a numeric option or index that a table stored as float
    return str(value).strip()


def _open_image(data: bytes, what: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise _RowError(f"{what} is not a decodable image ({exc})") from None


def _decode_base64(text: str, what: str) -> Image.Image:
    text = "".join(text.split())
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _RowError(f"{what} is not valid base64 ({exc})") from None
    return _open_image(data, what)


def _load_file(path_text: str, base_dir: Path) -> Image.Image:
    path = Path(path_text)
    path = path if path.is_absolute() else base_dir / path
    if not path.is_file():
        raise _RowError(f"image file not found: {path}")
    return _open_image(path.read_bytes(), f"image file {path}")


def _as_list(value: Any, column: str) -> list[Any]:
    """A cell holding one value or several: a list, or a string with a JSON list in it."""
    if isinstance(value, list | tuple):
        return list(value)
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            raise _RowError(f"{column} looks like a JSON list but is not valid JSON ({exc})") from None
        if not isinstance(parsed, list):
            raise _RowError(f"{column} must be a JSON list of strings")
        return parsed
    return [value]


def _image(value: Any, column: str, position: int, base_dir: Path) -> Image.Image:
    what = f"{column} {position}" if position else column
    if isinstance(value, bytes | bytearray):
        return _open_image(bytes(value), what)
    if isinstance(value, Mapping):  # Hugging Face Image feature: {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return _open_image(bytes(value["bytes"]), what)
        if value.get("path"):
            return _load_file(str(value["path"]), base_dir)
    if not isinstance(value, str) or not value.strip():
        raise _RowError(f"{what} must be a non-empty string, got {type(value).__name__}")
    return _decode_base64(value, what) if column == "image" else _load_file(value.strip(), base_dir)


def _images(row: Mapping[str, Any], base_dir: Path) -> tuple[Image.Image, ...]:
    for column in ("image", "image_path"):
        value = row.get(column)
        if _is_missing(value):
            continue
        values = _as_list(value, column)
        if not values:
            raise _RowError(f"{column} is an empty list")
        many = len(values) > 1
        return tuple(_image(v, column, i + 1 if many else 0, base_dir) for i, v in enumerate(values))
    raise _RowError("no image: the row needs 'image' (base64) or 'image_path'")


# ---------------------------------------------------------------------------------------------
# Rows -> items
# ---------------------------------------------------------------------------------------------


def _options(row: Mapping[str, Any]) -> dict[str, str]:
    return {letter: text for letter in LETTERS if (text := _text(row, letter)) is not None}


def _item(row: Mapping[str, Any], number: int, base_dir: Path) -> MCQItem:
    if all(_is_missing(value) for value in row.values()):
        raise _RowError("empty row")
    question = _text(row, "question")
    if not question:
        raise _RowError("missing question")
    options = _options(row)
    answer = (_text(row, "answer") or "").upper()
    if not answer:
        raise _RowError("missing answer")
    reason = options_problem(options, answer)
    if reason:
        raise _RowError(reason)
    category = _text(row, "category") or _text(row, "l2-category") or _text(row, "l2_category")
    return MCQItem(
        index=_text(row, "index") or str(number),
        question=question,
        options=options,
        answer=answer,
        images=_images(row, base_dir),
        category=category,
        hint=_text(row, "hint"),
    )


def _require_columns(path: Path, columns: list[str]) -> None:
    """Catch a wrong file (or separator) once, instead of failing every row the same way."""
    missing = [c for c in ("question", "answer", "A") if c not in columns]
    if "image" not in columns and "image_path" not in columns:
        missing.append("image or image_path")
    if missing:
        raise DatasetError(
            f"{path}: missing columns {missing} (found {columns[:12]}); the layout needs index, question, "
            "A, B (up to H), answer and image (base64) or image_path"
        )


# Each reader yields (row number, row) with None for a blank row.
_Rows = Iterator[tuple[int, dict[str, Any] | None]]


def _tsv_rows(path: Path) -> _Rows:
    previous_limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # base64 images exceed csv's default 128 KiB cell limit
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle, delimiter="\t")
            header = next(reader, None)
            if header is None:
                raise DatasetError(f"{path}: empty file (no header line)")
            header = [column.strip() for column in header]
            _require_columns(path, header)
            for number, fields in enumerate(reader, start=1):
                if not fields or all(not f.strip() for f in fields):
                    yield number, None
                elif len(fields) != len(header):
                    raise DatasetError(
                        f"{path}: row {number}: has {len(fields)} tab-separated fields, the header has {len(header)}"
                    )
                else:
                    yield number, dict(zip(header, fields, strict=True))
    finally:
        csv.field_size_limit(previous_limit)


def _jsonl_rows(path: Path) -> _Rows:
    with path.open(encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                yield number, None
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}: row {number}: bad JSON line ({exc})") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{path}: row {number}: expected a JSON object, got {type(row).__name__}")
            yield number, row


def _parquet_rows(path: Path) -> _Rows:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetError(f"{path}: reading parquet needs pyarrow (pip install 'pyarrow>=15')") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a file that is not parquet
        raise DatasetError(f"{path}: not a readable parquet file ({exc})") from None
    _require_columns(path, parquet.schema_arrow.names)
    number = 0
    for batch in parquet.iter_batches(batch_size=64):
        for row in batch.to_pylist():
            number += 1
            yield number, row


_READERS = {".tsv": _tsv_rows, ".jsonl": _jsonl_rows, ".parquet": _parquet_rows}


def _iter_items(path: Path) -> Iterator[MCQItem]:
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DatasetError(f"{path}: unknown dataset format {path.suffix or '(no extension)'!r}; supported: {SUFFIXES}")
    if not path.is_file():
        raise DatasetError(f"{path}: no such dataset file")
    first_blank: int | None = None
    for number, row in reader(path):
        if row is None:
            first_blank = first_blank or number
            continue
        if first_blank is not None:
            raise DatasetError(f"{path}: row {first_blank}: empty row")
        try:
            yield _item(row, number, path.parent)
        except _RowError as exc:
            raise DatasetError(f"{path}: row {number}: {exc}") from None


def read_dataset(path: str | Path, *, limit: int | None = None) -> list[MCQItem]:
    """The first `limit` (all when None) items of a .tsv, .jsonl or .parquet file (see the module
    docstring), or of a built-in dataset named in BUILTIN_DATASETS (generated, no file)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    if str(path) in BUILTIN_DATASETS:
        return _builtin(str(path), limit)
    path = Path(path)
    with closing(_iter_items(path)) as rows:  # closing restores csv's field size limit at once
        items = list(islice(rows, limit))
    if not items:
        raise DatasetError(f"{path}: no data rows")
    return items


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _row(item: MCQItem, letters: str, nested_images: bool) -> dict[str, Any]:
    images = [_png_base64(image) for image in item.images]
    image: Any = images[0] if len(images) == 1 else (images if nested_images else json.dumps(images))
    row: dict[str, Any] = {"index": item.index, "question": item.question, "hint": item.hint}
    row |= {letter: item.options.get(letter) for letter in letters}
    row |= {"answer": item.answer, "category": item.category, "image": image}
    return row


def write_dataset(items: list[MCQItem], path: str | Path) -> None:
    """Write items in the layout `read_dataset` reads (by extension); images as base64 PNG.

    Several images per row become a JSON list (a real list in JSONL, its JSON text in TSV and parquet).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DatasetError(f"{path}: unknown dataset format {suffix or '(no extension)'!r}; supported: {SUFFIXES}")
    if any(not item.images for item in items):
        raise DatasetError(f"{path}: every item needs at least one image to be readable again")
    letters = LETTERS[: max((len(item.options) for item in items), default=2)]
    rows = [_row(item, letters, nested_images=suffix == ".jsonl") for item in items]
    columns = ["index", "question", "hint", *letters, "answer", "category", "image"]
    if suffix == ".tsv":
        _write_tsv(rows, columns, path)
    elif suffix == ".jsonl":
        lines = [json.dumps({k: v for k, v in row.items() if v is not None}) for row in rows]
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    else:
        _write_parquet(rows, columns, path)


def _write_tsv(rows: list[dict[str, Any]], columns: list[str], path: Path) -> None:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([["" if row[c] is None else row[c] for c in columns] for row in rows])


def _write_parquet(rows: list[dict[str, Any]], columns: list[str], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(column, pa.string()) for column in columns])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


# ---------------------------------------------------------------------------------------------
# Built-in datasets
# ---------------------------------------------------------------------------------------------

#: Dataset names that need no file: the demo VQA benchmark's splits (`profiler.demo_vqa`).
#: ``demo`` is the test split.
BUILTIN_DATASETS = ("demo", "demo:test", "demo:val")


def _builtin(name: str, limit: int | None) -> list[MCQItem]:
    split = "test" if name == "demo" else name.split(":", 1)[1]
    return demo_split(split, limit)


def make_demo_dataset(n: int, *, seed: int = 0, image_size: int = 224) -> list[MCQItem]:
    """`n` demo VQA items from the seed stream ``seed{seed}`` (disjoint from train/val/test), at `image_size`."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    return [demo_item(f"seed{seed}", i, image_size=image_size) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------

_WHOLE = re.compile(r"^\W*([A-Ha-h])\W*$")
_EXPLICIT = re.compile(
    r"\b(?:answer|option|choice)s?\b(?:\s+(?:is|would\s+be|should\s+be))?\s*[:\-]?\s*(?:option\s+)?"
    r"(?:\(([A-Ha-h])\)|([A-H])(?![A-Za-z'])|([a-h])(?=[.)]|\s*$))",
    re.IGNORECASE,
)
_LEADING = re.compile(r"^\W*?\(?([A-Ha-h])(?:\)|\.|:)")
_BRACKETED = re.compile(r"\(([A-H])\)")
_STANDALONE = re.compile(r"(?<![A-Za-z'])([A-H])(?![A-Za-z'])")
_ARTICLE = re.compile(r"A\s+[a-z]")


def _normal(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _by_text(text: str, options: Mapping[str, str]) -> str | None:
    answer = _normal(text)
    texts = {letter: _normal(option) for letter, option in options.items() if _normal(option)}
    exact = [letter for letter, option in texts.items() if option == answer]
    if len(exact) == 1:
        return exact[0]
    found = [letter for letter, option in texts.items() if re.search(rf"\b{re.escape(option)}\b", answer)]
    longest = max(found, key=lambda letter: len(texts[letter]), default=None)
    if longest and all(texts[letter] in texts[longest] for letter in found):
        return longest
    return None


def _valid(letter: str, options: Mapping[str, str]) -> str | None:
    """A letter the answer clearly chose but that is not an option is a wrong answer, not a cue to guess on."""
    return letter.upper() if letter.upper() in options else None


def parse_choice(text: str, options: Mapping[str, str]) -> str | None:
    """The option letter a generated answer chose, or None when it cannot be told.

    Rules, first that decides wins (a letter only counts if it is one of `options`):

    1. the whole answer is one letter, maybe with punctuation: "B", "b", "B.", "(B)", "**C**";
    2. an explicit phrase: "The answer is B", "Answer: (c)", "the correct option is D", "Option B";
       after such a phrase a lowercase letter counts only before ")", "." or the end, so
       "the answer is a red circle" is not read as A;
    3. a leading letter with ")", "." or ":" after it: "B. red", "b) red", "(C) three", "D: no";
    4. exactly one bracketed letter anywhere: "I pick (B) because ...";
    5. exactly one capital letter standing alone, where "A" followed by a lowercase word is the
       article: "I think it is B" -> B, "A red square" -> no letter here;
    6. the option text: the answer equals one option's text, or contains exactly one option's text
       as whole words (or several where the longest contains the others: "dark red" over "red").

    A letter that decides but is not an option (an "E" to an A-D question), several different letters
    at rule 4 or 5, or nothing at all give None.
    """
    if not text or not text.strip() or not options:
        return None
    text = text.strip()
    if match := _WHOLE.match(text):
        return _valid(match.group(1), options)
    if match := _EXPLICIT.search(text):
        return _valid(next(group for group in match.groups() if group), options)
    if match := _LEADING.match(text):
        return _valid(match.group(1), options)
    for pattern in (_BRACKETED, _STANDALONE):
        hits = {m.group(1) for m in pattern.finditer(text) if not _ARTICLE.match(text, m.start())}
        if len(hits) == 1:
            return _valid(hits.pop(), options)
        if hits:
            return None
    return _by_text(text, options)
