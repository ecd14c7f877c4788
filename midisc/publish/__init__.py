"""Publishing a trained SAE: a SAELens folder, a Neuronpedia package and Neuronpedia dashboard files.

Imports `sae`, `analysis` (feature profiles) and nothing above them. Everything a run publishes is
gathered first into one plain `publication.Publication` (the SAE, what it was trained on, its feature
statistics, examples and profiles), at the end of a run or by `python -m midisc.export RUN` from the
database; `write.write_all` then writes the three artifacts from it:

    <run folder>/sae/                          SAELens v6: cfg.json, sae_weights.safetensors, sparsity.safetensors
    <run folder>/run-<id>_neuronpedia/         metadata, decoder weights (.npy), feature analysis, sae_model.pt
    <run folder>/exports/<model>/<layer>-<set>/   what Neuronpedia's importer reads (see dashboard.py)
"""
