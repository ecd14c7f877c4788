"""Shared fixtures: tiny random models saved like real ones, a small text folder, and the real config, shrunk.

Nothing here downloads: the models come from transformers configs with random weights, their tokenizer
is a small byte-level BPE trained on the test texts.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import torch
from hydra import compose, initialize_config_dir
from sqlalchemy import create_engine, text

import midisc.config  # noqa: F401  registers the resolvers conf/ uses (midisc.dirname, midisc.postgres_url)

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
POSTGRES_URL = os.environ.get("MIDISC_TEST_POSTGRES_URL")

WORDS = ("the market rose as shares in the bank fell after news of a merger between two firms "
         "the team won the match with a late goal and fans sang in the rain "
         "ministers said the election would be held in may after a vote in parliament "
         "the film won an award and the singer released a new album on friday "
         "engineers built a faster chip for mobile phones and the software update fixed a bug").split()


def make_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 120))).capitalize() + "."
            for _ in range(n)]


def make_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(make_texts(200), trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                      pad_token="<pad>")
    wrapped.save_pretrained(folder)
    return wrapped


def build_tiny_model(folder: Path, kind: str) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig, PhiConfig

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(folder)
    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id,
                  bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = LlamaConfig(num_key_value_heads=2, **common) if kind == "llama" else PhiConfig(**common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_phi(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-phi"), "phi")


@pytest.fixture(scope="session")
def text_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("texts")
    for i, doc in enumerate(make_texts(60, seed=1)):
        (folder / f"doc{i:03d}.txt").write_text(doc)
    return folder


def tiny_overrides(model_dir: Path, texts: Path, db: Path | None, model: str = "tiny_llama",
                   sae: tuple[str, ...] = ("sae.k=8",)) -> list[str]:
    """The real config shrunk by conf/experiment/tiny.yaml to a run of seconds on a tiny model."""
    return ["experiment=tiny", f"model={model}", f"model.name={model_dir}", f"data.path={texts}", *sae,
            f"storage.url={'sqlite:///' + str(db) if db else 'null'}"]


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def run_cli(args: list[str], cwd: Path, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m midisc.<tool> args` in cwd the way a user would."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'runs.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def store(request) -> Iterator:
    """A Store on each backend (the PostgreSQL one skips without MIDISC_TEST_POSTGRES_URL)."""
    from midisc.store import Store

    url = request.getfixturevalue(f"{request.param}_url")
    store = Store(url)
    yield store
    store.close()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A URL whose connections see only a fresh schema, dropped afterwards.

    A schema per test (rather than dropping tables at teardown) also keeps these tests apart from
    anything else using the same database at the same time. The session time zone is set far from
    UTC so the tests prove timestamps are normalised rather than merely stored in UTC.
    """
    if not POSTGRES_URL:
        pytest.skip("set MIDISC_TEST_POSTGRES_URL to run the store tests on PostgreSQL")
    schema = f"midisc_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    options = quote(f"-csearch_path={schema} -ctimezone=America/New_York")
    separator = "&" if "?" in POSTGRES_URL else "?"
    try:
        yield f"{POSTGRES_URL}{separator}options={options}"
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(scope="session")
def planted_run(tmp_path_factory, tiny_llama, text_folder):
    """A recorded tiny run whose feature 0 fires exactly on one token, analysed (see planted.py)."""
    import planted
    from midisc import analyze

    found = planted.build(tmp_path_factory.mktemp("planted"), tiny_llama, text_folder)
    analyze.main([str(found.run_id), "--db", found.url])  # the examples of the planted SAE replace training's
    return found


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_llama, text_folder):
    """One completed tiny run (SQLite), trained once per session: (its work folder, its run id). Read it only;
    a test that changes files or rows takes `published`, a private copy."""
    from midisc.train import train

    work = tmp_path_factory.mktemp("published")
    result = train(compose_config(tiny_overrides(tiny_llama, text_folder, work / "runs.db")), work / "out")
    return work, result.run_id


@pytest.fixture
def published(trained_run, tmp_path):
    """A private copy of the run folder and its database, the database pointing at the copy:
    (run folder, database URL, run id)."""
    import shutil
    import sqlite3

    work, run_id = trained_run
    shutil.copytree(work / "out", tmp_path / "out")
    shutil.copy(work / "runs.db", tmp_path / "runs.db")
    with sqlite3.connect(tmp_path / "runs.db") as db:
        db.execute("UPDATE training_runs SET output_dir = ?", (str(tmp_path / "out"),))
        db.execute("UPDATE sae_models SET path = ?", (str(tmp_path / "out" / "sae"),))
    return tmp_path / "out", f"sqlite:///{tmp_path / 'runs.db'}", run_id
