"""Property-based hostile input: every AnnData either works or raises the engine's own error
with a message naming the problem; the atlas is never changed by a refused input.

1,030 generated cases (1,000 label transfers, 30 ingests), marked ``slow``: the README's test
command (what CI runs) includes them; ``-m "not slow"`` leaves them out of a quick local run.
``derandomize``: the same cases every run, so a failure repeats."""

from __future__ import annotations

import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atlasengine import Atlas, AtlasError, InputError

# The generated AnnData carry duplicate names on purpose (the engine must refuse them); anndata warns
# when such an object is built, which is the test's doing, not the engine's.
pytestmark = pytest.mark.filterwarnings("ignore:(Variable|Observation) names are not unique:UserWarning")

NAMES = st.one_of(
    st.text(min_size=0, max_size=12),
    st.sampled_from(["", " ", "é細胞", "\u200b", "x" * 2000, "celseq", "indrop", "$\\foo$", "_hidden", "nan", "None",
                     "Unknown", "<script>", "a\\b", "?#"]),
)
LABELS = st.one_of(NAMES, st.sampled_from([1.5, "alpha", None, float("nan")]))


@st.composite
def hostile_anndata(draw, atlas_genes: list[str], atlas_cells: list[str]):
    hostile = draw(st.booleans())  # else only the names are hostile: half the cases get past the counts checks
    n = draw(st.integers(0 if hostile else 1, 25))
    share = draw(st.sampled_from([0.0, 0.3, 0.79, 0.85, 1.0, 1.0, 1.0] if hostile else [0.85, 1.0]))
    k = int(len(atlas_genes) * share)
    genes = list(np.random.default_rng(draw(st.integers(0, 99))).permutation(atlas_genes)[:k])
    genes += [f"foreign{i}" for i in range(draw(st.integers(0, 5)))]
    if hostile and draw(st.integers(0, 3)) == 0 and genes:
        genes[-1] = genes[0]  # duplicated gene name
    g = len(genes)
    rng = np.random.default_rng(draw(st.integers(0, 10_000)))
    X = rng.poisson(1.0, size=(n, g)).astype(draw(st.sampled_from([np.int32, np.int64, np.float32, np.float64])))
    poisons = ["none"] * 5 + ["nan", "inf", "negative", "fraction", "empty cells"] if hostile else ["none"]
    poison = draw(st.sampled_from(poisons))
    if poison == "empty cells" and X.size:
        X[: draw(st.integers(1, n))] = 0
    elif poison != "none" and X.size:
        X = X.astype(np.float64)
        X.flat[0] = {"nan": np.nan, "inf": np.inf, "negative": -3, "fraction": 0.5}[poison]
    if draw(st.booleans()):
        X = sp.csr_matrix(X)
    cell_kind = draw(st.sampled_from(["unique"] * 3 + ["duplicate", "empty", "atlas", "unicode"] if hostile
                                     else ["unique", "unicode"]))
    cells = [f"hostile_{i}" for i in range(n)]
    if n:
        if cell_kind == "duplicate" and n > 1:
            cells[1] = cells[0]
        elif cell_kind == "empty":
            cells[0] = ""
        elif cell_kind == "atlas":
            cells[0] = atlas_cells[0]
        elif cell_kind == "unicode":
            cells = [f"細胞-{i}-é" for i in range(n)]
    batch_kind = draw(st.sampled_from(["string"] * 3 + ["int", "nan", "missing", "existing", "long", "mixed"] if hostile
                                      else ["string", "int"]))
    obs = pd.DataFrame(index=pd.Index(cells, dtype=object))
    if batch_kind == "string":
        obs["b"] = draw(NAMES.filter(lambda s: s.strip() != "")) or "x"
    elif batch_kind == "int":
        obs["b"] = 7
    elif batch_kind == "nan":
        obs["b"] = np.nan
    elif batch_kind == "existing":
        obs["b"] = "indrop"
    elif batch_kind == "long":
        obs["b"] = "y" * 5000
    elif batch_kind == "mixed":
        obs["b"] = [i if i % 2 else f"s{i}" for i in range(n)]
    if draw(st.booleans()):
        obs["lab"] = [draw(LABELS) for _ in range(n)] if draw(st.booleans()) else draw(LABELS)
    a = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(genes, dtype=object)))
    return a


def _check(fn, adata) -> str:
    try:
        fn(adata)
    except InputError as exc:
        assert str(exc).strip(), "an error must say what is wrong"
        return "refused"
    except AtlasError as exc:
        assert str(exc).strip()
        return "refused"
    return "worked"


@pytest.mark.slow
def test_hostile_inputs_to_transfer_never_crash_deep(reference_atlas):
    atlas = Atlas.open(reference_atlas)
    genes, cells = atlas.genes, list(atlas.obs().index)
    outcomes: list[str] = []

    @settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(hostile_anndata(genes, cells), st.sampled_from(["b", "b", "b", "nope"]))
    def run(adata, key):
        def call(a):
            pred = atlas.transfer_labels(a, batch_key=key)
            assert len(pred) == a.n_obs and pred["uncertainty"].between(0, 1).all()

        outcomes.append(_check(call, adata))

    run()
    assert outcomes.count("worked") >= 200 and outcomes.count("refused") >= 200  # both sides, often


@pytest.mark.slow
def test_hostile_inputs_to_ingest_leave_the_atlas_unchanged(reference_atlas, tmp_path_factory):
    base = Atlas.open(reference_atlas)
    genes, cells = base.genes, list(base.obs().index)
    outcomes: list[str] = []

    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(hostile_anndata(genes, cells), st.sampled_from(["surgery", "ewc"]), st.booleans())
    def run(adata, strategy, with_labels):
        path = tmp_path_factory.mktemp("hostile") / "a.atlas"
        shutil.copytree(reference_atlas, path)
        before = snapshot(path)
        atlas = Atlas.open(path)

        def call(a):
            res = atlas.ingest(a, batch_key="b", strategy=strategy, label_key="lab" if with_labels else None,
                               training={"max_epochs": 1})
            assert res.version.number == 2 and len(atlas.obs()) == 300 + a.n_obs
            assert not {"nan", "None", "Unknown", ""} & set(Atlas.open(path).labels)  # missing or reserved

        outcome = _check(call, adata)
        if outcome == "refused":
            assert snapshot(path) == before
            assert Atlas.open(path).version == 1
        outcomes.append(outcome)
        shutil.rmtree(path.parent)

    run()
    assert outcomes.count("refused") >= 5 and outcomes.count("worked") >= 5
