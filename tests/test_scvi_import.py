"""An scvi-tools SCVI reference becomes version 1: same embeddings, an ingest works, what cannot be represented is refused."""

from __future__ import annotations

import pickle
import shutil
import warnings

import numpy as np
import pytest
import scvi  # a test dependency (the "test" extra): missing means failing, not skipping
import torch

from atlasengine import Atlas, AtlasFormatError, InputError

SCARCHES = dict(n_latent=4, n_hidden=16, n_layers=2, dropout_rate=0.2, gene_likelihood="nb", use_layer_norm="both",
                use_batch_norm="none", encode_covariates=True)


def _train(adata, path, model_class=None, setup=None, **overrides):
    cls = model_class or scvi.model.SCVI
    adata = adata.copy()
    cls.setup_anndata(adata, batch_key="tech", **(setup or {}))
    kwargs = {**SCARCHES, **overrides} if cls is scvi.model.SCVI else overrides
    scvi.settings.seed = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(adata, **kwargs)
        model.train(max_epochs=2, enable_progress_bar=False, accelerator="cpu")
        model.save(str(path), overwrite=True)
    return model


@pytest.fixture(scope="module")
def small(pancreas):
    a = pancreas[pancreas.obs["tech"].isin(["celseq", "indrop", "fluidigmc1"])][:, :300].copy()
    a.obs["tech"] = a.obs["tech"].astype(str)
    return a


def test_imported_reference_embeds_as_scvi_tools_and_takes_an_ingest(small, pancreas, tmp_path):
    model = _train(small, tmp_path / "scvi")
    atlas = Atlas.from_scvi(tmp_path / "a.atlas", tmp_path / "scvi", small, label_key="celltype",
                            runtime={"progress": False})
    expected = model.get_latent_representation(small)
    np.testing.assert_allclose(atlas.latent(), expected, atol=1e-4)
    assert atlas.version == 1 and atlas.info.training["epochs"] == 0
    assert atlas.config.model.n_hidden == 16 and atlas.info.fisher["represented_cells"] == small.n_obs
    query = pancreas[pancreas.obs["tech"] == "smartseq2"][:, :300].copy()
    res = atlas.ingest(query, batch_key="tech", strategy="ewc", training={"max_epochs": 2})
    assert res.version.number == 2 and len(res.predictions) == query.n_obs


REFUSED = [
    ("batch norm", {"use_batch_norm": "both"}, None, "use_batch_norm"),
    ("no layer norm", {"use_layer_norm": "none"}, None, "use_layer_norm"),
    ("covariates not encoded", {"encode_covariates": False}, None, "encode_covariates"),
    ("another dispersion", {"dispersion": "gene-batch"}, None, "dispersion"),
    ("another likelihood", {"gene_likelihood": "poisson"}, None, "gene_likelihood"),
    ("counts not log-transformed at the input", {"log_variational": False}, None, "log_variational"),
    ("batch embedding", {"batch_representation": "embedding"}, None, "batch_representation"),
    ("extra categorical covariate", {}, {"categorical_covariate_keys": ["dataset"]}, "categorical_covariate_keys"),
    ("continuous covariate", {}, {"continuous_covariate_keys": ["nCount_RNA"]}, "continuous_covariate_keys"),
]


@pytest.mark.parametrize("what,overrides,setup,setting", REFUSED, ids=[r[0] for r in REFUSED])
def test_a_setting_the_engine_cannot_represent_is_refused_by_name(small, tmp_path, what, overrides, setup, setting):
    _train(small, tmp_path / "scvi", setup=setup, **overrides)
    with pytest.raises(InputError, match=setting):
        Atlas.from_scvi(tmp_path / "a.atlas", tmp_path / "scvi", small, label_key="celltype")
    assert not (tmp_path / "a.atlas").exists()


def test_a_different_architecture_asked_for_in_the_config_is_refused(small, tmp_path):
    _train(small, tmp_path / "scvi")
    with pytest.raises(InputError, match=r"config\['model'\] asks for \{'n_latent': 5\}.*n_latent=4"):
        Atlas.from_scvi(tmp_path / "a.atlas", tmp_path / "scvi", small, label_key="celltype",
                        config={"model": {"n_latent": 5}})
    from atlasengine.config import AtlasConfig, ModelConfig

    for config in (AtlasConfig(model=ModelConfig(n_latent=5)), {"model": ModelConfig(n_latent=5)}):  # as pydantic models
        with pytest.raises(InputError, match=r"config\['model'\] asks for \{'n_latent': 5\}.*n_latent=4"):
            Atlas.from_scvi(tmp_path / "a.atlas", tmp_path / "scvi", small, label_key="celltype", config=config)
    assert not (tmp_path / "a.atlas").exists()


def test_a_model_class_other_than_scvi_is_refused(small, tmp_path):
    _train(small, tmp_path / "linear", model_class=scvi.model.LinearSCVI, n_latent=4)
    with pytest.raises(InputError, match="LinearSCVI"):
        Atlas.from_scvi(tmp_path / "a.atlas", tmp_path / "linear", small, label_key="celltype")


def test_a_checkpoint_that_would_run_code_is_refused_unread(small, tmp_path):
    _train(small, tmp_path / "scvi")
    raw = torch.load(tmp_path / "scvi" / "model.pt", weights_only=False)

    class Payload:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path / "victim"),))

    (tmp_path / "victim").mkdir()
    raw["attr_dict"]["history_"] = Payload()
    torch.save(raw, tmp_path / "scvi" / "model.pt", pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(AtlasFormatError, match="shutil.rmtree"):
        Atlas.from_scvi(tmp_path / "a.atlas", tmp_path / "scvi", small, label_key="celltype")
    assert (tmp_path / "victim").exists()  # the payload never ran


def test_the_reference_data_must_match_the_model(small, tmp_path):
    _train(small, tmp_path / "scvi")
    with pytest.raises(InputError, match="genes"):
        Atlas.from_scvi(tmp_path / "a.atlas", tmp_path / "scvi", small[:, :250].copy(), label_key="celltype")
    other = small.copy()
    other.obs["tech"] = "another_tech"
    with pytest.raises(InputError, match="not among the model's batches"):
        Atlas.from_scvi(tmp_path / "b.atlas", tmp_path / "scvi", other, label_key="celltype")


def test_a_checkpoint_in_torchs_old_format_or_as_torchscript_is_refused_unread(small, tmp_path):
    class Payload:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path / "victim"),))

    (tmp_path / "victim").mkdir()
    (tmp_path / "old").mkdir()
    with open(tmp_path / "old" / "model.pt", "wb") as f:
        pickle.dump({"attr_dict": Payload()}, f)  # no zip: torch would hand it to the pickle module whole
    with pytest.raises(AtlasFormatError, match="not a checkpoint torch.save writes"):
        Atlas.from_scvi(tmp_path / "a.atlas", tmp_path / "old", small, label_key="celltype")
    (tmp_path / "script").mkdir()
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "script" / "model.pt"))
    with pytest.raises(AtlasFormatError, match="TorchScript archive, which holds code"):
        Atlas.from_scvi(tmp_path / "a.atlas", tmp_path / "script", small, label_key="celltype")
    assert (tmp_path / "victim").exists() and not (tmp_path / "a.atlas").exists()


def test_a_model_of_one_batch_without_batch_key_is_imported(small, tmp_path):
    one = small.copy()
    scvi.model.SCVI.setup_anndata(one)  # no batch_key: scvi-tools writes obs["_scvi_batch"] = 0, no batch columns
    scvi.settings.seed = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = scvi.model.SCVI(one, **SCARCHES)
        model.train(max_epochs=2, enable_progress_bar=False, accelerator="cpu")
        model.save(str(tmp_path / "scvi"), overwrite=True)
    bare = small.copy()
    bare.obs = bare.obs[[c for c in bare.obs.columns if not c.startswith("_scvi")]]  # other tests' scvi-tools calls add them
    with pytest.raises(InputError, match=r"set up without a batch_key .* adata.obs\['_scvi_batch'\] = 0"):
        Atlas.from_scvi(tmp_path / "a.atlas", tmp_path / "scvi", bare, label_key="celltype")
    atlas = Atlas.from_scvi(tmp_path / "a.atlas", tmp_path / "scvi", one, label_key="celltype",
                            runtime={"progress": False})
    np.testing.assert_allclose(atlas.latent(), model.get_latent_representation(one), atol=1e-4)
    assert atlas.batches == ["0"]


def test_a_checkpoint_missing_a_weight_is_refused_by_its_name(small, tmp_path):
    from atlasengine.api.scvi_import import read_scvi, to_module
    from atlasengine.errors import AtlasFormatError

    _train(small, tmp_path / "scvi")
    ref = read_scvi(tmp_path / "scvi")
    del ref.state["decoder.px_decoder.fc_layers.Layer 1.0.bias"]
    with pytest.raises(AtlasFormatError, match="no weight 'decoder.px_decoder.fc_layers.Layer 1.0.bias'"):
        to_module(ref)
