"""The feature browser: a local web app over the run database (`python -m midisc.serve`).

Imports `store`, `analysis`, `data` and `sae`, nothing above them: the command hands it the function that
reopens a run (training/reopen.py) for "try a text". `app` builds the FastAPI application, `pages` and
`api` are its HTML and JSON routes, `reads` what each page reads from the store, `views` how rows become
what a page shows, `tryit` runs a typed text through a run's model and SAE. Templates and the vendored
Chart.js (with its licence) ship inside the package: nothing is loaded from the internet.
"""
