import random

import pytest
import torch

from conftest import WORDS, make_tokenizer
from midisc.data import packing
from midisc.data.corpus import CorpusError
from midisc.data.packing import pack

LONG_LINE = " ".join(random.Random(0).choice(WORDS) for _ in range(6_000))  # ~35k characters, no newline


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


def test_long_documents_are_cut_at_whitespace_without_changing_the_tokens(tmp_path, monkeypatch):
    text = LONG_LINE[:30_000] + "  double  spaces\nand\tnewlines  "
    cut = packing.pieces(text, size=1000)
    assert "".join(cut) == text and all(len(p) <= 1000 for p in cut)
    assert all(p[0].isspace() for p in cut[1:])
    assert packing.pieces("x" * 2500, size=1000) == ["x" * 1000, "x" * 1000, "x" * 500]  # no space: cut anyway
    tokenizer = make_tokenizer(tmp_path)
    whole = pack([text, "tail"], tokenizer, context_size=16, separator_id=0)
    monkeypatch.setattr(packing, "PIECE_CHARS", 1000)
    monkeypatch.setattr(packing, "GROUP_CHARS", 4000)
    # Byte-level BPE keeps a word's leading space with the word, so cutting before whitespace changes no token.
    assert torch.equal(pack([text, "tail"], tokenizer, context_size=16, separator_id=0), whole)


def test_pack_too_few_tokens_is_an_error():
    with pytest.raises(CorpusError, match="fewer than one context of 64"):
        pack(["ab"], CharTokenizer(), context_size=64, separator_id=0)


@pytest.mark.parametrize("piece_chars", [100_000, 7])  # the huge document whole, or in pieces across groups
def test_a_document_longer_than_max_doc_tokens_is_cut_with_a_warning(caplog, monkeypatch, piece_chars):
    monkeypatch.setattr(packing, "PIECE_CHARS", piece_chars)
    monkeypatch.setattr(packing, "GROUP_CHARS", 20)
    huge = "".join(chr(97 + i % 26) for i in range(5000))
    with caplog.at_level("WARNING"):
        whole = pack(["abcd", huge, "xyz"], CharTokenizer(), context_size=4, separator_id=0, max_doc_tokens=5000)
        assert caplog.text == ""
        capped = pack(["abcd", huge, "xyz"], CharTokenizer(), context_size=4, separator_id=0, max_doc_tokens=10)
    assert whole.numel() == (5 + 5001 + 4) // 4 * 4
    # each document keeps at most its first 10 tokens: the first and last whole, the huge one cut
    assert capped.flatten().tolist() == [97, 98, 99, 100, 0, *[ord(c) for c in huge[:10]], 0, 120, 121, 122, 0]
    assert "1 document(s) hold more than max_doc_tokens=10 tokens (the longest 5,000 characters)" in caplog.text
    assert "max_doc_tokens=null" in caplog.text
