"""Naming a new type (issue 13): kang's FCGR3A+ monocytes found, grouped, named, then recognised in the next donor.

    python -m benchmarks.naming [--quick] [--out DIR] [--seeds N]

Reference: kang donors 1015 + 1256 without FCGR3A+ Monocytes; query donor 1488 folded in with
ewc at the atlas's defaults (and, side by side from the same reference, with finetune,
surgery and ewc with the embedding anchor in place of the EWC penalty: whether the embedding or
the naming limits what is recognised). ``unknown_groups(gene_key="gene_symbol")`` groups what the version
called Unknown; the group with the largest share of FCGR3A+ Monocytes (read from the true
labels: the benchmark plays the biologist who recognises it by its markers) is named with
``relabel``; donor 1244 is folded in next and its FCGR3A+ Monocytes are checked for the name.

Measured per seed: the group's size and purity, whether FCGR3A is among its top 10 markers,
how many of the query's FCGR3A+ Monocytes were called at all, and the share of donor 1244's
FCGR3A+ Monocytes labelled with the name, and where the others went. The bar (issue 13): a
group at least 80% FCGR3A+ Monocytes with FCGR3A among its 10 markers; at least 80% of 1244's
FCGR3A+ Monocytes labelled with the name.

The type known from the start, per seed: a reference of donors 1015 + 1256 with their FCGR3A+
Monocytes labelled, then 1488 and 1244 folded in with ewc: the share of 1244's FCGR3A+
Monocytes the atlas labels as such when nothing had to be named. A reference point for what
naming a few dozen cells can give (not a proof of a bound: another vote could do better).
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import scipy.sparse as sp

from benchmarks import common as C

NOVEL = "FCGR3A+ Monocytes"
NAME = "FCGR3A+ Monocytes (named)"
NEXT_DONOR = C.KANG_SEQUENCE[0]


STRATEGIES = ("ewc", "finetune", "surgery", *C.CANDIDATES)
"""The atlas's default first: the bar is judged on it. ``benchmarks.common.CANDIDATES`` beside it: the embedding
anchor alone, and the EWC penalty alone at lambda 100 (the default before 2026-12-06)."""


def run_one(job: tuple) -> list[dict]:
    """One seed: one reference, the naming workflow with each strategy from a copy of it."""
    import shutil

    seed, cfg, out = job
    sc = C.SCENARIOS["kang"]
    ref, query = C.load_scenario("kang")
    full = C.read_data(sc.file)
    nxt = full[full.obs[sc.batch_key].astype(str).eq(NEXT_DONOR).to_numpy()].copy()
    nxt.obs[sc.label_key] = nxt.obs[sc.label_key].astype(str)
    work = C.work_dir(out, f"naming_s{seed}")
    C.create_reference(work / "kang.atlas", sc, ref, seed, cfg["ref_epochs"], cfg["query_epochs"])
    rows = []
    for strategy in STRATEGIES:
        dest = work / f"{C.slug(strategy)}.atlas"
        shutil.copytree(work / "kang.atlas", dest)
        rows.append(workflow(dest, strategy, seed, query, nxt))
        shutil.rmtree(dest, ignore_errors=True)
    shutil.rmtree(work / "kang.atlas", ignore_errors=True)
    rows.append(known_type_ceiling(work / "known.atlas", seed, cfg, query, nxt))
    return rows


VOTES = ("knn", "nearest", "balanced", "centroid")
"""Votes over the final embedding: the atlas's (weighted kNN, k = 50), the nearest labelled cell, the kNN vote
divided by each type's cell count, the nearest type centroid."""


def vote_alternatives(path, nxt) -> dict:
    """Label 1244's cells by other votes over the same final embedding (is it the vote or the embedding?).

    Per vote in :data:`VOTES`: ``vote_<name>_named``, the share of 1244's FCGR3A+ Monocytes given
    the name, and ``vote_<name>_known``, the share of its other cells given their true type.
    """
    from atlasengine import Atlas
    from atlasengine.transfer.knn import brute_force_knn, label_probabilities

    atlas = Atlas.open(path)
    obs, z = atlas.obs(), atlas.latent()
    labelled = obs["label"].notna().to_numpy()
    cats, codes = np.unique(obs["label"][labelled].astype(str).to_numpy(), return_inverse=True)
    zq = z[obs.index.get_indexer(nxt.obs_names)]
    truth = nxt.obs[C.SCENARIOS["kang"].label_key].astype(str).to_numpy()
    novel = truth == NOVEL
    dist, _, nb = brute_force_knn(z[labelled], codes, zq, atlas.config.transfer.k)
    probs = label_probabilities(dist, nb, len(cats), atlas.config.transfer.kernel)
    centroids = np.stack([z[labelled][codes == j].mean(axis=0) for j in range(len(cats))])
    votes = {"knn": probs.argmax(axis=1), "nearest": nb[:, 0],
             "balanced": (probs / np.bincount(codes, minlength=len(cats))).argmax(axis=1),
             "centroid": ((zq[:, None, :] - centroids[None]) ** 2).sum(axis=2).argmin(axis=1)}
    out = {}
    for name in VOTES:
        pred = cats[votes[name]]
        out[f"vote_{name}_named"] = float((pred[novel] == NAME).mean())
        out[f"vote_{name}_known"] = float((pred[~novel] == truth[~novel]).mean())
    return out


def known_type_ceiling(path, seed: int, cfg: dict, query, nxt) -> dict:
    """Label 1244 with the type known: reference donors with their FCGR3A+ Monocytes, then 1488 and 1244 by ewc."""
    from atlasengine import Atlas

    sc = C.SCENARIOS["kang"]
    ref, _ = C.load_scenario("kang", novel_in_reference=True)
    t0 = time.perf_counter()
    C.create_reference(path, sc, ref, seed, cfg["ref_epochs"], cfg["query_epochs"])
    atlas = Atlas.open(path)
    atlas.ingest(query, batch_key=sc.batch_key, dataset="1488", strategy=STRATEGIES[0], runtime={"progress": False})
    res = atlas.ingest(nxt, batch_key=sc.batch_key, dataset=NEXT_DONOR, strategy=STRATEGIES[0],
                       runtime={"progress": False})
    m = nxt.obs[sc.label_key].eq(NOVEL).to_numpy()
    pred = res.predictions.loc[nxt.obs_names]
    went = pred["label"].to_numpy()[m]
    row = {"strategy": f"{STRATEGIES[0]}, type known", "seed": seed, "n_next": int(m.sum()),
           "next_named": float((pred["predicted_label"].to_numpy()[m] == NOVEL).mean()),
           "next_labelled": float((went == NOVEL).mean()), "next_labels": pd.Series(went).value_counts().to_dict(),
           "seconds": time.perf_counter() - t0}
    print(f"ceiling seed {seed}: donor {NEXT_DONOR}: {row['next_labelled']:.0%} of {m.sum()} labelled {NOVEL} with "
          "the type in the reference", flush=True)
    return row


def workflow(path, strategy: str, seed: int, query, nxt) -> dict:
    """Fold in ``query`` (donor 1488), name the purest unknown group, fold in ``nxt`` (1244); one run's figures."""
    from atlasengine import Atlas

    sc = C.SCENARIOS["kang"]
    t0 = time.perf_counter()
    atlas = Atlas.open(path)
    engine_strategy, continual = C.engine_method(strategy)
    res = atlas.ingest(query, batch_key=sc.batch_key, dataset="1488", strategy=engine_strategy, continual=continual,
                       runtime={"progress": False})
    truth = query.obs[sc.label_key].astype(str)
    novel = truth.eq(NOVEL).to_numpy()
    p = res.predictions.loc[query.obs_names]
    groups = atlas.unknown_groups(gene_key="gene_symbol")
    shares = [truth.loc[cells].eq(NOVEL).mean() for cells in groups["cells"]] if len(groups) else []
    row = {"strategy": strategy, "seed": seed, "n_novel_query": int(novel.sum()), "novel_called": float(p["is_unknown"].to_numpy()[novel].mean()),
           "known_called": float(p["is_unknown"].to_numpy()[~novel].mean()), "n_groups": len(groups)}
    if not shares:
        return {**row, "group_cells": 0, "group_purity": float("nan"), "fcgr3a_in_markers": False,
                "next_named": float("nan"), "next_labelled": float("nan"), "seconds": time.perf_counter() - t0}
    best = int(np.argmax(shares))
    cells = groups["cells"].iloc[best]
    markers = groups["markers"].iloc[best]
    atlas.relabel(cells, NAME, note="FCGR3A up")
    res2 = atlas.ingest(nxt, batch_key=sc.batch_key, dataset=NEXT_DONOR, strategy=engine_strategy,
                        continual=continual, runtime={"progress": False})
    m = nxt.obs[sc.label_key].eq(NOVEL).to_numpy()
    pred2 = res2.predictions.loc[nxt.obs_names]
    went = pred2["label"].to_numpy()[m]
    row.update(group_cells=len(cells), group_purity=float(shares[best]), group_closest=groups["closest_type"].iloc[best],
               fcgr3a_in_markers="FCGR3A" in markers, markers=", ".join(markers), n_next=int(m.sum()),
               next_named=float((pred2["predicted_label"].to_numpy()[m] == NAME).mean()),
               next_labelled=float((went == NAME).mean()),
               next_labels=pd.Series(went).value_counts().to_dict(), **vote_alternatives(path, nxt),
               seconds=time.perf_counter() - t0)
    print(f"{strategy} seed {seed}: group {len(cells)} cells, {shares[best]:.0%} {NOVEL}, FCGR3A in markers "
          f"{'FCGR3A' in markers}; donor {NEXT_DONOR}: {row['next_named']:.0%} of {m.sum()} named", flush=True)
    return row


def expression_ceiling(k: int = 50, n_pcs: int = 50) -> dict:
    """Share of 1244's FCGR3A+ Monocytes labelled as such without any model of the atlas, the type known.

    Log-normalised, scaled counts of the reference donors (all their types, FCGR3A+ Monocytes
    labelled): the engine's weighted kNN vote in a PCA of them, and a supervised classifier
    (multinomial logistic regression on every gene) trained on them. Whether the boundary is the
    engine's embedding's, the vote's, or the annotation's.
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression

    from atlasengine.transfer.groups import log_normalise
    from atlasengine.transfer.knn import brute_force_knn, label_probabilities

    sc = C.SCENARIOS["kang"]
    full = C.read_data(sc.file)
    donor = full.obs[sc.batch_key].astype(str)
    label = full.obs[sc.label_key].astype(str).to_numpy()
    x = log_normalise(sp.csr_matrix(full.X)).toarray()
    ref = donor.isin(sc.ref_batches).to_numpy()
    x = (x - x[ref].mean(axis=0)) / np.maximum(x[ref].std(axis=0), 1e-8)  # scaled by the reference donors alone
    nxt = donor.eq(NEXT_DONOR).to_numpy()
    pca = PCA(n_pcs, random_state=0).fit(x[ref])
    cats, codes = np.unique(label[ref], return_inverse=True)
    dist, _, neighbor_codes = brute_force_knn(pca.transform(x[ref]), codes, pca.transform(x[nxt]), k)
    probs = label_probabilities(dist, neighbor_codes, len(cats))
    pred = cats[probs.argmax(axis=1)]
    m = label[nxt] == NOVEL
    classifier = LogisticRegression(max_iter=3000).fit(x[ref], label[ref]).predict(x[nxt])
    return {"n_pcs": n_pcs, "k": k, "n_genes": int(x.shape[1]), "next_named": float((pred[m] == NOVEL).mean()),
            "to": pd.Series(pred[m]).value_counts().to_dict(),
            "classifier_named": float((classifier[m] == NOVEL).mean()),
            "classifier_known": float((classifier[~m] == label[nxt][~m]).mean()),
            "classifier_to": pd.Series(classifier[m]).value_counts().to_dict()}


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0], default_seeds=3)
    cfg = {"ref_epochs": 10, "query_epochs": 5} if args.quick else {"ref_epochs": 150, "query_epochs": 100}
    C.quiet()
    t0 = time.perf_counter()
    rows = C.run_jobs(run_one, [(seed, cfg, args.out) for seed in C.seeds_of(args)], args.jobs)
    df = pd.DataFrame([r for part in rows for r in part[:-1]])
    df = df.sort_values(["strategy", "seed"], key=lambda c: c.map(STRATEGIES.index) if c.name == "strategy" else c)
    known = pd.DataFrame([part[-1] for part in rows])
    expression = expression_ceiling()
    vote_columns = [f"vote_{v}_{w}" for v in VOTES for w in ("named", "known")]
    wall = time.perf_counter() - t0
    shown = ["strategy", "seed", "n_novel_query", "novel_called", "known_called", "n_groups", "group_cells", "group_purity",
             "fcgr3a_in_markers", "n_next", "next_named", "next_labelled", "next_labels"]
    default = df[df.strategy == STRATEGIES[0]]
    met_group = bool((default["group_purity"] >= 0.8).all() and default["fcgr3a_in_markers"].all())
    met_next = bool((default["next_labelled"] >= 0.8).all())
    others = "; ".join(
        f"{s}: group bar {'met' if ((g.group_purity >= 0.8) & g.fcgr3a_in_markers.astype(bool)).all() else 'missed'}, "
        f"next donor {g.next_labelled.mean():.0%} labelled (mean)" for s, g in df.groupby("strategy", sort=False)
        if s != STRATEGIES[0])
    md = [
        "# Naming a new type: kang's FCGR3A+ monocytes" + (" (held-out seeds)" if C.held_out(args) else "")
        + (" (QUICK MODE: smoke run, numbers not meaningful)"
                                                          if args.quick else ""),
        "",
        f"{C.seeds_said(args)}. Reference: donors 1015 + 1256 without {NOVEL}, {cfg['ref_epochs']} epochs; donor "
        "1488 folded in with each "
        f"strategy from a copy of it ({cfg['query_epochs']} epochs), atlas defaults otherwise (Unknown rule: calibrated novelty). The purest "
        f"unknown group is named, then donor {NEXT_DONOR} is folded in. `novel_called` / `known_called`: share of "
        f"1488's {NOVEL} / other cells called Unknown; `next_named`: share of {NEXT_DONOR}'s {NOVEL} predicted with "
        "the name (the kNN vote); `next_labelled`: share whose label is the name (predicted and not called Unknown); "
        "`next_labels`: all their labels.",
        "",
        C.md_table(df[[c for c in shown if c in df]]),
        "",
        f"Bar, at the atlas's default ({STRATEGIES[0]}): a group >= 80% {NOVEL} with FCGR3A among its 10 markers: "
        f"{'met' if met_group else 'MISSED'}; >= 80% of {NEXT_DONOR}'s {NOVEL} labelled with the name: "
        f"{'met' if met_next else 'MISSED'}. The same workflow with the other strategies, for the cause: {others}.",
        "",
        f"Other votes over the same final embedding (means over seeds): share of {NEXT_DONOR}'s {NOVEL} given the "
        f"name / share of its other cells given their true type. `knn`: the atlas's weighted vote (k = 50; its first "
        "column repeats `next_named`); `nearest`: the nearest labelled cell; `balanced`: the kNN vote divided by each "
        "type's cell count; `centroid`: the nearest type centroid.",
        "",
        C.md_table(df.groupby("strategy", sort=False)[[c for c in vote_columns if c in df]].mean().reset_index()),
        "",
        f"The type known from the start, nothing to name: the same reference donors with their {NOVEL} labelled (same epochs, same "
        f"seed), then 1488 and {NEXT_DONOR} folded in with {STRATEGIES[0]}; `next_named` / `next_labelled`: share of "
        f"{NEXT_DONOR}'s {NOVEL} predicted / labelled {NOVEL}. Mean labelled {known.next_labelled.mean():.0%} "
        f"(the naming bar asks 80% of a type learnt from a few dozen named cells).",
        "",
        C.md_table(known[["strategy", "seed", "n_next", "next_named", "next_labelled", "next_labels"]]),
        "",
        f"Without any model: the same kNN vote (k={expression['k']}) in a PCA of log-normalised, scaled counts "
        f"({expression['n_pcs']} components fit on the reference donors, their {NOVEL} labelled) predicts {NOVEL} for "
        f"{expression['next_named']:.0%} of {NEXT_DONOR}'s; the others: {expression['to']}. A supervised classifier "
        f"(multinomial logistic regression on all {expression['n_genes']} genes of the same counts, trained on every "
        f"reference cell with its label) calls {expression['classifier_named']:.0%} of them {NOVEL} "
        f"({expression['classifier_to']}) and {expression['classifier_known']:.0%} of {NEXT_DONOR}'s other cells "
        "their own type" + (": on these annotations even a classifier that sees every labelled cell of the type "
                            "stays under the 80% bar." if expression["classifier_named"] < 0.8 else "."),
        "",
        "Markers of the named group: " + "; ".join(f"{r.strategy} seed {r.seed}: {r.markers}" for r in df.itertuples()
                                                   if isinstance(getattr(r, "markers", None), str)),
        "",
        f"Total wall time {wall / 60:.1f} min.",
    ]
    C.write_outputs(args.out, C.output_name("naming", args), {"quick": args.quick, "settings": cfg, "seeds": args.seeds, "first_seed": args.first_seed,
                                         "met_group": met_group, "met_next": met_next, "records": df.to_dict("records"),
                                         "known_type_ceiling": known.to_dict("records"),
                                         "expression_ceiling": expression,
                                         "wall_seconds": wall}, "\n".join(md))


if __name__ == "__main__":
    main()
