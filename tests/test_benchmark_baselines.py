"""The benchmarks' scvi-tools baselines and the sequential checks: what the tables compare must be what they say."""

from __future__ import annotations

import warnings

import pandas as pd
import scvi  # a test dependency (the "test" extra): missing means failing, not skipping
import torch

from benchmarks import scvi_baseline as S
from benchmarks import sequential


def _tiny_model(adata):
    adata = adata.copy()
    scvi.model.SCVI.setup_anndata(adata, batch_key="tech")
    scvi.settings.seed = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = scvi.model.SCVI(adata, **{**S.ARCH, "n_latent": 4, "n_hidden": 16})
        model.train(max_epochs=2, enable_progress_bar=False, accelerator="cpu")
    return model


def test_the_paper_fisher_is_taken_over_the_cells_given_in_their_batches(pancreas):
    a = pancreas[pancreas.obs["tech"].isin(["celseq", "indrop"])][:, :200].copy()
    a.obs["tech"] = a.obs["tech"].astype(str)
    model = _tiny_model(a)
    torch.manual_seed(0)  # the ELBO samples z, so the Fisher is drawn: the same draws by hand below
    whole = S.minibatch_fisher(model, a, batch_size=64)
    # by hand: squared gradients of each minibatch's mean loss, averaged over minibatches
    torch.manual_seed(0)
    module, sums, n = model.module, None, 0
    tensors_of = model._make_data_loader(adata=model._validate_anndata(a.copy()), batch_size=64)  # noqa: SLF001
    for tensors in tensors_of:
        module.zero_grad()
        module(tensors, loss_kwargs={"kl_weight": 1.0})[2].loss.backward()
        g = {k: p.grad.detach() ** 2 for k, p in module.named_parameters() if p.grad is not None}
        sums = g if sums is None else {k: sums[k] + g[k] for k in g}
        n += 1
    for k, v in sums.items():
        torch.testing.assert_close(whole[k], v / n)
    # the cells given count, not the model's own: a sequence's CLCVAE takes the Fisher over every cell seen so far
    # (same draws again, so the Fisher of the model's own cells would equal ``whole``)
    torch.manual_seed(0)
    part = S.minibatch_fisher(model, a[a.obs["tech"] == "celseq"], batch_size=64)
    assert not torch.allclose(part["z_encoder.encoder.fc_layers.Layer 0.0.weight"],
                              whole["z_encoder.encoder.fc_layers.Layer 0.0.weight"])


def _last_step(strategy: str, accuracy: float, loo_change: float, drift: float) -> list[dict]:
    return [{"scenario": "pancreas", "strategy": strategy, "seed": s, "step": 4, "accuracy_so_far": accuracy,
             "accuracy_so_far_all": accuracy,
             "ref_loo_change": loo_change, "drift": drift} for s in (6, 7)]


def test_sequential_checks_hold_each_method_to_its_own_libraries_finetune():
    df = pd.DataFrame([*_last_step("ewc", 0.70, 0.0, 0.10), *_last_step("finetune", 0.72, 0.0, 0.60),
                       *_last_step("scvi-tools finetune", 0.80, 0.0, 0.90),
                       *_last_step("CLCVAE (paper, scvi-tools)", 0.795, -0.02, 0.20)])
    checks = sequential.checks(df).set_index("check")
    ewc = checks.loc["3. after the last step"]
    assert (ewc.loo_met, ewc.accuracy_met, ewc.drift_met, ewc.met) == (True, False, True, False)  # 0.70 < 0.72 - 0.01
    assert "vs finetune 0.720" in ewc.measured and "0.17 of finetune's" in ewc.measured
    paper = checks.loc[[c for c in checks.index if c.startswith("3p.")][0]]
    assert (paper.loo_met, paper.accuracy_met, paper.drift_met) == (False, True, True)
    assert "vs scvi-tools finetune 0.800" in paper.measured
    assert "0.22 of scvi-tools finetune's" in paper.measured
    # without scvi-tools' rows the engine's check stands alone
    alone = sequential.checks(df[~df.strategy.isin(sequential.SCVI)])
    assert list(alone.check) == ["3. after the last step"]


def test_generated_cells_depend_on_the_seed_alone_not_on_torch_s_global_state(reference_atlas, pancreas):
    # the evidence benchmark generates each reference once for the engine's run and once for
    # scvi-tools': the same seed must give the same counts whatever ran before in the process
    from atlasengine import Atlas
    from benchmarks import common as C

    atlas = Atlas.open(reference_atlas)
    torch.manual_seed(1)
    a = C.generate_cells(atlas, 50, seed=7, real=pancreas)
    torch.manual_seed(2)
    b = C.generate_cells(atlas, 50, seed=7, real=pancreas)
    assert (a.X != b.X).nnz == 0 and a.X.nnz > 0
    assert (C.generate_cells(atlas, 50, seed=8, real=pancreas).X != a.X).nnz > 0
    state = torch.get_rng_state()
    C.generate_cells(atlas, 50, seed=7, real=pancreas)
    assert torch.equal(torch.get_rng_state(), state)  # and the caller's draws are left as they were


def test_check_2_says_when_the_papers_method_was_not_measured():
    from benchmarks import mapping

    values = {("ewc", "auroc_novel"): 0.8, ("ewc", "known_accuracy"): 0.9, ("ewc", "drift"): 0.1,
              ("surgery", "auroc_novel"): 0.7, ("surgery", "known_accuracy"): 0.9, ("finetune", "auroc_novel"): 0.75,
              ("finetune", "drift"): 1.0, (S.CLCVAE, "auroc_novel"): float("nan")}
    check = mapping.check2(lambda method, column: values[(method, column)], "ewc")
    assert f"{S.CLCVAE} not measured" in check["measured"]
    values[(S.CLCVAE, "auroc_novel")] = 0.85
    check = mapping.check2(lambda method, column: values[(method, column)], "ewc")
    assert "not measured" not in check["measured"] and not check["auroc_met"] and not check["met"]


def test_check_4_judges_the_default_as_well_as_the_penalty_alone():
    # both run on the evidence scale: a default whose drift grows with the atlas must read MISSED,
    # even where the penalty alone's falls (found by a review: only the penalty alone was judged)
    from benchmarks import evidence

    drift = {"ewc evidence lambda=100": [0.17, 0.06, 0.02], "ewc default (lambda=1 anchor=1000)": [0.07, 0.10, 0.05],
             "ewc fixed lambda=1": [0.43, 0.33, 0.34], "finetune": [0.9, 0.6, 0.6]}
    df = pd.DataFrame([{"setting": s, "size": size, "seed": seed, "drift": v + 0.001 * seed}
                       for s, vs in drift.items() for size, v in zip((1000, 10000, 100000), vs) for seed in (0, 1)])
    growth = {c["setting"]: c for c in evidence.drift_growth(df)}
    assert set(growth) == {"ewc evidence lambda=100", "ewc default (lambda=1 anchor=1000)"}
    assert growth["ewc evidence lambda=100"]["met"] and not growth["ewc default (lambda=1 anchor=1000)"]["met"]
    assert "10,000: 0.101" in growth["ewc default (lambda=1 anchor=1000)"]["measured"]


def test_the_sweeps_drift_part_is_the_ratio_of_mean_drifts_as_in_check_2():
    # seed drifts 0.1 / 1.0 and 0.5 / 0.5: the mean of the ratios is 0.55, the ratio of the means 0.4;
    # seeds 0.05 / 1.0 and 0.35 / 0.2: mean of ratios 0.90, ratio of means 0.33 (met)
    from benchmarks import lambda_sweep

    rows = []
    for seed, (ewc, ft) in enumerate(((0.05, 1.0), (0.35, 0.2))):
        for strategy, drift in (("surgery", 0.0), ("finetune", ft), ("ewc", ewc)):
            rows.append({"scenario": "kang", "setting": strategy if strategy != "ewc" else "anchor", "strategy": strategy,
                         "seed": seed, "auroc_novel": 0.9 if strategy == "ewc" else 0.8, "known_accuracy": 0.9,
                         "drift": drift, "drift_ratio": drift / ft})
    check = lambda_sweep.anchor_checks(pd.DataFrame(rows)).iloc[0]
    assert abs(check.drift_ratio - 0.4 / 1.2) < 1e-12 and check.check_2 == "met"
