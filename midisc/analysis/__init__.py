"""What an SAE's features do: pure computations over SAEs, activations and recorded rows; imports sae, data.

`metrics` (FVU, L0, dead fraction), `features` (the streaming feature analysis and its examples),
`profiles` (activation histograms, output tokens, similar features), `concepts` (concept texts, AUROC
selectivity), `splice` and `saebench` (the SAE spliced into the model, SAEBench's core metrics),
`overview` (a run in plain words), `sweeps` (name and compare a sweep's jobs), `plots` (figures).
"""
