"""The named checks `python -m midisc.verify` runs on a run's published files, each PASS, FAIL or SKIP.

A check reads the files as they are on disk (never trusting that our own writer produced them) and,
where the run is in the database, compares them with what training recorded. A check that cannot run
(no database record, no model, SAELens not installed) is SKIP with the reason, never a silent PASS.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from midisc.publish.check_target import (FAIL, PASS, SKIP, Check, Failure, Skipped, Target, need_record, read_json,
                                         read_tensors)
from midisc.publish.dashboard import ACTIVATION_FIELDS, FEATURE_FIELDS, META_FILES, check_row
from midisc.publish.neuronpedia import PACKAGE_FILES
from midisc.publish.saelens import log10_density
from midisc.sae.io import load_sae
from midisc.run_folder import (ANALYSIS_FILENAME, CFG_FILENAME, DECODER_FILENAME, METADATA_FILENAME, MODEL_FILENAME,
                               PROBE_FILENAME, SPARSITY_FILENAME, WEIGHTS_FILENAME)

# A unit-norm row, up to float32 rounding of the last normalisation step.
NORM_TOLERANCE = 1e-3
# Reloaded outputs against those recorded at training: float32 arithmetic on the same inputs.
RELOAD_TOLERANCE = 1e-4


# --- the checks --------------------------------------------------------------------------------
def files_present(t: Target) -> str:
    wanted = [t.sae_dir / name for name in (CFG_FILENAME, WEIGHTS_FILENAME, SPARSITY_FILENAME)]
    if t.expect_neuronpedia:
        for folder, pattern, what in ((t.package_dir, "*_neuronpedia", "Neuronpedia package"),
                                      (t.dashboard_dir, "exports/*/*", "dashboard export")):
            if folder is None:
                found = sorted(p.relative_to(t.output_dir).as_posix() for p in t.output_dir.glob(pattern))
                if found:
                    raise Failure(f"several {what} folders ({', '.join(found)}); remove the stale ones")
                raise Failure(f"no {what} folder ({pattern}) in {t.output_dir}; run python -m midisc.export")
        wanted += [t.package_dir / name for name in PACKAGE_FILES]
        wanted += [t.dashboard_dir / name for name in META_FILES]
    missing = [str(p) for p in wanted if not p.is_file()]
    if missing:
        raise Failure(f"missing {', '.join(missing)}")
    if t.dashboard_dir is not None:
        features = sorted(p.name for p in (t.dashboard_dir / "features").glob("batch-*.jsonl.gz"))
        acts = sorted(p.name for p in (t.dashboard_dir / "activations").glob("batch-*.jsonl.gz"))
        if not features or features != acts:
            raise Failure(f"dashboard batches differ: features {features} vs activations {acts}")
        wanted += [Path(name) for name in features]
    return f"{len(wanted)} files"


def shapes(t: Target) -> str:
    cfg, w = t.cfg, t.weights
    d_in, d_sae = cfg.get("d_in"), cfg.get("d_sae")
    d_out = cfg.get("d_out", d_in)  # a transcoder's decoder writes another activation, of its own width
    arch = str(cfg.get("architecture"))
    expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out), "b_enc": (d_sae,), "b_dec": (d_out,)}
    if arch.startswith("jumprelu"):  # JumpReLU, and BatchTopK saved as one: a threshold per feature
        expected["threshold"] = (d_sae,)
    if "skip_transcoder" in arch:  # a learnt linear path from input to output
        expected["W_skip"] = (d_out, d_in)
    if arch == "gated":  # no b_enc: a gate bias and a magnitude path sharing W_enc
        del expected["b_enc"]
        expected.update(b_gate=(d_sae,), r_mag=(d_sae,), b_mag=(d_sae,))
    if set(w) != set(expected):
        raise Failure(f"weights hold {sorted(w)}, expected {sorted(expected)}")
    for name, shape in expected.items():
        if tuple(w[name].shape) != shape:
            raise Failure(f"{name} has shape {tuple(w[name].shape)} but cfg.json (d_in={d_in}, d_sae={d_sae}, "
                          f"d_out={d_out}) needs {shape}")
    if tuple(t.sparsity.shape) != (d_sae,):
        raise Failure(f"sparsity has shape {tuple(t.sparsity.shape)}, expected ({d_sae},)")
    if "k" in cfg and not 1 <= cfg["k"] <= d_sae:
        raise Failure(f"k={cfg['k']} in cfg.json is outside 1..{d_sae}")
    if t.package_dir is not None:
        if tuple(t.decoder_npy.shape) != (d_sae, d_out):
            raise Failure(f"{DECODER_FILENAME} has shape {tuple(t.decoder_npy.shape)}, expected ({d_sae}, {d_out})")
        for name, shape in expected.items():
            got = tuple(t.model_pt[name].shape) if name in t.model_pt else None
            if got != shape:
                raise Failure(f"{MODEL_FILENAME} {name} has shape {got}, expected {shape}")
    return f"d_in {d_in}, d_sae {d_sae}" + (f", d_out {d_out}" if d_out != d_in else "")


def finite(t: Target) -> str:
    tensors = {**{f"{WEIGHTS_FILENAME}:{k}": v for k, v in t.weights.items()}, SPARSITY_FILENAME: t.sparsity}
    if t.package_dir is not None:
        tensors[DECODER_FILENAME] = t.decoder_npy
        tensors.update({f"{MODEL_FILENAME}:{k}": v for k, v in t.model_pt.items()})
    for name, tensor in tensors.items():
        bad = int((~torch.isfinite(tensor.float())).sum())
        if bad:
            raise Failure(f"{name} has {bad} NaN or infinite values")
    return f"{len(tensors)} tensors"


def decoder_unit_norm(t: Target) -> str:
    norms = t.weights["W_dec"].float().norm(dim=1)
    worst = int((norms - 1).abs().argmax())
    if abs(float(norms[worst]) - 1) > NORM_TOLERANCE:
        raise Failure(f"decoder row {worst} has norm {float(norms[worst]):.6f}, expected 1 ± {NORM_TOLERANCE}")
    return f"max |norm - 1| = {abs(float(norms[worst]) - 1):.1e}"


def copies_agree(t: Target) -> str:
    if t.package_dir is None:
        raise Skipped("no Neuronpedia package to compare")
    if not torch.equal(t.decoder_npy.float(), t.weights["W_dec"].float()):
        raise Failure(f"{DECODER_FILENAME} differs from W_dec in {WEIGHTS_FILENAME}")
    for name, tensor in t.weights.items():
        if name not in t.model_pt or not torch.equal(t.model_pt[name].float(), tensor.float()):
            raise Failure(f"{MODEL_FILENAME} {name} differs from {WEIGHTS_FILENAME}")
    return "package weights equal the SAELens weights"


def matches_record(t: Target) -> str:
    need_record(t)
    cfg, run, config = t.cfg, t.run, t.run["config"]
    meta = cfg.get("metadata") or {}
    pairs = [("architecture", cfg.get("architecture"), t.saved["architecture"]),
             ("d_in", cfg.get("d_in"), t.saved["d_in"]), ("d_sae", cfg.get("d_sae"), t.saved["d_sae"]),
             ("metadata.model_name", meta.get("model_name"), run["model"]),
             ("metadata.hook_name", meta.get("hook_name"), run["hook"]),
             ("metadata.context_size", meta.get("context_size"), config["context_size"])]
    if "k" in config["sae"]:
        pairs.append(("k", cfg.get("k"), config["sae"]["k"]))
    if t.package_dir is not None:
        package = read_json(t.package_file(METADATA_FILENAME))
        pairs += [("neuronpedia model", package.get("model"), run["model"]),
                  ("neuronpedia hook", package.get("hook"), run["hook"]),
                  ("neuronpedia layer", package.get("layer"), run["layer"]),
                  ("neuronpedia width", package.get("width"), t.saved["d_sae"]),
                  ("neuronpedia architecture", package.get("architecture"), run["architecture"])]
    for what, found, recorded in pairs:
        if found != recorded:
            raise Failure(f"{what} is {found!r} in the files but {recorded!r} in the database (run {run['id']})")
    return f"{len(pairs)} fields agree with run {run['id']}"


def checksum(t: Target) -> str:
    need_record(t)
    from midisc.publish.write import sha256

    digest = sha256(t.sae_dir / WEIGHTS_FILENAME)
    if digest != t.saved["checksum"]:
        raise Failure(f"SHA-256 of {WEIGHTS_FILENAME} is {digest[:16]}…, recorded {t.saved['checksum'][:16]}…")
    return digest[:16] + "…"


def reload_outputs(t: Target) -> str:
    path = t.output_dir / PROBE_FILENAME
    if not path.is_file():
        raise Skipped(f"no {PROBE_FILENAME} in {t.output_dir} (recorded at the end of training)")
    probe = read_tensors(path)
    try:
        sae = load_sae(t.sae_dir)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        raise Failure(f"the SAE folder does not load: {err}") from None
    with torch.no_grad():
        out = sae(probe["x"])
    for name, got in (("codes", out.codes), ("x_hat", out.x_hat)):
        diff = float((got - probe[name]).abs().max())
        if not diff <= RELOAD_TOLERANCE * max(1.0, float(probe[name].abs().max())):
            raise Failure(f"reloaded {name} differ from those recorded at training by up to {diff:.3g}")
    return f"{len(probe['x'])} recorded vectors reproduced"


def saelens_loads(t: Target) -> str:
    try:
        from sae_lens import SAE
    except ImportError:
        raise Skipped("SAELens is not installed (pip install sae-lens to check)") from None
    path = t.output_dir / PROBE_FILENAME
    if not path.is_file():
        raise Skipped(f"no {PROBE_FILENAME} to compare with")
    probe = read_tensors(path)
    try:
        sae = SAE.load_from_disk(str(t.sae_dir))
    except Exception as err:  # whatever SAELens raises, the reason is what matters
        raise Failure(f"SAELens cannot load the folder: {err}") from None
    with torch.no_grad():
        # A transcoder takes its input alone; the probe keeps input and output side by side.
        diff = float((sae(probe["x"][..., :sae.cfg.d_in]) - probe["x_hat"]).abs().max())
    if not diff <= RELOAD_TOLERANCE * max(1.0, float(probe["x_hat"].abs().max())):
        raise Failure(f"SAELens outputs differ from midisc's by up to {diff:.3g}")
    return f"SAE.load_from_disk reproduces midisc's outputs (max diff {diff:.1e})"


def fresh_reconstruction(t: Target) -> str:
    need_record(t)
    if t.measure_fvu is None:
        raise Skipped("the run's model is not available (or --no-model)")
    recorded = t.run.get("fvu")
    if recorded is None:
        raise Skipped("the run has no recorded FVU")
    fvu, tokens = t.measure_fvu()
    allowed = max(t.fvu_tolerance, t.fvu_tolerance * recorded)
    if not abs(fvu - recorded) <= allowed:
        raise Failure(f"FVU on {tokens:,} fresh tokens is {fvu:.4f}, recorded {recorded:.4f} (allowed ± {allowed:.3f})")
    return f"FVU {fvu:.4f} on {tokens:,} fresh tokens, recorded {recorded:.4f}"


def dashboard_schema(t: Target) -> str:
    d_sae = t.cfg["d_sae"]
    meta = {name: t.rows(name) for name in META_FILES}
    for name, rows in meta.items():
        if len(rows) != 1 or not isinstance(rows[0], dict):
            raise Failure(f"{name} should hold one JSON object, holds {len(rows)} lines")
    source = meta["source.jsonl"][0]
    seen: list[int] = []
    n_acts, ids = 0, set()
    for path in sorted((t.dashboard_dir / "features").glob("*.jsonl.gz")):
        for row in t.rows(f"features/{path.name}"):
            problem = check_row(row, FEATURE_FIELDS)
            if problem is None and (row["layer"] != source.get("id") or row["modelId"] != source.get("modelId")):
                problem = f"layer/modelId {row['layer']!r}/{row['modelId']!r} are not source {source.get('id')!r}"
            if problem is None and len(row["freq_hist_data_bar_heights"]) != len(row["freq_hist_data_bar_values"]):
                problem = "activation histogram heights and values differ in length"
            if problem:
                raise Failure(f"features/{path.name}: feature {row.get('index') if isinstance(row, dict) else '?'}: "
                              f"{problem}")
            seen.append(int(row["index"]))
    if sorted(seen) != list(range(d_sae)):
        raise Failure(f"feature rows cover {len(set(seen))} distinct indices ({len(seen)} rows), expected 0..{d_sae - 1}")
    for path in sorted((t.dashboard_dir / "activations").glob("*.jsonl.gz")):
        for row in t.rows(f"activations/{path.name}"):
            problem = check_row(row, ACTIVATION_FIELDS)
            if problem is None:
                values = row["values"]
                if len(values) != len(row["tokens"]) or not values:
                    problem = f"{len(row['tokens'])} tokens but {len(values)} values"
                elif not 0 <= int(row["index"]) < d_sae:
                    problem = f"feature index {row['index']} outside 0..{d_sae - 1}"
                elif not math.isclose(row["maxValue"], max(values), abs_tol=1e-5) \
                        or values[row["maxValueTokenIndex"]] != max(values):
                    problem = "maxValue / maxValueTokenIndex do not match the values"
                elif row["id"] in ids:
                    problem = f"duplicate id {row['id']}"
            if problem:
                raise Failure(f"activations/{path.name}: {problem}")
            ids.add(row["id"])
            n_acts += 1
    return f"{d_sae} feature rows, {n_acts} activation rows, 4 metadata files"


def dead_features(t: Target) -> str:
    counts: dict[str, int] = {}
    if t.features is not None:
        counts["database features"] = sum(bool(f["is_dead"]) for f in t.features)
        if t.run and t.run.get("dead_frac") is not None:
            counts["run dead_frac × d_sae"] = round(t.run["dead_frac"] * t.cfg["d_sae"])
        frequency = [f["frequency"] or 0.0 for f in t.features]
        if not torch.allclose(log10_density(frequency), t.sparsity.float(), atol=1e-4):
            raise Failure(f"{SPARSITY_FILENAME} does not match the recorded feature frequencies (re-analysed "
                          f"since it was written? python -m midisc.export {t.run['id'] if t.run else 'RUN'}{t.db} "
                          "writes it again)")
    if t.package_dir is not None:
        analysis = read_json(t.package_file(ANALYSIS_FILENAME))
        rows = analysis.get("features") or []
        counts[f"{ANALYSIS_FILENAME} flags"] = sum(bool(r.get("is_dead")) for r in rows)
        counts[f"{ANALYSIS_FILENAME} total"] = analysis.get("dead_features")
        counts[METADATA_FILENAME] = read_json(t.package_file(METADATA_FILENAME)).get("dead_features")
    if len(counts) < 2:
        raise Skipped("fewer than two sources of dead-feature counts (no database record or package)")
    if len(set(counts.values())) != 1:
        raise Failure("dead-feature counts disagree: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return f"{next(iter(counts.values()))} dead, agreed by {len(counts)} sources"


CHECKS: tuple[tuple[str, Callable[[Target], str]], ...] = (
    ("files present", files_present), ("shapes agree", shapes), ("weights finite", finite),
    ("decoder rows unit norm", decoder_unit_norm), ("package copies agree", copies_agree),
    ("files match the database", matches_record), ("checksum matches", checksum),
    ("reload reproduces outputs", reload_outputs), ("SAELens loads it", saelens_loads),
    ("fresh reconstruction", fresh_reconstruction), ("dashboard files valid", dashboard_schema),
    ("dead features agree", dead_features))


def run_checks(target: Target) -> list[Check]:
    results = []
    for name, check in CHECKS:
        try:
            results.append(Check(name, PASS, check(target)))
        except Skipped as why:
            results.append(Check(name, SKIP, str(why)))
        except Failure as why:
            results.append(Check(name, FAIL, str(why)))
        except (KeyError, TypeError, ValueError, IndexError) as err:  # malformed content a check did not foresee
            results.append(Check(name, FAIL, f"unexpected content: {type(err).__name__}: {err}"))
    return results
