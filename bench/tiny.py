"""A tiny random Llama and a folder of made-up texts, for the benchmarks' `--quick` modes.

Built the way tests/conftest.py builds its tiny model (a byte-level BPE trained on the texts, a LlamaConfig
with random weights, save_pretrained), so `model=tiny_llama model.name=FOLDER data=local data.path=FOLDER`
runs the real pipeline in seconds. Nothing is downloaded.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

WORDS = ("the market rose as shares in the bank fell after news of a merger between two firms "
         "the team won the match with a late goal and fans sang in the rain "
         "ministers said the election would be held in may after a vote in parliament "
         "engineers built a faster chip for mobile phones and the software update fixed a bug").split()


def make_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 120))).capitalize() + "." for _ in range(n)]


def write_texts(folder: Path, n: int, seed: int = 1) -> Path:
    """n documents as folder/docNNNNN.txt, for data=local."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(make_texts(n, seed)):
        (folder / f"doc{i:05d}.txt").write_text(doc)
    return folder


def build_model(folder: Path, layers: int = 4, hidden: int = 64) -> Path:
    """A random LlamaForCausalLM with its tokenizer, saved in folder; returns the folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast
    from transformers.utils import logging

    logging.disable_progress_bar()  # "Writing model shards" bars for a model of kilobytes
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(make_texts(200), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                        pad_token="<pad>")
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def run_overrides(folder: Path, texts: int) -> list[str]:
    """The overrides that point a `midisc.train` run at a fresh tiny model and `texts` documents in folder."""
    return ["experiment=tiny", f"model.name={build_model(folder / 'model')}",
            f"data.path={write_texts(folder / 'texts', texts)}"]
