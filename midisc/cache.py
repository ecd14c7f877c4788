"""`python -m midisc.cache`: look into, check and merge the disk activation caches (`activations.cache_dir`).

    python -m midisc.cache show FOLDER                 what made a cache, its rows, and one line per shard
    python -m midisc.cache verify FOLDER               every file's size and sha256 against the manifest;
                                                       exit status 1 when one differs
    python -m midisc.cache merge PART... --into ROOT   one cache at ROOT/<key>/ from the part folders of a
                                                       harvest split across machines ({"part": "0/2"}, …),
                                                       or from the roots they were harvested into (each
                                                       hook's parts become that hook's cache)

FOLDER is one cache, <cache root>/<key>/ with its manifest.json. Every command takes --json (for scripts).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from midisc.cli import Command, UsageError, make_console, make_table, number, parse_subcommands, print_json, run_tool
from midisc.data.cache import human
from midisc.data.merge import merge_into, part_groups
from midisc.data.shards import load_manifest, verify


def cache_folder(path: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder; give a cache folder (<cache root>/<key>/, with manifest.json)")
    return folder


def say(console: Console, line: str) -> None:
    console.print(line, markup=False, highlight=False, soft_wrap=True)


def totals(shards: list[dict]) -> dict:
    """The whole cache's figures from its shards': means weighted by rows."""
    rows = sum(s["rows"] for s in shards)
    mean = (lambda key: sum(s["stats"][key] * s["rows"] for s in shards) / rows if rows else None)
    return {"rows": rows, "bytes": sum(s["bytes"] for s in shards), "mean_norm": mean("mean_norm"),
            "max_norm": max((s["stats"]["max_norm"] for s in shards), default=None),
            "mean_sq_norm": mean("mean_sq_norm")}


def cmd_show(args: argparse.Namespace, console: Console) -> int:
    folder = cache_folder(args.folder)
    manifest = load_manifest(folder)
    shards, heldout = manifest["shards"], manifest["heldout"]
    if args.json:
        print_json({"folder": str(folder), **manifest, "totals": totals(shards)})
        return 0
    say(console, f"cache {folder} (format {manifest['format']}, key {manifest['key']}, made {manifest['created']})")
    say(console, f"  producer: {', '.join(f'{k}={v!r}' for k, v in manifest['producer'].items())}")
    held = f"{heldout['file']} ({human(heldout['bytes'])})" if heldout else "none"
    say(console, f"  {manifest['rows']:,} vectors × {manifest['d']}, {manifest['dtype']}, in {len(shards)} shard(s) of "
                 f"up to {manifest['shard_rows']:,} rows; token ids: {'yes' if manifest['token_ids'] else 'no'}; "
                 f"held-out: {held}")
    table = make_table(console, "shard", "rows", "first", "size", "mean norm", "max norm", "mean sq norm", "sha256",
                       right=("rows", "first", "size", "mean norm", "max norm", "mean sq norm"))
    for s in shards:
        table.add_row(s["file"], number(s["rows"]), number(s["first"]), human(s["bytes"]),
                      number(s["stats"]["mean_norm"], 4), number(s["stats"]["max_norm"], 4),
                      number(s["stats"]["mean_sq_norm"], 4), s["sha256"][:16])
    if len(shards) > 1:
        t = totals(shards)
        table.add_row("all", number(t["rows"]), "", human(t["bytes"]), number(t["mean_norm"], 4),
                      number(t["max_norm"], 4), number(t["mean_sq_norm"], 4), "")
    console.print(table)
    return 0


def cmd_verify(args: argparse.Namespace, console: Console) -> int:
    folder = cache_folder(args.folder)
    manifest = load_manifest(folder)  # not a cache at all is a usage error (exit 2), not a damaged one (exit 1)
    problems = verify(folder)
    files = len(manifest["shards"]) + bool(manifest["heldout"])
    if args.json:
        print_json({"folder": str(folder), "sound": not problems, "files": files, "problems": problems})
    elif problems:
        for problem in problems:
            say(console, problem)
        say(console, f"{len(problems)} problem(s) in {folder}: the cache is damaged; delete it (the next run "
                     "harvests again) or copy it anew")
    else:
        say(console, f"{folder}: all {files} file(s) match the sizes and sha256 of the manifest "
                     f"({manifest['rows']:,} vectors)")
    return 1 if problems else 0


def cmd_merge(args: argparse.Namespace, console: Console) -> int:
    groups = part_groups([cache_folder(part) for part in args.parts])
    merged = []
    for parts in groups:  # one harvest per hook: a split harvest of several hooks leaves a part of each per root
        folder = merge_into(parts, Path(args.into), log=lambda line: None if args.json else say(console, line))
        manifest = load_manifest(folder)
        merged.append({"folder": str(folder), "parts": [str(p) for p in parts], "rows": manifest["rows"],
                       "shards": len(manifest["shards"]), "producer": manifest["producer"]})
        if not args.json:
            say(console, f"{folder}: the whole harvest of {len(parts)} part(s), {manifest['rows']:,} vectors in "
                         f"{len(manifest['shards'])} shard(s); runs of this producer under {args.into} reuse it")
    if args.json:
        print_json(merged[0] if len(merged) == 1 else merged)
    return 0


def _folder_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", metavar="FOLDER", help="a cache folder, <cache root>/<key>/ with manifest.json")


def _merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("parts", nargs="+", metavar="PART",
                        help="the complete cache folders of the parts, or the cache roots they were harvested into")
    parser.add_argument("--into", required=True, metavar="ROOT",
                        help="the cache root that gets the merged folder as <key>/ (activations.cache_dir)")


COMMANDS: dict[str, Command] = {
    "show": Command("what made a cache, its rows, and one line per shard with its norms", cmd_show,
                    _folder_argument),
    "verify": Command("every file's size and sha256 against the manifest (exit status 1 if one differs)",
                      cmd_verify, _folder_argument),
    "merge": Command("one cache under ROOT from the parts of a harvest split across processes or machines",
                     cmd_merge, _merge_arguments),
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    return parse_subcommands("python -m midisc.cache", __doc__.split("\n")[0], COMMANDS, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    return COMMANDS[args.command].run(args, make_console())


if __name__ == "__main__":
    run_tool(main)
