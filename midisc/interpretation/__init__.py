"""Auto-interpretation: features explained in words by a language model, and the explanations scored.

Imports `sae`, `data`, `analysis` and `store`, nothing above them; `python -m midisc.autointerp` is its command.
`sampling` picks the examples (across activation quantiles, explaining and scoring ones disjoint),
`pool` finds contexts where a feature does not fire, `prompts` writes what the models read, `backends` are
the models (the bundled SmolLM2 through transformers, or any OpenAI-compatible chat endpoint), `scoring`
turns answers into detection and fuzzing scores, and `explain` runs it all, one feature row at a time.
"""
