"""The command line checked before Hydra reads it: each override it would refuse (unreadable syntax, a sweep
without -m, a group option that does not exist, a misspelt key, a value that cannot be merged) said in one
line naming it, where Hydra would say it in several lines or with a traceback, after making the run's folder.

`python -m midisc.train` runs `override_errors` on its arguments before handing them to Hydra; the values
of the composed config are checked afterwards, by `midisc.config.check_config`.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from midisc.config import ConfigError, resolved


HYDRA_FLAGS_WITH_VALUE = {"-c", "--cfg", "-p", "--package", "-cp", "--config-path", "-cn", "--config-name", "-cd",
                          "--config-dir", "--info", "-i", "--experimental-rerun"}


def _words_and_flags(argv: list[str]) -> tuple[list[str], set[str]]:
    """(the overrides of a command line, Hydra's flags in it): the value after a flag that takes one is neither."""
    words, flags, skip = [], set(), False
    for arg in argv:
        if arg.startswith("-"):
            flags.add(arg.split("=")[0])
        elif not skip:
            words.append(arg)
        skip = arg in HYDRA_FLAGS_WITH_VALUE
    return words, flags


def _first_value(override) -> str:
    return next(iter(override.sweep_string_iterator())) if override.is_sweep_override() else \
        override.get_value_element_as_str()


def misspelt_keys(argv: list[str], config_dir: str, config_name: str = "train") -> list[str]:
    """Hints for the command-line overrides that name no key of the config (`sae.expanson=16`): Hydra refuses
    them with its struct error and no suggestion; this says which key was probably meant.

    The config is composed with the overrides that choose groups (`sae=relu`, the first value of a sweep),
    so the keys offered are the ones of the config the user asked for."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    words, _ = _words_and_flags(argv)
    try:
        overrides = OverridesParser.create().parse_overrides(words)
    except Exception:  # override_errors says what is wrong with the syntax
        return []
    overrides = [o for o in overrides if o.type == OverrideType.CHANGE and not o.is_hydra_override()]
    groups = {p.name for p in Path(config_dir).iterdir() if p.is_dir()}
    choices = [f"{o.key_or_group}={_first_value(o)}" for o in overrides if o.key_or_group in groups]
    cfg, err = _compose(config_dir, config_name, choices)
    if err is not None:
        return []
    hints = []
    for o in overrides:
        key = o.key_or_group
        if key in groups or OmegaConf.select(cfg, key) is not None:
            continue
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if not isinstance(node, DictConfig) or leaf in node.keys():  # (`in node` is False for a ??? value)
            continue  # an existing key set to null, or a path through a value
        near = difflib.get_close_matches(leaf, [str(k) for k in node], n=1)
        where = f"a key of {parent}" if parent else "a config key"
        hints.append(f"{key} is not {where}; " + (f"did you mean {parent + '.' if parent else ''}{near[0]}?"
                                                  if near else f"its keys: {', '.join(map(str, node))}"))
    return hints


# Hydra flags that name another config: the overrides cannot be checked against conf/ then.
HYDRA_FLAGS_OTHER_CONFIG = {"-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir",
                            "--experimental-rerun"}
# Hydra's own composition messages end in lines that say where it looked, not what was wrong.
_HYDRA_TRAILERS = ("Config search path:", "Set the environment variable HYDRA_FULL_ERROR")


def override_errors(argv: list[str], config_dir: str, config_name: str = "train") -> list[str]:
    """What Hydra would refuse in the command line, each said in one line naming the override, before Hydra
    says it in several lines or with a traceback (exit 1): syntax it cannot read, a sweep without -m, a
    group option that does not exist, a misspelt key, a value that cannot be merged into the config; and a
    `resume` that does not resolve (`${nope}`), which main() would meet before check_config.

    A command line that composes costs one composition; only a refused one is looked at more closely."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType
    from hydra.errors import OverrideParseException

    words, flags = _words_and_flags(argv)
    if flags & HYDRA_FLAGS_OTHER_CONFIG:
        return []
    parser = OverridesParser.create()
    overrides = []
    for word in words:
        try:
            overrides.extend(parser.parse_overrides([word]))
        except OverrideParseException as err:
            return [_unreadable(word, err.message)]
    multirun = bool(flags & {"-m", "--multirun"})
    for o in overrides:
        if o.is_sweep_override() and not multirun:
            value = o.input_line.partition("=")[2]
            if o.value_type != ValueType.SIMPLE_CHOICE_SWEEP:  # range(), choice(), interval(), glob()
                return [f"{o.input_line} is a sweep, which Hydra runs only with -m (one job for each value)"]
            return [f"{o.input_line} lists several values, which Hydra sweeps over only with -m (one job each); "
                    f"for a list write {o.key_or_group}=[{value}], for text quote it: {o.key_or_group}='{value}'"]
    # A sweep's first job stands for the others: they differ only in the swept values.
    first = [f"{o.input_line.partition('=')[0]}={_first_value(o)}" if o.is_sweep_override() else o.input_line
             for o in overrides]
    cfg, err = _compose(config_dir, config_name, first)
    if err is None:
        try:  # main() reads `resume` before check_config can say that a ${...} in it does not resolve
            resolved(cfg, "resume")
        except ConfigError as unresolved:
            return [str(unresolved)]
        return []
    hints = misspelt_keys(argv, config_dir, config_name)
    if hints:
        return hints
    # The override whose addition breaks the composition: prefixes compose until it comes.
    low, high = 0, len(first)  # first[:low] composes, first[:high] does not
    while high - low > 1:
        middle = (low + high) // 2
        if _compose(config_dir, config_name, first[:middle])[1] is None:
            low = middle
        else:
            high = middle
    err = _compose(config_dir, config_name, first[:high])[1]
    culprit = overrides[high - 1] if high else None
    return [_composition_message(culprit, err, config_dir)]


def _unreadable(word: str, message: str) -> str:
    """One line for an override Hydra's grammar refuses, with the likely reason rather than the lexer's."""
    key, equal, value = word.partition("=")
    shown = word if word.isprintable() else repr(word)
    if not equal:
        return f"{shown} is not an override: it has no =; write key=value, or group=option"
    unquoted = re.sub(r"\\.", "", value)  # an escaped quote or bracket is part of the text
    if unquoted.count("'") % 2 or unquoted.count('"') % 2:
        reason = "a quote is not closed"
    elif any(unquoted.count(a) != unquoted.count(b) for a, b in ("[]", "{}", "()")):
        reason = "a bracket is not closed"
    else:
        reason = message.splitlines()[0].removeprefix("LexerNoViableAltException: ")
    return (f"{shown} is not an override Hydra can read: {reason}; quote a value that holds spaces, commas, "
            f"quotes or brackets: {key}='...' (a quote inside it as \\')")


def _compose(config_dir: str, config_name: str, overrides: list[str]) -> tuple[DictConfig | None, Exception | None]:
    """(the config, None), or (None, what Hydra raised composing it)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            return compose(config_name, overrides=overrides), None
    except Exception as err:  # Hydra raises its own exceptions, OmegaConf's and plain ValueErrors
        return None, err
    finally:
        GlobalHydra.instance().clear()


def _composition_message(override, err: Exception, config_dir: str) -> str:
    """One line for Hydra's refusal `err` of `override`, naming it and, for a group, its options."""
    from hydra.errors import MissingConfigException

    if err.__cause__ is not None and str(err.__cause__).strip():  # "Error merging override X", and why
        said = str(err.__cause__).strip().splitlines()[0]
    else:
        said = " ".join(line.strip() for line in str(err).splitlines()
                        if line.strip() and not line.startswith(_HYDRA_TRAILERS) and not line.startswith("\t"))
    if override is None:
        return f"the config cannot be composed: {said}"
    group = override.key_or_group
    folder = Path(config_dir) / group
    # A group's option is a name: `logger=1` or `model={}` Hydra refuses with a traceback or a struct error.
    if isinstance(err, MissingConfigException) or (group and folder.is_dir()
                                                       and not isinstance(override.value(), str)):
        options = err.options if getattr(err, "options", None) else sorted(p.stem for p in folder.glob("*.yaml"))
        return (f"{override.input_line} is not an option of the config group {group}; choose one of: "
                f"{', '.join(options)}")
    return f"{override.input_line} cannot be applied: {said}"
