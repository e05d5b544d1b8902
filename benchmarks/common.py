"""Shared pieces of the benchmarks: scenarios, atlas helpers, metrics, output writing.

Scenarios (``../shared/data/README.md``):

- ``pancreas``: reference = celseq, fluidigmc1, indrop without ductal cells; query = celseq2,
  smartseq2; novel = {ductal}; batch ``tech``, label ``celltype``.
- ``pbmc``: reference = 3pv1 + 3pv2 without NK and Mono_CD16; query = 5p; novel = {NK,
  Mono_CD16}; batch ``donor``, label ``cell_type``.
- ``ifnb``: reference = control without Dendritic; query = stimulated; novel = {Dendritic};
  batch ``condition``, label ``cell_type``; 2000 highly variable genes of the reference.
- ``kang``: reference = donors 1015 + 1256 without FCGR3A+ Monocytes (close to CD14+
  Monocytes: the hard case); query = donor 1488; novel = {FCGR3A+ Monocytes}; batch ``donor``,
  label ``cell_type``; all 1,287 genes. The sequential benchmark then folds in donors 1244,
  1016, 101, 107 and 1039 one at a time.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import pandas as pd

BENCH_DIR = Path(__file__).resolve().parent
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEFAULT_OUT = BENCH_DIR / "out"
FIGURES = BENCH_DIR / "figures"


def _engine_version() -> str:
    """HEAD commit of the checkout, with '+dirty' when atlasengine/ has uncommitted changes (at import)."""
    import subprocess

    root = BENCH_DIR.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "atlasengine"], cwd=root).returncode != 0
        return (head or "unknown") + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


ENGINE_AT_START = _engine_version()


# --------------------------------------------------------------------------- scenarios
@dataclass(frozen=True)
class Scenario:
    name: str
    file: str
    batch_key: str
    label_key: str
    ref_batches: tuple[str, ...]
    query_batches: tuple[str, ...]
    novel: frozenset[str]
    n_hvg: int | None = None


SCENARIOS: dict[str, Scenario] = {
    "pancreas": Scenario("pancreas", "pancreas_panc8_small.h5ad", "tech", "celltype",
                         ("celseq", "fluidigmc1", "indrop"), ("celseq2", "smartseq2"), frozenset({"ductal"})),
    "pbmc": Scenario("pbmc", "pbmc_3chemistries.h5ad", "donor", "cell_type",
                     ("3pv1", "3pv2"), ("5p",), frozenset({"NK", "Mono_CD16"})),
    "ifnb": Scenario("ifnb", "pbmc_ifnb_stim.h5ad", "condition", "cell_type",
                     ("control",), ("stimulated",), frozenset({"Dendritic"}), n_hvg=2000),
    "kang": Scenario("kang", "pbmc_kang_8donors.h5ad", "donor", "cell_type",
                     ("1015", "1256"), ("1488",), frozenset({"FCGR3A+ Monocytes"})),
}
HALF_NOVEL: dict[str, Scenario] = {
    "kang_half": Scenario("kang_half", "pbmc_kang_8donors.h5ad", "donor", "cell_type",
                          ("1015", "1256"), ("1488",), frozenset({"FCGR3A+ Monocytes", "CD4 T cells"})),
    "pbmc_half": Scenario("pbmc_half", "pbmc_3chemistries.h5ad", "donor", "cell_type",
                          ("3pv1", "3pv2"), ("5p",), frozenset({"NK", "Mono_CD16", "T_CD4"})),
}
"""Scenarios where the new cells are about half the query (issue 16): kang's donor 1488 without CD4 T
cells in the reference (63% of the query new), pbmc's 5p without T_CD4 (39%)."""
SCARCHES_UNKNOWN = {"transfer": {"unknown_rule": "uncertainty"}}
"""Atlas settings for benchmarks that compare with scvi-tools: Unknown by scArches' cut-off (uncertainty > 0.3),
since scvi-tools' rows have no calibrated novelty rule (the atlas's default; every rule is compared in
``benchmarks.novelty``)."""
ANCHOR = {"ewc_lambda": 0.0, "embedding_anchor": 1000.0}
"""ewc with the embedding anchor in place of the EWC penalty (``lambda_sweep --grid anchor``; the strength 1000
was picked on seed 0): measured beside the engine's default, which it is not."""
ANCHOR_METHOD = "ewc (anchor)"
"""The name of that fold-in in the benchmarks' tables."""
PENALTY_ONLY = {"ewc_lambda": 100.0, "embedding_anchor": 0.0}
"""ewc with the EWC penalty alone at lambda 100: the engine's default until 2026-12-06, when the anchor with
lambda 1 beside it replaced it by the rule of commit 91c243c (``ContinualConfig``'s docstring; measured there as
'ewc (anchor + lambda 1)' beside this one as 'ewc'). Kept beside the default so every table still shows it."""
PENALTY_ONLY_METHOD = "ewc (lambda 100, no anchor)"
"""The name of that fold-in in the benchmarks' tables."""
CANDIDATES = {ANCHOR_METHOD: ANCHOR, PENALTY_ONLY_METHOD: PENALTY_ONLY}
"""Fold-ins measured beside the engine's default ewc (lambda 1 with the embedding anchor at 1000), by name: ewc
with these continual settings."""
CANDIDATE_WORDS = {ANCHOR_METHOD: "the embedding anchor in place of the EWC penalty",
                   PENALTY_ONLY_METHOD: "the EWC penalty alone at lambda 100, the default before 2026-12-06"}
"""What each of :data:`CANDIDATES` is, in the words of the result pages."""
_CHECK_LETTERS = {ANCHOR_METHOD: "b", PENALTY_ONLY_METHOD: "c"}


def candidates_described() -> str:
    """Describe every candidate for a result page: "ewc (anchor): ewc with {...} (the embedding anchor ...); ..."."""
    return "; ".join(f"{m}: ewc with {CANDIDATES[m]} ({CANDIDATE_WORDS[m]})" for m in CANDIDATES)


def candidate_checks(number: int, prefix: str = "") -> list[tuple[str, str]]:
    """Return (method, label) of each candidate's row of check ``number`` ('2b. ewc with the embedding anchor ...')."""
    return [(m, f"{number}{letter}. {prefix}ewc with {CANDIDATE_WORDS[m]} (not the default)")
            for m, letter in _CHECK_LETTERS.items()]


def engine_method(method: str) -> tuple[str, dict | None]:
    """Return the engine strategy and continual settings of a benchmark method (a :data:`CANDIDATES` name: ewc with its settings)."""
    return ("ewc", dict(CANDIDATES[method])) if method in CANDIDATES else (method, None)


def slug(method: str) -> str:
    """Return a file-name form of a method's name: 'ewc (anchor)' -> 'ewc_anchor'."""
    return "_".join("".join(ch if ch.isalnum() else " " for ch in method).split())


KANG_SEQUENCE = ("1244", "1016", "101", "107", "1039")
"""The kang donors folded in one at a time after donor 1488 (../shared/data/README.md)."""


def data_file(name: str) -> Path:
    """Path of a shared data set; raises (never skips) when it is missing."""
    path = DATA / name
    if not path.exists():
        raise FileNotFoundError(f"benchmark data {path} is missing; the benchmarks need ../shared/data beside the checkout")
    return path


def read_data(name: str):
    import anndata as ad

    return ad.read_h5ad(data_file(name))


def highly_variable(adata, n_top: int) -> list[str]:
    """Top ``n_top`` genes by binned normalised dispersion of log CP10k (Seurat flavour), on ``adata``."""
    import scipy.sparse as sp

    X = sp.csr_matrix(adata.X, dtype=np.float64)
    lib = np.asarray(X.sum(1)).ravel()
    X = sp.diags(1e4 / np.maximum(lib, 1)) @ X
    X.data = np.log1p(X.data)
    mean = np.asarray(X.mean(0)).ravel()
    var = np.asarray(X.multiply(X).mean(0)).ravel() - mean**2
    disp = np.log(np.maximum(var, 1e-12) / np.maximum(mean, 1e-12))
    bins = pd.cut(mean, 20, labels=False)
    df = pd.DataFrame({"disp": disp, "bin": bins})
    g = df.groupby("bin")["disp"]
    z = (df["disp"] - g.transform("mean")) / g.transform("std").replace(0, 1).fillna(1)
    z[mean <= 0] = -np.inf
    order = np.argsort(-z.to_numpy(), kind="stable")[:n_top]
    return [str(adata.var_names[i]) for i in sorted(order)]


def load_scenario(name: str, novel_in_reference: bool = False):
    """Return (reference, query) AnnData copies of a scenario (the query keeps its novel types).

    ``novel_in_reference``: the reference keeps its cells of the held-out types too, labelled (the
    types known from the start); the genes are the scenario's either way.
    """
    sc = SCENARIOS[name] if name in SCENARIOS else HALF_NOVEL[name]
    a = read_data(sc.file)
    batch = a.obs[sc.batch_key].astype(str)
    label = a.obs[sc.label_key].astype(str)
    ref_mask = batch.isin(sc.ref_batches) & ~label.isin(sc.novel)
    if sc.n_hvg and a.n_vars > sc.n_hvg:
        a = a[:, highly_variable(a[ref_mask.to_numpy()], sc.n_hvg)]
    if novel_in_reference:
        ref_mask = batch.isin(sc.ref_batches)
    ref = a[ref_mask.to_numpy()].copy()
    query = a[batch.isin(sc.query_batches).to_numpy()].copy()
    for x in (ref, query):
        x.obs[sc.batch_key] = x.obs[sc.batch_key].astype(str)
        x.obs[sc.label_key] = x.obs[sc.label_key].astype(str)
    return ref, query


# ------------------------------------------------------------------------------ engine
def quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "scvi", "jax", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)


def continual_defaults() -> str:
    """Describe the atlas's default EWC settings, for the result pages."""
    from atlasengine.config import ContinualConfig

    d = ContinualConfig()
    return (f"ewc_lambda {d.ewc_lambda:g}, embedding_anchor {d.embedding_anchor:g}, replay_fraction "
            f"{d.replay_fraction:g}, replay_max_cells {d.replay_max_cells}")


def atlas_config(ref_epochs: int | None, query_epochs: int | None, seed: int, **continual: Any) -> dict:
    """Atlas settings at ``seed``; epochs of None keep the engine's default (the README's examples set none)."""
    def training(epochs: int | None) -> dict:
        return {"seed": seed} if epochs is None else {"max_epochs": epochs, "seed": seed}

    return {"reference_training": training(ref_epochs), "query_training": training(query_epochs), "continual": continual}


def create_atlas(path: Path, sc: Scenario, ref, seed: int, config: dict | None = None, label_key: str | None = None):
    """Train version 1 at ``path`` with the engine's defaults changed by ``config``; returns the atlas."""
    from atlasengine import Atlas

    quiet()
    path = Path(path)
    shutil.rmtree(path, ignore_errors=True)
    cfg = dict(config or {})
    for section in ("reference_training", "query_training"):
        cfg[section] = {"seed": seed, **cfg.get(section, {})}
    return Atlas.create(path, ref, batch_key=sc.batch_key, label_key=label_key or sc.label_key, config=cfg,
                        runtime={"progress": False})


def create_reference(path: Path, sc: Scenario, ref, seed: int, ref_epochs: int, query_epochs: int = 1,
                     label_key: str | None = None, **continual: Any):
    """Train version 1 at ``path`` with fixed epochs; returns (atlas, wall seconds)."""
    t0 = time.perf_counter()
    atlas = create_atlas(path, sc, ref, seed, atlas_config(ref_epochs, query_epochs, seed, **continual), label_key)
    return atlas, time.perf_counter() - t0


def fold_in(ref_path: Path, dest: Path, query, sc: Scenario, strategy: str, continual: dict | None = None,
            training: dict | None = None, dataset: str | None = None):
    """Copy the atlas at ``ref_path`` to ``dest`` and ingest ``query`` blind; (atlas, result, seconds)."""
    from atlasengine import Atlas

    quiet()
    dest = Path(dest)
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(ref_path, dest)
    atlas = Atlas.open(dest)
    t0 = time.perf_counter()
    res = atlas.ingest(query, batch_key=sc.batch_key, strategy=strategy, continual=continual, training=training,
                       dataset=dataset, runtime={"progress": False})
    return atlas, res, time.perf_counter() - t0


def backed_copies(folder: Path, **data):
    """Write each AnnData to ``folder/<name>.h5ad`` and return them read back backed, in the order given."""
    import anndata as ad

    folder.mkdir(parents=True, exist_ok=True)
    for name, adata in data.items():
        adata.write_h5ad(folder / f"{name}.h5ad")
    return [ad.read_h5ad(folder / f"{name}.h5ad", backed="r") for name in data]


def fold_in_measures(atlas, res, query, sc: Scenario) -> dict[str, float]:
    """Known-type accuracy, novel AUROC of the novelty score and reference drift of a version-2 fold-in of ``query``."""
    from atlasengine.transfer import detection_scores, evaluate_transfer

    ev = evaluate_transfer(res.predictions, query.obs[sc.label_key], set(sc.novel))
    novel = query.obs[sc.label_key].astype(str).isin(sc.novel).to_numpy()
    drift = atlas.drift()
    moved = drift[(drift.scope == "vs_first") & (drift.version == 2)]["displacement_mean_aligned"]
    return {"known_accuracy": ev["known_accuracy"],
            "novel_auroc": detection_scores(novel, res.predictions.loc[query.obs_names, "novelty"])["auroc"],
            "reference_drift": float(moved.iloc[0]) if len(moved) else float("nan")}


def cells_of_version(atlas, version_added: int = 1) -> tuple[pd.Index, np.ndarray, np.ndarray]:
    """(cell names, latent, stored labels) of the atlas cells added in ``version_added``."""
    obs = atlas.obs()
    z = atlas.latent()
    m = (obs["version_added"] == version_added).to_numpy()
    return obs.index[m], z[m], obs["label"].to_numpy()[m]


# ----------------------------------------------------------------------------- metrics
def knn_indices(z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(distances, indices) of the k nearest other cells: the engine's own self-excluding kNN."""
    from atlasengine.numerics import self_excluding_knn

    return self_excluding_knn(z, k)


def loo_knn_accuracy(z: np.ndarray, labels: np.ndarray, k: int = 15) -> float:
    """Leave-one-out majority-vote kNN label accuracy: the engine's drift measure (k = 15)."""
    from atlasengine.drift.measures import loo_knn_correct

    return float(np.nanmean(loo_knn_correct(z, np.asarray(labels, dtype=object), k)))


def check2_parts(auroc: float, rival_aurocs: list[float], accuracy: float, surgery_accuracy: float,
                 drift_ratio: float) -> dict[str, bool]:
    """Return check 2's three parts ('Prove the method'), each met or not.

    AUROC at least each rival's (NaN rivals skipped), known accuracy at most 1 point under
    surgery's, drift at most a third of finetune's.
    """
    return {"auroc_met": bool(all(auroc >= v for v in rival_aurocs if not np.isnan(v))),
            "accuracy_met": bool(accuracy >= surgery_accuracy - 0.01), "drift_met": bool(drift_ratio <= 1 / 3)}


def procrustes_displacement(z_before: np.ndarray, z_after: np.ndarray) -> float:
    """Mean distance after aligning ``z_after`` onto ``z_before`` (the engine's drift measure).

    Orthogonal Procrustes: movement that is not a rigid rotation or shift.
    """
    from atlasengine.drift.measures import displacement as per_cell

    return float(per_cell(z_before, z_after, aligned=True).mean())


_SCIB_NOTE: list[str] = []


def scib_available() -> tuple[bool, str]:
    try:
        import scib_metrics  # noqa: F401
    except Exception as exc:  # ImportError, or jax failing to load
        return False, f"scib-metrics not importable ({type(exc).__name__}: {exc}); scIB metrics skipped"
    return True, ""


def scib_scores(z: np.ndarray, labels: np.ndarray, batches: np.ndarray) -> dict[str, float]:
    """ScIB metrics (scib-metrics) of an embedding with true labels; {} (with a printed note) without it."""
    ok, why = scib_available()
    if not ok:
        if not _SCIB_NOTE:
            print(f"NOTE: {why}", flush=True)
            _SCIB_NOTE.append(why)
        return {}
    import scib_metrics
    from scib_metrics.nearest_neighbors import NeighborsResults

    z = np.ascontiguousarray(z, dtype=np.float32)
    labels = np.asarray(labels).astype(str)
    batches = np.asarray(batches).astype(str)
    dist, idx = knn_indices(z, min(90, len(z) - 1))
    nn = NeighborsResults(indices=idx, distances=dist)
    out = {
        "silhouette_label": scib_metrics.silhouette_label(z, labels),
        "silhouette_batch": scib_metrics.silhouette_batch(z, labels, batches),
        "bras": scib_metrics.bras(z, labels, batches),
        "graph_connectivity": scib_metrics.graph_connectivity(nn, labels),
        "ilisi": scib_metrics.ilisi_knn(nn, batches),
        "isolated_labels": scib_metrics.isolated_labels(z, labels, batches),
    }
    return {k: float(v) for k, v in out.items()}


# ------------------------------------------------------------------------------ output
def env_info() -> dict[str, Any]:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "engine_commit_at_start": ENGINE_AT_START,
        "engine_commit_at_end": _engine_version(),
        "executable": sys.executable,
    }
    for mod in ("scvi", "scib_metrics", "jax", "faiss", "sklearn"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", "?")
        except Exception:
            info[mod] = None
    return info


def seeds_of(args: argparse.Namespace) -> list[int]:
    """Return the seeds a run uses: ``--first-seed`` .. ``--first-seed + --seeds - 1``."""
    return list(range(args.first_seed, args.first_seed + args.seeds))


# Seeds of the mapping and sequential benchmarks that took part in choosing the engine's defaults:
# the strength sweep ran seeds 0-2; the embedding anchor's sweep, and the rule that made today's
# default (commits 0ac389e, 91c243c), scored mapping seeds 3-5 and sequential seeds 0-2.
# Seeds from 6 on were used for nothing before their runs.
SELECTION_SEEDS = range(6)


def held_out(args: argparse.Namespace) -> bool:
    """Return whether no seed of the run took part in choosing a default (none in ``SELECTION_SEEDS``)."""
    return not any(s in SELECTION_SEEDS for s in seeds_of(args))


def seeds_said(args: argparse.Namespace, chosen_on: bool = True) -> str:
    """Return how a page names the run's seeds: by number, and whether defaults were chosen on them.

    ``chosen_on=False`` for a benchmark whose seeds took no part in choosing (not the real-data
    mapping, sequences, naming or novelty runs ``SELECTION_SEEDS`` speaks of).
    """
    seeds = seeds_of(args)
    span = f"{seeds[0]}-{seeds[-1]}" if len(seeds) > 1 else f"{seeds[0]}"
    if not chosen_on:
        return f"{len(seeds)} seed(s) ({span})"
    if not held_out(args):
        return f"{len(seeds)} seed(s) ({span}, among the seeds {SELECTION_SEEDS[0]}-{SELECTION_SEEDS[-1]} the engine's defaults were chosen on)"
    return f"{len(seeds)} held-out seed(s) ({span}: no default was chosen on them)"


def output_name(base: str, args: argparse.Namespace) -> str:
    """Return the name a run's outputs take: ``base`` from seed 0, ``<base>_heldout`` for held-out seeds, else ``<base>_seeds<first>``."""
    if args.first_seed == 0:
        return base
    return f"{base}_heldout" if held_out(args) else f"{base}_seeds{args.first_seed}"


def parse_args(description: str, default_seeds: int = 3) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="one seed, few epochs (CI smoke run)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default benchmarks/out/)")
    p.add_argument("--seeds", type=int, default=None, help=f"number of seeds (default {default_seeds}; quick: 1)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="the first seed (default 0): seeds first-seed .. first-seed + seeds - 1, e.g. 6 for seeds "
                   "that no default was chosen on (SELECTION_SEEDS)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own; 1 is much faster when other processes share the cores)")
    p.add_argument("--jobs", type=int, default=2,
                   help="parallel processes of one torch thread each, where the benchmark runs independent jobs (default 2)")
    p.add_argument("--scenarios", default=None, help="comma-separated scenarios (default: the benchmark's own)")
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.seeds is None:
        args.seeds = 1 if args.quick else default_seeds
    args.out.mkdir(parents=True, exist_ok=True)
    return args


ARGV = list(sys.argv)
"""The command line as given, before a benchmark's own pre-parser takes its options out of ``sys.argv``."""


def take_choice(option: str, choices: tuple[str, ...], default: str) -> str:
    """Take a benchmark's own ``option`` (one of ``choices``) out of ``sys.argv`` before :func:`parse_args`."""
    extra = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    extra.add_argument(option, choices=choices, default=default)
    known, rest = extra.parse_known_args()
    sys.argv = [sys.argv[0], *rest]
    return getattr(known, option.lstrip("-").replace("-", "_"))


def command_line() -> str:
    mod = Path(ARGV[0]).stem
    return " ".join(["python -m", f"benchmarks.{mod}", *ARGV[1:]])


def work_dir(out: Path, name: str) -> Path:
    d = Path(out) / "work" / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


def json_ready(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return None if math.isnan(v) or math.isinf(v) else v
    if isinstance(obj, np.ndarray):
        return json_ready(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_outputs(out: Path, name: str, payload: dict[str, Any], markdown: str) -> None:
    """``out/<name>.json`` (payload + env) and ``out/<name>.md``."""
    out = Path(out)
    payload = {"benchmark": name, "command": command_line(), "env": env_info(), **payload}
    (out / f"{name}.json").write_text(json.dumps(json_ready(payload), indent=1))
    (out / f"{name}.md").write_text(markdown.rstrip() + "\n")
    print(f"wrote {out / (name + '.json')} and {out / (name + '.md')}", flush=True)


def fmt(v: Any, digits: int = 3) -> str:
    if v is None or v is pd.NA:
        return "n/a"
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return "n/a"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    return str(v)


def md_table(df: pd.DataFrame, digits: int = 3) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(fmt(row[c], digits) for c in cols) + " |")
    return "\n".join(lines)


def mean_sd(df: pd.DataFrame, by: list[str], metrics: list[str], digits: int = 3) -> pd.DataFrame:
    """One row per group: 'mean ± sd' strings per metric (sd over seeds; '±' omitted for one seed)."""
    rows = []
    for key, g in df.groupby(by, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key))
        row["n"] = len(g)
        for m in metrics:
            if m not in g:
                continue
            v = pd.to_numeric(g[m], errors="coerce").dropna()
            if len(v) == 0:
                row[m] = "n/a"
            elif len(v) == 1:
                row[m] = fmt(float(v.iloc[0]), digits)
            else:
                row[m] = f"{fmt(float(v.mean()), digits)} ± {fmt(float(v.std(ddof=1)), digits)}"
        rows.append(row)
    return pd.DataFrame(rows)


def save_fig(fig, path: Path) -> None:
    """Small PNG (dpi 80) so that the committed copies stay well under 200 KB."""
    fig.savefig(path, dpi=80, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    print(f"wrote {path} ({path.stat().st_size // 1024} KB)", flush=True)


def matplotlib_agg():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------- generated data
GENERATOR_NOTE = (
    "Generated data: counts sampled from a small atlasengine model trained on all 500 pancreas cells "
    "(5 technologies, 2000 genes, {epochs} epochs): each generated cell takes a random real celseq/celseq2/indrop "
    "cell's latent mean plus N(0, 0.25^2) noise as its latent code, that cell's label and library size (x lognormal(0, "
    "0.2)), and negative-binomial counts (Gamma-Poisson) from the decoder. Not real cells."
)
GENERATOR_EPOCHS = 40


def generator_atlas(out: Path, epochs: int = GENERATOR_EPOCHS):
    """Return the pancreas model the generated data are sampled from (trained once, cached under out/work)."""
    from atlasengine import Atlas

    path = Path(out) / "work" / f"generator_e{epochs}.atlas"
    if (path / "manifest.json").exists() or (path.exists() and any(path.iterdir())):
        try:
            return Atlas.open(path)
        except Exception:
            shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    a = read_data(SCENARIOS["pancreas"].file)
    a.obs["tech"] = a.obs["tech"].astype(str)
    sc = SCENARIOS["pancreas"]
    atlas, _ = create_reference(path, sc, a, 0, epochs, 1, fisher_max_cells=100)
    return atlas


def generate_cells(atlas, n: int, seed: int, prefix: str = "gen", chunk: int = 20_000,
                   techs: tuple[str, ...] | None = ("celseq", "celseq2", "indrop"), real=None,
                   keys: tuple[str, str] = ("tech", "celltype"), depth: float = 1.0):
    """Return an AnnData of ``n`` cells generated by ``atlas``'s model (CSR float32 counts).

    Each takes a random atlas cell of a batch in ``techs`` (None: any) as its source: that cell's
    latent mean plus N(0, 0.25^2) noise, its batch, label and library size in ``real`` (the
    atlas's own data; default the pancreas set) times lognormal(0, 0.2) times ``depth``; counts
    are drawn negative-binomial (Gamma-Poisson) from the decoder. obs: ``keys`` = batch
    '<prefix>_<batch>' and label.
    """
    import anndata as ad
    import scipy.sparse as sp
    import torch

    # the Gamma draws take torch's global generator (Distribution.sample has no generator argument):
    # seeded inside a fork, so the same seed gives the same cells whatever ran before in the process
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = atlas.model()
        obs = atlas.obs()
        z_all = atlas.latent()
        pool = np.flatnonzero(obs["batch"].isin(techs).to_numpy()) if techs is not None else np.arange(len(obs))
        rng = np.random.default_rng(seed)
        gen = torch.Generator().manual_seed(seed)
        src = rng.choice(pool, size=n)
        real = real if real is not None else read_data(SCENARIOS["pancreas"].file)
        lib_real = pd.Series(np.asarray(real.X.sum(1)).ravel(), index=real.obs_names.astype(str)).loc[obs.index].to_numpy()
        batch_idx = pd.Index(atlas.batches).get_indexer(obs["batch"].to_numpy()[src])
        parts = []
        with torch.no_grad():
            for s in range(0, n, chunk):
                rows = src[s : s + chunk]
                z = torch.from_numpy(z_all[rows] + rng.normal(0, 0.25, size=(len(rows), z_all.shape[1])).astype(np.float32))
                lib = torch.from_numpy((depth * lib_real[rows] * rng.lognormal(0, 0.2, size=len(rows))).astype(np.float32))[:, None]
                rate, theta, _ = model.decode(z, torch.from_numpy(batch_idx[s : s + chunk]), lib)
                gamma = torch.distributions.Gamma(theta.expand_as(rate), theta / rate.clamp(min=1e-8)).sample()
                x = torch.poisson(gamma, generator=gen)
                parts.append(sp.csr_matrix(x.numpy()))
        X = sp.vstack(parts).tocsr().astype(np.float32)
        cell_obs = pd.DataFrame(
            {keys[0]: [f"{prefix}_{t}" for t in obs["batch"].to_numpy()[src]], keys[1]: obs["label"].to_numpy()[src]},
            index=[f"{prefix}{i}" for i in range(n)],
        )
        return ad.AnnData(X=X, obs=cell_obs, var=pd.DataFrame(index=atlas.genes))


def tile_cells(adata, copies: int, prefix: str):
    """Stack ``copies`` copies of ``adata`` with new cell names (to reach 1M cells cheaply)."""
    import anndata as ad
    import scipy.sparse as sp

    X = sp.vstack([adata.X] * copies).tocsr()
    obs = pd.concat([adata.obs] * copies)
    obs.index = [f"{prefix}{i}" for i in range(len(obs))]
    return ad.AnnData(X=X, obs=obs, var=adata.var.copy())


def write_tiled_h5ad(base, n: int, path: Path, prefix: str) -> None:
    """Write ``n`` cells, ``base`` repeated (renamed), to an .h5ad file one copy at a time (never whole in memory)."""
    import anndata as ad
    import h5py
    import scipy.sparse as sp

    copies = -(-n // base.n_obs)
    obs = pd.concat([base.obs] * copies).iloc[:n]
    obs.index = [f"{prefix}{i}" for i in range(n)]
    ad.AnnData(obs=obs, var=base.var.copy()).write_h5ad(path)
    X = sp.csr_matrix(base.X, dtype=np.float32)
    with h5py.File(path, "a") as f:
        if "X" in f:
            del f["X"]
        done = 0
        while done < n:
            part = X[: min(base.n_obs, n - done)]
            if done == 0:
                ad.io.write_elem(f, "X", part)
            else:
                ad.io.sparse_dataset(f["X"]).append(part)
            done += part.shape[0]


# ------------------------------------------------------------------------ parallel jobs
def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    quiet()


def run_jobs(fn, jobs: list, workers: int, threads: int = 1) -> list:
    """Run ``fn(job)`` for every job, in ``workers`` processes of ``threads`` torch threads each.

    Results come back in job order; ``workers <= 1`` runs them here, one after the other. The
    jobs of one benchmark run share the code, the data and the settings: their rows form one run.
    """
    if workers <= 1:
        _init_worker(threads)
        return [fn(job) for job in jobs]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        return list(pool.map(fn, jobs))

