"""handler.offline: the rows, chunking rule and writers the offline job shares, local and on Ray."""

import json

import pytest

from handler.config import HandlerConfig
from handler.errors import ImageError
from handler.offline import (RowWriter, as_columns, expand, from_columns, images_per_call, read_rows, row)

ROWS = [row("a.jpg", {"cat": 0.9, "dog": 0.1}), row("b.png", ImageError("invalid_image", "not an image")),
        row("c.jpg", {"dog": 0.6, "cat": 0.4})]


def test_a_row_per_file_a_result_or_an_error():
    assert ROWS[0] == {"path": "a.jpg", "label": "cat", "scores": {"cat": 0.9, "dog": 0.1}}
    assert ROWS[1] == {"path": "b.png", "error": "invalid_image", "reason": "not an image"}


def test_columns_keep_every_row_and_come_back_equal():
    columns = as_columns(ROWS)
    assert columns["label"] == ["cat", None, "dog"] and columns["error"] == [None, "invalid_image", None]
    assert json.loads(columns["scores"][2]) == {"dog": 0.6, "cat": 0.4}
    assert from_columns(columns) == ROWS


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_the_writer_writes_rows_as_they_come_and_reads_back(tmp_path, suffix):
    out = tmp_path / f"rows{suffix}"
    with RowWriter(out) as writer:
        writer.write(ROWS[:2])
        writer.write([])
        writer.write(ROWS[2:])
    assert (writer.rows, writer.failed) == (3, 1)
    assert read_rows(out) == ROWS
    with RowWriter(tmp_path / f"empty{suffix}"):
        pass
    assert read_rows(tmp_path / f"empty{suffix}") == []


def test_an_output_the_writer_does_not_know_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"must end in \.jsonl or \.parquet"):
        RowWriter(tmp_path / "rows.csv")


def test_the_chunking_rule_is_a_few_forward_batches():
    assert images_per_call(HandlerConfig(batch_size=8)) == 32


def test_expand_finds_images_in_folders_and_globs_in_order(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.jpg", "a.PNG", "notes.txt", "sub/c.webp"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in expand([str(tmp_path)])] == ["a.PNG", "b.jpg", "c.webp"]
    assert [p.name for p in expand([str(tmp_path / "*.jpg")])] == ["b.jpg"]
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        expand([str(tmp_path / "missing.jpg")])
