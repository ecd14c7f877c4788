"""Try a text: which features of a run fire on which tokens of any text a person types.

The run's language model runs only up to the hooked block (`lm.capture` stops the forward there) and the
run's SAE encodes what it gives; nothing is filtered, so every token shows. Models are loaded once and kept
(one per model, however many runs share it); SAEs once per run. Loading is the slow part (seconds); an
answer after that is a forward of a few blocks on a short text (tens of milliseconds on 2 CPU cores).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from midisc.data import lm
from midisc.data.recipe import Recipe, Tokens
from midisc.sae import SparseAutoencoder

MAX_CHARS = 4000        # a text longer than this is refused: the page is for a sentence or a paragraph
PER_TOKEN = 5           # features listed under each token
TOP_FEATURES = 20       # features listed for the whole text


class TryError(ValueError):
    """A text that cannot be tried (empty, too long) or a run whose model or SAE cannot be opened."""


@dataclass
class Opened:
    """What `open_run` gives: the run's SAE and how its activations were made."""

    sae: SparseAutoencoder
    recipe: Recipe


@dataclass
class _Model:
    tokens: Tokens
    model: torch.nn.Module
    modules: dict[str, torch.nn.Module]


class TextProbe:
    """Runs texts through a run's model and SAE; `open_run(run_id)` gives an `Opened` or raises."""

    def __init__(self, open_run: Callable[[int], Opened]) -> None:
        self._open_run = open_run
        self._models: dict[tuple, _Model] = {}
        self._runs: dict[int, Opened] = {}
        self._lock = threading.Lock()  # one load at a time; requests for a loaded run do not wait on it

    def _model(self, recipe: Recipe) -> _Model:
        key = (recipe.model, recipe.gguf_file, recipe.model_dtype, str(recipe.device_map))
        if key not in self._models:
            tokens = recipe.tokens()
            loaded = lm.load_model(recipe.model, gguf_package=recipe.gguf_package, gguf_file=recipe.gguf_file,
                                   dtype=recipe.model_dtype, device_map=recipe.device_map, tokenizer=tokens.tokenizer)
            loaded.model.eval()
            self._models[key] = _Model(tokens, loaded.model, dict(loaded.model.named_modules()))
        return self._models[key]

    def _open(self, run_id: int) -> tuple[Opened, _Model]:
        with self._lock:
            if run_id not in self._runs:
                self._runs[run_id] = self._open_run(run_id)
            run = self._runs[run_id]
            try:
                model = self._model(run.recipe)
            except lm.ModelError as error:
                raise TryError(f"run {run_id}'s model cannot be loaded: {error}") from None
        if run.recipe.hook not in model.modules:
            raise TryError(f"hook {run.recipe.hook!r} is not a module of {run.recipe.model}")
        return run, model

    def warm(self, run_id: int) -> None:
        """Load the run's model and SAE now, so the first text answers fast."""
        self._open(run_id)

    @torch.inference_mode()
    def features(self, run_id: int, text: str) -> dict[str, Any]:
        """{"tokens": [{"text", "features": [[index, value]...]}], "top": [[index, max value, token position]...]}"""
        if not text.strip():
            raise TryError("type a text to try: it is empty")
        if len(text) > MAX_CHARS:
            raise TryError(f"the text has {len(text):,} characters; at most {MAX_CHARS:,} can be tried at once")
        run, model = self._open(run_id)
        tokenizer = model.tokens.tokenizer
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: run.recipe.context_size]
        bos = model.tokens.bos
        prefix = [bos] if bos is not None else []
        input_ids = torch.tensor([prefix + ids])
        acts = lm.capture(model.model, model.modules[run.recipe.hook], input_ids,
                          transcode=run.recipe.transcode)[0, len(prefix):]  # [T, d]
        sae = run.sae
        codes = sae.encode(acts.to(sae.W_dec.device, torch.float32)).cpu()  # [T, d_sae]
        texts = model.tokens.decode()(ids)
        k = min(PER_TOKEN, codes.shape[1])
        best = codes.topk(k, dim=1)
        per_token = [{"text": t, "features": [[int(i), round(float(v), 4)] for i, v in zip(idx, val) if v > 0]}
                     for t, idx, val in zip(texts, best.indices.tolist(), best.values.tolist())]
        peak, where = codes.max(0)
        order = peak.argsort(descending=True)[:TOP_FEATURES]
        top = [[int(i), round(float(peak[i]), 4), int(where[i])] for i in order.tolist() if peak[i] > 0]
        return {"tokens": per_token, "top": top,
                "values": {str(i): [round(float(v), 4) for v in codes[:, i].tolist()] for i, _, _ in top}}
