"""Texts into contexts: tokenised, documents joined by one separator token, as language models were pretrained,
and cut into rows of fixed length. The separator and position 0 carry huge activation norms and are dropped
downstream.
"""

from __future__ import annotations

import logging

import torch

from midisc.data.corpus import CorpusError

log = logging.getLogger(__name__)


# A fast tokenizer works on one document at a time, on one core, in memory that grows with it: a single
# 20 MB line took 14 s and 2.7 GB in SmolLM2's tokenizer (50 MB: 48 s, 6 GB). Longer documents are cut at
# whitespace into pieces of this many characters first (20 MB: 3.5 s, 0.1 GB). A cut just before whitespace
# changes no token for byte-level BPE (GPT-2, SmolLM2), which keeps a word's leading space with the word;
# other tokenizers may differ at the cuts alone.
PIECE_CHARS = 100_000
# Characters tokenised per call: the tokenizer's bookkeeping (token strings, offsets, masks) then lives for one
# group only, and the ids are kept as int64 (8 bytes a token rather than ~40 in Python lists).
GROUP_CHARS = 2_000_000


def pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """`text` cut into pieces of at most `size` characters, each cut just before whitespace where there is any."""
    out, start = [], 0
    while len(text) - start > size:
        end = start + size
        cut = max(text.rfind(space, start + size // 2, end) for space in " \n\t")
        cut = end if cut <= start else cut  # no whitespace in the second half: cut inside a word
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


def _groups(texts: list[str]):
    """(pieces, whether each piece ends its document), about GROUP_CHARS characters at a time."""
    group: list[str] = []
    ends: list[bool] = []
    size = 0
    for text in texts:
        parts = pieces(text)
        for i, part in enumerate(parts):
            group.append(part)
            ends.append(i == len(parts) - 1)
            size += len(part)
            if size >= GROUP_CHARS:
                yield group, ends
                group, ends, size = [], [], 0
    if group:
        yield group, ends


# A cap on a document's tokens is applied to its characters first, so a 5 MB single-line file is not tokenised
# whole only to be cut: no tokenizer we know averages more characters per token than this.
MAX_CHARS_PER_TOKEN = 16


def _tokenise(texts: list[str], tokenizer, separator_id: int,
              max_doc_tokens: int | None = None) -> tuple[torch.Tensor, list[int]]:
    """The ids of every text, each followed by `separator_id`, as one LongTensor; with `max_doc_tokens`, only
    each text's first that many. Also the indices of the texts that were cut."""
    if max_doc_tokens is not None:
        texts = [text[: max_doc_tokens * MAX_CHARS_PER_TOKEN] for text in texts]
    chunks = [torch.zeros(0, dtype=torch.long)]
    cut: list[int] = []
    doc, in_doc = 0, 0  # the document the next piece belongs to, and the tokens of it kept so far
    for group, ends in _groups(texts):
        flat: list[int] = []
        for ids, last in zip(tokenizer(group, add_special_tokens=False, verbose=False)["input_ids"], ends):
            if max_doc_tokens is not None and in_doc + len(ids) > max_doc_tokens:
                ids = ids[: max(max_doc_tokens - in_doc, 0)]
                if not cut or cut[-1] != doc:
                    cut.append(doc)
            flat.extend(ids)
            in_doc += len(ids)
            if last:
                flat.append(separator_id)
                doc, in_doc = doc + 1, 0
        chunks.append(torch.tensor(flat, dtype=torch.long))
    return torch.cat(chunks), cut


def pack(texts: list[str], tokenizer, context_size: int, separator_id: int,
         bos_id: int | None = None, max_doc_tokens: int | None = None) -> torch.Tensor:
    """Tokenise, join documents with `separator_id` and cut into contexts -> LongTensor [n, context_size].

    With `bos_id`, each context starts with it (models trained that way expect it). The last partial
    context is dropped so every row has the same length. With `max_doc_tokens`, a longer document keeps
    only its first that many tokens, with a warning: one huge file would otherwise be most of the data.
    """
    flat, cut = _tokenise(texts, tokenizer, separator_id, max_doc_tokens)
    if cut:
        longest = max(len(texts[i]) for i in cut)
        log.warning(f"{len(cut)} document(s) hold more than max_doc_tokens={max_doc_tokens} tokens (the longest "
                    f"{longest:,} characters) and were cut to their first {max_doc_tokens}; set max_doc_tokens=null "
                    "to keep every token")
    body = context_size - (bos_id is not None)
    n = len(flat) // body
    if n == 0:
        raise CorpusError(f"the texts hold {len(flat)} tokens, fewer than one context of {context_size}; "
                          "add texts or lower context_size")
    contexts = flat[: n * body].view(n, body)
    if bos_id is not None:
        contexts = torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), contexts], dim=1)
    return contexts
