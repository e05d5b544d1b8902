"""A small real data set carried by the package, for the demo and the examples.

``pancreas_panc8_small.h5ad``: 500 human pancreas cells x 2,000 genes from five sequencing
technologies (celseq, celseq2, fluidigmc1, indrop, smartseq2; 100 each) and six cell types,
raw counts in ``X``: a subset of the panc8 collection (the scIB pancreas studies) as the bbknnR
R package ships it (MIT licence; see ``README.md`` in this folder).

Example
-------
>>> from atlasengine.datasets import pancreas
>>> adata = pancreas()
>>> adata.shape, sorted(adata.obs["tech"].unique())[:2]
((500, 2000), ['celseq', 'celseq2'])
"""

from __future__ import annotations

from importlib.resources import as_file, files

import anndata as ad

PANCREAS = "pancreas_panc8_small.h5ad"


def pancreas() -> ad.AnnData:
    """Read the 500-cell pancreas set: raw counts, ``tech`` (batch) and ``celltype`` (label) in obs."""
    with as_file(files(__name__) / PANCREAS) as path:
        return ad.read_h5ad(path)
