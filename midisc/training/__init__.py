"""Training an SAE with Lightning, and reopening a recorded run; imports sae, data, analysis, store, publish.

`module` is the LightningModule around an SAE (`SAEModule`: schedules, input scale, dead features), with
`resampling` for ReLU SAEs; `checkpoints` saves and resumes a run; `callbacks` record metrics, the
feature analysis, the evaluation and the published files as a run ends; `reopen` makes a recorded run's
model, hook and activations again, as it was trained, for the tools that come after training.
"""
