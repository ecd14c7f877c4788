"""One cache folder from the parts of a harvest split across processes or machines.

Each part is a complete cache folder (shards.py) made from a disjoint part of the contexts, by a producer equal
to the others' but for a `part` entry ({"part": "0/2"}). The merged folder hard-links the parts' shards (they
are never written again; copies where links fail), renumbers them in the order the parts are given, and gets a
manifest of its own whose producer is the common one less `part`: under a cache root as <cache_key(**producer)>/,
`SharedCache.open` finds it as if one job had harvested it all (merge_into puts it there).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

from midisc.data.cache import flocked, remove
from midisc.data.shards import (HELDOUT_FILE, MANIFEST_FILE, ShardError, cache_key, complete_manifest, fsync_dir,
                                load_manifest, make_manifest, shard_name, size_problems, sync_file, write_synced)

PART_LABEL = re.compile(r"(\d+)/(\d+)")  # "0/2": the first of a harvest split in two


def check_parts(parts: list[Path]) -> tuple[list[dict], dict]:
    """The parts' manifests and the producer they share but for `part`; ShardError when they cannot be merged."""
    if not parts:
        raise ShardError("merge needs at least one part folder")
    manifests = []
    for part in parts:
        manifest = load_manifest(part)
        if problems := size_problems(part, manifest):
            raise ShardError(f"{problems[0]}; run python -m midisc.cache verify {part}")
        manifests.append(manifest)
    base, labels = {k: v for k, v in manifests[0]["producer"].items() if k != "part"}, {}
    for part, manifest in zip(parts, manifests):
        producer = {k: v for k, v in manifest["producer"].items() if k != "part"}
        if differ := sorted(k for k in base.keys() | producer.keys() if base.get(k) != producer.get(k)):
            raise ShardError(f"{part} was made by another producer than {parts[0]}: " + ", ".join(
                f"{k}={producer.get(k)!r} there, {base.get(k)!r} here" for k in differ))
        label = manifest["producer"].get("part")
        if str(label) in labels:
            raise ShardError(f"{labels[str(label)]} and {part} are both part {label!r}: one part given twice")
        labels[str(label)] = part
    if all(PART_LABEL.fullmatch(label) for label in labels):  # "i/n": a merge of some parts would pass for the whole
        split = {label: tuple(map(int, label.split("/"))) for label in labels}
        n = {total for _, total in split.values()}
        if len(n) > 1 or {index for index, _ in split.values()} != set(range(next(iter(n)))):
            raise ShardError(f"the parts are {', '.join(sorted(labels))}: not every part of one split "
                             f"(i/n for each i in 0..n-1 exactly once)")
    for field in ("dtype", "d", "token_ids"):  # the width only where known, token ids only where there are rows
        among = [(p, m) for p, m in zip(parts, manifests)
                 if field == "dtype" or (m["d"] is not None if field == "d" else m["rows"] > 0)]
        for other, manifest in among[1:]:
            if manifest[field] != among[0][1][field]:
                raise ShardError(f"cannot merge: {other} has {field}={manifest[field]!r} but {among[0][0]} has "
                                 f"{field}={among[0][1][field]!r}; the parts of one harvest agree on it")
    held = {m["heldout"]["sha256"]: part for part, m in zip(parts, manifests) if m["heldout"]}
    if len(held) > 1:
        raise ShardError(f"{' and '.join(map(str, held.values()))} hold different held-out sets; a merged cache "
                         "has one: harvest the held-out contexts in one part only")
    return manifests, base


def link_or_copy(source: Path, target: Path) -> bool:
    """Hard-link `source` at `target` (shards are never written again); copy it where links fail. True if linked."""
    try:
        os.link(source, target)
        return True
    except OSError:  # EXDEV across file systems, EPERM where links are not allowed, EMLINK…
        shutil.copyfile(source, target)
        sync_file(target)
        return False


def merge(parts: list[Path], into: Path, log: Callable[[str], None] = lambda line: None) -> dict:
    """Join the complete cache folders of a harvest split across processes or machines into `into`; its manifest.

    Each part holds a disjoint part of the contexts, and its producer equals the others' but for a `part` entry
    ({"part": "0/2"}). The shards keep their rows and order and are renumbered; the manifest is made anew, with
    the common producer less `part`, so `into` may be <root>/<cache_key(**producer)> (merge_into puts it
    there, holding the key's lock). It appears with one rename: a merge cut short leaves no folder at `into`.
    """
    parts, into = [Path(p) for p in parts], Path(into)
    manifests, producer = check_parts(parts)
    if into.exists():
        raise ShardError(f"{into} already exists; merge into a folder that does not")
    into.parent.mkdir(parents=True, exist_ok=True)
    partial = into.parent / f"{into.name}.partial-merge-{os.getpid()}-{secrets.token_hex(4)}"
    partial.mkdir()
    try:
        shards, copied, first = [], 0, 0
        for part, manifest in zip(parts, manifests):
            for entry in manifest["shards"]:  # bytes, sha256 and stats stay true of the very same file
                name = shard_name(len(shards))
                copied += not link_or_copy(part / entry["file"], partial / name)
                shards.append({**entry, "file": name, "first": first})
                first += entry["rows"]
        heldout = next(((part, m["heldout"]) for part, m in zip(parts, manifests) if m["heldout"]), None)
        if heldout:
            copied += not link_or_copy(heldout[0] / heldout[1]["file"], partial / HELDOUT_FILE)
        if copied:
            log(f"{copied} file(s) copied: hard links from the parts to {into.parent} failed (another file system?)")
        manifest = make_manifest(producer=producer, dtype=manifests[0]["dtype"],
                                 d=next((m["d"] for m in manifests if m["d"] is not None), None),
                                 shard_rows=max(m["shard_rows"] for m in manifests), shards=shards,
                                 token_ids=any(m["token_ids"] for m in manifests if m["rows"]),
                                 heldout=heldout and {**heldout[1], "file": HELDOUT_FILE})
        write_synced(partial / MANIFEST_FILE, json.dumps(manifest, indent=1, default=str).encode())
        fsync_dir(partial)
        os.rename(partial, into)
        fsync_dir(into.parent)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return manifest


def merge_into(parts: list[Path], root: Path, log: Callable[[str], None] = print) -> Path:
    """Merge the parts into root/<key>/, where SharedCache.open finds the whole harvest; that folder.

    The key's lock is held exclusive meanwhile: a job harvesting the same producer finishes first, and no
    eviction takes the partial folder for a dead harvest's. An incomplete folder there (a harvest cut short,
    format 1) is replaced, as SharedCache.open would. A complete one is kept, and nothing merged: it holds the same
    vectors, by the same producer (a merge run twice, or a whole harvest made meanwhile).
    """
    _, producer = check_parts([Path(p) for p in parts])
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    folder = root / cache_key(**producer)
    kept = f"{folder} already holds a complete cache of this producer; nothing merged"
    if complete_manifest(folder) is not None:  # before the lock: jobs reading that cache would hold us up
        log(kept)
        return folder
    with flocked(root / f"{folder.name}.lock"):
        if complete_manifest(folder) is not None:
            log(kept)
            return folder
        remove(folder)
        merge(parts, folder, log)
    return folder


def part_groups(paths: list[Path]) -> list[list[Path]]:
    """The part folders under `paths`, grouped by the harvest they belong to: a path is a part folder itself, or
    a cache root whose complete part folders all count (a split harvest of several hooks leaves one per hook in
    each part's root). Groups in the order first met; ShardError when a path holds no part."""
    groups: dict[str, list[Path]] = {}
    for path in map(Path, paths):
        if (path / MANIFEST_FILE).is_file():
            folders = [path]
        else:
            found = [(p, complete_manifest(p)) for p in sorted(path.iterdir()) if p.is_dir()] if path.is_dir() else []
            folders = [p for p, manifest in found if manifest is not None and "part" in manifest["producer"]]
        if not folders:
            raise ShardError(f"{path} holds no part of a split harvest: give part folders (<root>/<key>/) or the "
                             "cache roots the parts were harvested into")
        for folder in folders:
            producer = {k: v for k, v in load_manifest(folder)["producer"].items() if k != "part"}
            groups.setdefault(cache_key(**producer), []).append(folder)
    return list(groups.values())
