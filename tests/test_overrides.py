"""The command line is checked before Hydra reads it: what Hydra would refuse in several lines is one line."""

import pytest

from conftest import CONF, run_cli
from midisc.overrides import misspelt_keys, override_errors


def test_misspelt_keys_accepts_keys_whose_value_is_still_missing():
    # data=local's path is ??? until given: a key that exists, not a typo
    assert misspelt_keys(["data=local", "data.path=/texts", "-m", "sae.k=8,16"], str(CONF)) == []
    assert misspelt_keys(["data=local", "data.pth=/texts"], str(CONF)) == [
        "data.pth is not a key of data; did you mean data.path?"]



@pytest.mark.parametrize("argv, message", [
    # Hydra: "Ambiguous value for argument ..." and three numbered lines
    (["sae.k=1,2"], "sae.k=1,2 lists several values, which Hydra sweeps over only with -m (one job each); for a list "
                    "write sae.k=[1,2], for text quote it: sae.k='1,2'"),
    (["layer=range(1,3)"], "layer=range(1,3) is a sweep, which Hydra runs only with -m"),
    # Hydra: "LexerNoViableAltException: ..." with a caret line and a link
    (["data.path='my texts"], "data.path='my texts is not an override Hydra can read: a quote is not closed; quote "
                              "a value that holds spaces, commas, quotes or brackets: data.path='...'"),
    (["sae.k=[1,2"], "sae.k=[1,2 is not an override Hydra can read: a bracket is not closed"),
    (["epochs"], "epochs is not an override: it has no =; write key=value, or group=option"),
    # Hydra: "Could not find 'sae/nope'", the options one per line, and the search path
    (["sae=nope"], "sae=nope is not an option of the config group sae; choose one of: batchtopk, gated, jumprelu, "
                   "matryoshka, relu, topk"),
    # Hydra: a traceback (ValueError: Config group override must be a string or a list. Got int)
    (["logger=12"], "logger=12 is not an option of the config group logger; choose one of: csv, none, wandb"),
    (["optimizer.betas={a:1}"], "optimizer.betas={a:1} cannot be applied: Cannot merge DictConfig with ListConfig"),
    (["~sae.nope"], "~sae.nope cannot be applied: Could not delete from config. 'sae.nope' does not exist."),
    (["sae.expanson=16"], "sae.expanson is not a key of sae; did you mean sae.expansion?"),
    (["resume=${nope}"], "resume cannot be resolved: Interpolation key 'nope' not found"),  # main() reads it first
])
def test_overrides_hydra_would_refuse_in_several_lines_are_one_line(argv, message):
    errors = override_errors(argv, str(CONF))
    assert len(errors) == 1 and errors[0].startswith(message) and "\n" not in errors[0], errors


@pytest.mark.parametrize("argv", [[], ["-m", "sae.k=8,16"], ["sae.k=[8]"], ["sae=relu", "sae.l1_coef=1e-3"],
                                  ["+sae.d_sae=64"], ["--cfg", "job", "layer=3"], ["-cn", "other", "nope=1,2"],
                                  ["hydra.run.dir=runs/x", "data=local", "data.path='my texts'"]])
def test_overrides_hydra_accepts_pass(argv):
    assert override_errors(argv, str(CONF)) == []


def test_cli_refuses_what_hydra_would_refuse_in_one_line(tmp_path):
    proc = run_cli(["midisc.train", "sae.k=8,16", "storage.url=null"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: sae.k=8,16 lists several values"), \
        proc.stderr[-2000:]
