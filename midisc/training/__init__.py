"""Training an SAE with Lightning, and reopening a recorded run; imports sae, data, analysis, store, publish.

`module` is the LightningModule around an SAE (`SAEModule`: schedules, input scale, dead features), with
`resampling` for ReLU SAEs; `checkpoints` saves and resumes a run; `callbacks` hold only what must run
during `fit` (metrics as they come, the progress bar); `finish` is the end of a run as plain functions
(analyze → evaluate → publish), called by run.py and by the analyze, evaluate and export commands;
`reopen` opens a recorded run (its SAE and the recipe of its activations) for the tools after training;
`outcome` is what a training run gives back (`Result`) and the summary that closes its log; `ranks` tells
a rank after the first of a distributed run (DDP) before Lightning starts, so that only rank 0 records.
"""
