"""What one `python -m midisc.train` invocation runs, and how each run is recorded: the runs of a job of several
hooks (`layers=[4,8,15,24]`, `hooks=[…]`), the sweep a run belongs to, a resumed run's config, the plan that
opens a run's log.

A job of several hooks is, to the database and the run folders, a sweep over the hook: one run per hook, each
with the config a single-hook run of it would have (so `resume=RUN` continues one alone), in a subfolder of
the job's folder, all with one sweep id.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf

from midisc.config import ConfigError, resolved, sae_class
from midisc.data import corpus
from midisc.store import Store, UnknownRunError, redact_url
from midisc.store.journal import Journal
from midisc.store.redaction import redact_text

SEVERAL_KEYS = ("layers", "hooks")  # top-level keys that make a job of several hooks


def several_hooks(cfg: DictConfig) -> bool:
    """Whether `cfg` asks for a job of several hooks (a non-null `layers` or `hooks`)."""
    return any(resolved(cfg, key) is not None for key in SEVERAL_KEYS)


def hook_jobs(cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    """(subfolder name, config of that hook's run) for each entry of `layers` and then `hooks`, checked: lists of
    distinct block indices and module paths, not with resume."""
    if resolved(cfg, "resume") is not None:
        raise ConfigError("resume continues one run: give resume=RUN alone, without layers=[…] or hooks=[…] "
                          "(each hook of a job is a run of its own)")
    jobs: list[tuple[str, DictConfig]] = []
    for key in SEVERAL_KEYS:
        values = resolved(cfg, key)
        if values is None:
            continue
        if not isinstance(values, ListConfig) or not len(values):
            example = "layers=[4,8,15]" if key == "layers" else "hooks=[model.layers.3,model.layers.3.mlp]"
            raise ConfigError(f"{key} must be a non-empty list, e.g. {example}; got {values!r}")
        if key == "layers" and any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
            raise ConfigError(f"layers must be block indices (integers >= 0), e.g. layers=[4,8,15]; got "
                              f"{OmegaConf.to_container(values)}")
        if key == "hooks" and any(not isinstance(v, str) or not v.strip() for v in values):
            raise ConfigError(f"hooks must be module paths, e.g. hooks=[model.layers.3,model.layers.3.mlp]; got "
                              f"{OmegaConf.to_container(values)}")
        if len(set(values)) < len(values):
            raise ConfigError(f"{key}={OmegaConf.to_container(values)} names one twice; each entry trains one SAE")
        for value in values:
            one = cfg.copy()
            for name in SEVERAL_KEYS:
                one[name] = None
            if key == "layers":
                one.layer = value
            else:
                one.model.hook = value
            jobs.append((f"{'layer' if key == 'layers' else 'hook'}={value}", one))
    return jobs


def job_overrides(overrides: list[str] | None, folder: str) -> list[str]:
    """A hook's run's overrides: the job's, its `layers=`/`hooks=` replaced by the run's own hook (`layer=8`)."""
    kept = [o for o in overrides or [] if o.split("=", 1)[0].lstrip("+~") not in SEVERAL_KEYS]
    return [*kept, folder.replace("hook=", "model.hook=", 1)]


def recorded_config(cfg: DictConfig) -> dict:
    """The resolved config as plain data, database password hidden."""
    data = OmegaConf.to_container(cfg, resolve=True)
    if data.get("storage", {}).get("url"):
        data["storage"]["url"] = redact_url(data["storage"]["url"])
    return data


def sweep_of_job() -> tuple[str | None, list[str] | None]:
    """(the sweep folder, absolute, when this job is one of a multirun; the job's overrides, passwords hidden)."""
    if not HydraConfig.initialized():
        return None, None
    hydra_cfg = HydraConfig.get()
    overrides = [redact_text(o) for o in hydra_cfg.overrides.task]
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None, overrides
    return str(Path(hydra_cfg.sweep.dir).resolve()), overrides


def resumed_config(cfg: DictConfig) -> tuple[DictConfig, Path]:
    """The config and folder of run `cfg.resume`, read from the database `cfg.storage.url` names."""
    if not cfg.storage.url:
        raise ConfigError("resume needs the database the run is recorded in; storage=none has none")
    if isinstance(cfg.resume, bool) or not isinstance(cfg.resume, int) or cfg.resume < 1:
        raise ConfigError(f"resume must be a run id (an integer >= 1), got {cfg.resume!r}")
    with Store(cfg.storage.url) as store:
        try:
            run = store.get_run(cfg.resume)
        except UnknownRunError as err:  # its message names the id, not the setting that gave it
            raise UnknownRunError(f"resume={cfg.resume}: {err}") from None
    if run["status"] == "completed":
        raise ConfigError(f"run {cfg.resume} is already completed; resume= continues a failed, interrupted or "
                          "killed run")
    stored = OmegaConf.create(run["config"])
    # Runs recorded before midisc/sae/ was a package name their class in a module that is gone.
    target = stored.get("sae", {}).get("_target_", "")
    for legacy in ("midisc.sae_jump.", "midisc.sae_gated."):
        if target.startswith(legacy):
            stored.sae._target_ = "midisc.sae." + target.removeprefix(legacy)
    for key in cfg:  # settings added to midisc since the run started keep their defaults
        if key not in stored:
            stored[key] = cfg[key]
    stored.storage.url = cfg.storage.url  # the recorded URL has its password hidden
    stored.resume = cfg.resume
    return stored, Path(run["output_dir"])


def plan(cfg: DictConfig, hook: str, run_id: int | None, split: corpus.Split) -> str:
    """What the run is about to do, in the few lines that open its log."""
    settings = "  ".join(f"{k}={v}" for k, v in cfg.sae.items() if k not in ("_target_", "kind"))
    optimizer = "  ".join(f"{k}={v}" for k, v in cfg.optimizer.items() if not k.startswith("_"))
    data = cfg.data.source + " " + str(cfg.data.get("name") or cfg.data.get("path") or cfg.data.get("package"))
    head = f"run {run_id}" if run_id is not None else "run (storage=none)"
    cls = sae_class(cfg)
    coder = cls.architecture + ("" if cls.is_transcoder else " SAE")
    return "\n".join([
        f"{head}: {coder} ({settings}) on {hook} of {cfg.model.name}",
        f"  data:       {data}: {len(split.train)} training and {len(split.heldout)} held-out texts "
        f"({split.duplicates} duplicate texts dropped before the split), contexts of {cfg.context_size} tokens",
        f"  training:   {cfg.epochs} epoch(s) in batches of {cfg.batch_size:,}; optimizer {optimizer}; seed {cfg.seed}",
        f"  database:   {redact_url(cfg.storage.url) if cfg.storage.url else 'none'}"])


def sync_command(journal: Journal) -> str:
    """The command that sends `journal` to its database; it finds the database in the file itself."""
    command = f"python -m midisc.db sync {journal.path}"
    if journal.header.password_hidden:  # say where it goes, the password being nowhere to be read
        command += f" --db '{journal.header.database}' (your password in place of ***, or set MIDISC_DB_URL)"
    return command
