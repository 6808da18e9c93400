import base64
import csv
import io
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from profiler.datasets import DatasetError, make_demo_dataset, parse_choice, read_dataset, write_dataset
from profiler.items import ANSWER_INSTRUCTION, MCQItem, option_letters


def _png(colour: tuple[int, int, int], size: tuple[int, int] = (8, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _b64(colour: tuple[int, int, int], size: tuple[int, int] = (8, 6)) -> str:
    return base64.b64encode(_png(colour, size)).decode()


def _pixels(image: Image.Image) -> tuple:
    return image.mode, image.size, image.tobytes()


def _same(a: MCQItem, b: MCQItem) -> bool:
    fields = ("index", "question", "options", "answer", "category", "hint")
    return all(getattr(a, f) == getattr(b, f) for f in fields) and [_pixels(i) for i in a.images] == [
        _pixels(i) for i in b.images
    ]


def _write_tsv(path, header: list[str], rows: list[list[str]]) -> None:
    path.write_text("\n".join("\t".join(line) for line in [header, *rows]) + "\n")


def _row(**fields) -> dict:
    return {
        "index": "1",
        "question": "What colour?",
        "A": "red",
        "B": "blue",
        "answer": "A",
        "image": _b64((255, 0, 0)),
    } | fields


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".tsv", ".jsonl", ".parquet"])
def test_write_then_read_round_trips(tmp_path, suffix):
    items = make_demo_dataset(5, seed=3, image_size=112)
    two_images = MCQItem(
        "x",
        "Which is brighter?",
        {"A": "first", "B": "second", "C": "same"},
        "B",
        (items[0].images[0], items[1].images[0]),
        hint='Look\tclosely,\n"both" images.',
    )
    items.append(two_images)
    path = tmp_path / f"demo{suffix}"
    write_dataset(items, path)
    back = read_dataset(path)
    assert len(back) == 6 and all(_same(a, b) for a, b in zip(items, back, strict=True))
    assert len(back[-1].images) == 2 and back[-1].hint == two_images.hint and list(back[-1].options) == ["A", "B", "C"]


def test_tsv_cells_larger_than_csvs_default_limit(tmp_path):
    noise = Image.frombytes("RGB", (256, 256), random.Random(0).randbytes(256 * 256 * 3))
    item = MCQItem("1", "q", {"A": "x", "B": "y"}, "B", (noise,))
    write_dataset([item], tmp_path / "big.tsv")
    assert len((tmp_path / "big.tsv").read_text()) > 2 * csv.field_size_limit()
    assert _pixels(read_dataset(tmp_path / "big.tsv")[0].images[0]) == _pixels(noise)
    assert csv.field_size_limit() == 131072  # restored


def test_hand_written_tsv_with_image_path_relative_to_the_file(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(_png((0, 255, 0), (10, 12)))
    (tmp_path / "imgs" / "b.png").write_bytes(_png((0, 0, 255)))
    data = tmp_path / "data"
    data.mkdir()
    _write_tsv(
        data / "bench.tsv",
        ["index", "question", "A", "B", "C", "D", "answer", "image_path", "category", "l2-category"],
        [
            ["10", "Is it green?", "yes", "no", "", "", "A", "../imgs/a.png", "colour", "perception"],
            ["11", "How many?", "1", "2", "3", "4", "d", '["../imgs/a.png", "../imgs/b.png"]', "", "count"],
        ],
    )
    first, second = read_dataset(data / "bench.tsv")
    assert (first.index, first.options, first.answer, first.category) == ("10", {"A": "yes", "B": "no"}, "A", "colour")
    assert _pixels(first.images[0]) == ("RGB", (10, 12), Image.new("RGB", (10, 12), (0, 255, 0)).tobytes())
    assert second.answer == "D" and second.category == "count" and len(second.images) == 2
    assert second.images[1].getpixel((0, 0)) == (0, 0, 255)


def test_pandas_style_tsv_quoting_nan_hint_and_extra_columns(tmp_path):
    """What VLMEvalKit writes: an unnamed index column, quoted cells with newlines, 'nan' for missing."""
    path = tmp_path / "mmbench.tsv"
    line = "\t".join(
        ["0", "7", '"A ""quoted""\nquestion"', "nan", "up", "down", "nan", "nan", "B", "RGBA ok", _b64((1, 2, 3))]
    )
    path.write_text(
        "\t".join(["", "index", "question", "hint", "A", "B", "C", "D", "answer", "note", "image"])
        + "\n"
        + line
        + "\n\n"
    )
    (item,) = read_dataset(path)
    assert item.question == 'A "quoted"\nquestion' and item.hint is None and item.options == {"A": "up", "B": "down"}
    assert item.images[0].getpixel((0, 0)) == (1, 2, 3)


def test_jsonl_with_an_image_list_and_data_uri(tmp_path):
    rows = [
        _row(
            image=[_b64((9, 9, 9)), "data:image/png;base64," + _b64((200, 100, 0))],
            hint="Two pictures.",
            category="cmp",
        ),
        {"question": "Pick", "A": 1, "B": 2, "C": None, "answer": "b", "image": _b64((0, 0, 0))},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first, second = read_dataset(path)
    assert [im.getpixel((0, 0)) for im in first.images] == [(9, 9, 9), (200, 100, 0)]
    assert first.prompt() == ("<image>\n<image>\nTwo pictures.\nWhat colour?\nA. red\nB. blue\n" + ANSWER_INSTRUCTION)
    assert (second.index, second.options, second.answer) == ("2", {"A": "1", "B": "2"}, "B")


def test_parquet_with_raw_bytes_and_hugging_face_image_structs(tmp_path):
    path = tmp_path / "hf.parquet"
    table = pa.table(
        {
            "index": [1, 2],
            "question": ["q1", "q2"],
            "A": ["a", "c"],
            "B": ["b", "d"],
            "answer": ["A", "B"],
            "image": [{"bytes": _png((5, 6, 7)), "path": None}, {"bytes": _png((8, 9, 10)), "path": "x.png"}],
            "l2_category": ["p", None],
        }
    )
    pq.write_table(table, path)
    first, second = read_dataset(path)
    assert first.index == "1" and first.category == "p" and first.images[0].getpixel((0, 0)) == (5, 6, 7)
    assert second.category is None and second.images[0].getpixel((0, 0)) == (8, 9, 10)


def test_limit_stops_before_a_bad_row(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(_row()) + "\n" + json.dumps(_row(index="2")) + "\n{not json\n")
    assert [item.index for item in read_dataset(path, limit=2)] == ["1", "2"]
    with pytest.raises(DatasetError, match="row 3: bad JSON line"):
        read_dataset(path, limit=3)
    with pytest.raises(ValueError, match="limit must be a positive integer or None, got 0"):
        read_dataset(path, limit=0)


def test_prompt_escapes_markers_and_to_sample_validates():
    item = MCQItem("1", "Compare <image> and <video>", {"A": "x", "B": "y"}, "A", (Image.new("RGB", (4, 4)),))
    assert item.prompt().startswith("<image>\nCompare [image] and [video]\nA. x\nB. y\n")
    item.to_sample().validate()
    assert option_letters({"C": "z", "A": "x", "B": "y"}) == ["A", "B", "C"]


def test_demo_dataset_is_deterministic():
    a, b = make_demo_dataset(12, seed=1, image_size=112), make_demo_dataset(12, seed=1, image_size=112)
    assert all(_same(x, y) for x, y in zip(a, b, strict=True))
    assert not all(_same(x, y) for x, y in zip(a, make_demo_dataset(12, seed=2, image_size=112), strict=True))
    assert {item.category for item in a} == {"colour", "shape", "count", "position", "presence"}
    for item in a:
        assert len(item.options) == 4 and item.answer in item.options and item.images[0].size == (112, 112)
    assert len({item.answer for item in a}) > 1


# ---------------------------------------------------------------------------------------------
# Malformed rows
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (_row(question=""), "missing question"),
        (_row(question=None), "missing question"),
        (_row(answer="C"), r"answer 'C' is not one of the row's options A, B"),
        (_row(answer=""), "missing answer"),
        (_row(B=None), r"needs at least 2 options, found 1 \(A\)"),
        (_row(C="z", D="w", B=None), "options must be consecutive from A in letter order, got A, C, D"),
        (_row(image="not base64!!"), "image is not valid base64"),
        (_row(image=base64.b64encode(b"plain text").decode()), "image is not a decodable image"),
        (_row(image=[_b64((1, 1, 1)), "@@"]), "image 2 is not valid base64"),
        (_row(image="[1, "), "image looks like a JSON list but is not valid JSON"),
        (_row(image=None, image_path="missing.png"), "image file not found: .*missing.png"),
        (_row(image=None), "no image: the row needs 'image' \\(base64\\) or 'image_path'"),
        ({k: None for k in _row()}, "empty row"),
    ],
)
def test_malformed_jsonl_rows_are_rejected_with_row_number_and_reason(tmp_path, bad, reason):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_row()) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DatasetError, match=rf"bad.jsonl: row 2: {reason}"):
        read_dataset(path)


def test_malformed_lines(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(_row())
    path.write_text(good + "\n\n" + good + "\n")
    with pytest.raises(DatasetError, match="bad.jsonl: row 2: empty row"):
        read_dataset(path)
    path.write_text(good + "\n" + good + "\n\n\n")  # blank lines at the end are fine
    assert len(read_dataset(path)) == 2
    path.write_text(good + "\n[1, 2]\n")
    with pytest.raises(DatasetError, match="row 2: expected a JSON object, got list"):
        read_dataset(path)
    path.write_text(good + '\n{"question": \n')
    with pytest.raises(DatasetError, match="row 2: bad JSON line"):
        read_dataset(path)


def test_malformed_tsv_rows_count_data_rows_after_the_header(tmp_path):
    path = tmp_path / "bad.tsv"
    header = ["index", "question", "A", "B", "answer", "image"]
    good = ["1", "q", "x", "y", "A", _b64((0, 0, 0))]
    _write_tsv(path, header, [good, good, ["3", "q", "x", "y", "E", _b64((0, 0, 0))]])
    with pytest.raises(DatasetError, match=r"bad.tsv: row 3: answer 'E' is not one of the row's options A, B"):
        read_dataset(path)
    _write_tsv(path, header, [good, ["2", "q", "x"]])
    with pytest.raises(DatasetError, match="bad.tsv: row 2: has 3 tab-separated fields, the header has 6"):
        read_dataset(path)
    _write_tsv(path, header, [good, [""] * 6, good])
    with pytest.raises(DatasetError, match="bad.tsv: row 2: empty row"):
        read_dataset(path)


def test_file_level_errors(tmp_path):
    with pytest.raises(
        DatasetError, match=r"unknown dataset format '.csv'; supported: \('.tsv', '.jsonl', '.parquet'\)"
    ):
        read_dataset(tmp_path / "x.csv")
    with pytest.raises(DatasetError, match="x.tsv: no such dataset file"):
        read_dataset(tmp_path / "x.tsv")
    _write_tsv(tmp_path / "cols.tsv", ["index", "question", "A", "B", "image"], [])
    with pytest.raises(DatasetError, match=r"cols.tsv: missing columns \['answer'\]"):
        read_dataset(tmp_path / "cols.tsv")
    _write_tsv(tmp_path / "none.tsv", ["question", "A", "B", "answer", "image"], [])
    with pytest.raises(DatasetError, match="none.tsv: no data rows"):
        read_dataset(tmp_path / "none.tsv")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DatasetError, match="junk.parquet: not a readable parquet file"):
        read_dataset(tmp_path / "junk.parquet")


def test_item_validates_its_options():
    with pytest.raises(ValueError, match="answer 'C' is not one of the row's options A, B"):
        MCQItem("1", "q", {"A": "x", "B": "y"}, "C", ())


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------

OPTIONS = {"A": "red", "B": "dark red", "C": "a blue circle", "D": "3"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", "B"),
        ("b", "B"),
        (" B.\n", "B"),
        ("(C)", "C"),
        ("**D**", "D"),
        ("The answer is B.", "B"),
        ("the answer is c", "C"),
        ("Answer: (A)", "A"),
        ("The correct option is D because there are three shapes.", "D"),
        ("Option C", "C"),
        ("B. dark red", "B"),
        ("b) dark red", "B"),
        ("(A) red", "A"),
        ("D: 3", "D"),
        ("I would pick (C) here.", "C"),
        ("I think it is B", "B"),
        ("red", "A"),
        ("Dark red.", "B"),
        ("It is dark red", "B"),
        ("A blue circle", "C"),
        ("There are 3 shapes.", "D"),
        ("E", None),
        ("The answer is E", None),
        ("Either B or C", None),
        ("", None),
        ("I am not sure.", None),
        ("red or 3", None),
    ],
)
def test_parse_choice(text, expected):
    assert parse_choice(text, OPTIONS) == expected


def test_parse_choice_respects_the_rows_options():
    assert parse_choice("C", {"A": "yes", "B": "no"}) is None
    assert parse_choice("no", {"A": "yes", "B": "no"}) == "B"
