"""Sparse autoencoder architectures and their SAELens v6 folders; imports nothing else of midisc.

`base` holds what every architecture shares (parameters, decoder, init, save); `relu`, `topk`,
`jumprelu` (JumpReLU and BatchTopK), `matryoshka` (BatchTopK with nested prefixes) and `gated` each add
a nonlinearity and a loss; `transcoder` gives four of them a transcoder's form (one activation in, another
out, `sae.kind=transcoder`); `sparse_ops` holds the sparse kernels TopK and BatchTopK train with; `io`
loads any saved folder. A config picks an architecture with `_target_: midisc.sae.topk.TopKSAE`. The
names below are also importable from `midisc.sae` itself, which is how runs recorded before this
package (`_target_: midisc.sae.TopKSAE`) still resume.
"""

from midisc.sae.base import Output, SparseAutoencoder
from midisc.sae.gated import GatedSAE
from midisc.sae.io import load_sae
from midisc.sae.jumprelu import BatchTopKSAE, JumpReLUSAE
from midisc.sae.matryoshka import MatryoshkaBatchTopKSAE
from midisc.sae.relu import ReluSAE
from midisc.sae.topk import TopKSAE

__all__ = ["BatchTopKSAE", "GatedSAE", "JumpReLUSAE", "MatryoshkaBatchTopKSAE", "Output", "ReluSAE",
           "SparseAutoencoder", "TopKSAE", "load_sae"]
