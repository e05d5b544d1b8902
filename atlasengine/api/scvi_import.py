"""Reading an scvi-tools ``SCVI`` reference (``model.save``) into the engine's model, without unpickling code.

scvi-tools saves ``model_dir/model.pt``: a pickled dict of the module's weights, the gene names
and the model's settings (``attr_dict``: init parameters, the AnnData registry with the batch
categories, the training history). It is read with a restricted unpickler that rebuilds tensors,
numpy arrays and plain Python containers only; pandas objects (the training history) are
dropped unread, and any other class refuses the file. Only what the engine's model represents
is accepted: scArches settings (layer norm in encoder and decoder, no batch norm, covariates
encoded and injected into every layer), a gene dispersion, NB or ZINB, the observed library
size, a normal latent, one batch covariate and nothing else. Anything else is refused with a
message that names the setting.
"""

from __future__ import annotations

import json
import pickle
import types
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atlasengine.config import ModelConfig
from atlasengine.errors import AtlasFormatError, InputError
from atlasengine.model import CVAE

MODEL_FILE = "model.pt"
_ALLOWED = {
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch", "Size"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    *(("builtins", t) for t in ("dict", "list", "tuple", "int", "float", "str", "bool", "bytes", "complex", "bytearray")),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("_codecs", "encode"),  # how numpy pickles its raw buffers (str -> bytes)
}
_DROPPED_MODULES = ("pandas",)  # the training history: not needed, not rebuilt


class _Dropped:
    """Stands in for an object the restricted reader does not rebuild (a pandas table of the history)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Dropped:
        return _Dropped()


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds tensors, numpy arrays and builtins, nothing that could run code."""

    def find_class(self, module: str, name: str) -> Any:
        module = {"__builtin__": "builtins"}.get(module, module)  # protocol-2 names
        if (module, name) in _ALLOWED or (module.startswith("numpy") and name.endswith("DType")):
            return super().find_class(module, name)
        if module.split(".")[0] in _DROPPED_MODULES:
            return _Dropped
        raise AtlasFormatError(f"refusing to read {module}.{name} from an scvi-tools checkpoint (only tensors, "
                               "numpy arrays and plain containers are read)")


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return _RestrictedUnpickler(file, **kwargs).load()


# torch reads a zip checkpoint with ``Unpickler`` and an old-format one with ``load``: both restricted
_restricted_pickle = types.SimpleNamespace(Unpickler=_RestrictedUnpickler, load=_restricted_load, __name__="restricted")


def _check_archive(path: Path) -> None:
    """Refuse what ``torch.load`` would not read as a zip of pickled data: old-format files, TorchScript."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise AtlasFormatError(f"{path} is not a checkpoint torch.save writes (a zip archive; {exc}): scvi-tools' "
                               "model.save writes one, and older formats are not read") from exc
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        raise AtlasFormatError(f"{path} is a TorchScript archive, which holds code: it is not read; pass the folder "
                               "scvi-tools' model.save wrote")


@dataclass
class ScviReference:
    """What the engine takes from a saved SCVI model: weights, genes, settings, batch categories."""

    state: dict[str, torch.Tensor]
    genes: list[str]
    init: dict[str, Any]
    batch_key: str
    batches: list[str]
    model_name: str


def read_scvi(model_dir: str | Path) -> ScviReference:
    """Read ``model_dir/model.pt`` (scvi-tools ``model.save``) without unpickling arbitrary objects.

    Raises
    ------
    AtlasFormatError
        When the file is missing, unreadable, or holds objects other than tensors, arrays and containers.
    """
    path = Path(model_dir) / MODEL_FILE
    if not path.exists():
        raise AtlasFormatError(f"{path} does not exist: pass the folder scvi-tools' model.save wrote")
    _check_archive(path)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle)
    except AtlasFormatError:
        raise
    except Exception as exc:  # torch and pickle raise many types for a bad file
        raise AtlasFormatError(f"cannot read the scvi-tools checkpoint {path}: {exc}") from exc
    try:
        attrs = raw["attr_dict"]
        registry = attrs["registry_"]
        init = {**attrs["init_params_"].get("non_kwargs", {}), **_flatten_kwargs(attrs["init_params_"].get("kwargs", {}))}
        setup = registry["setup_args"]
        _check_setup(setup)
        batch = registry["field_registries"]["batch"]["state_registry"]
        state = {k: v for k, v in raw["model_state_dict"].items() if isinstance(v, torch.Tensor)}
        return ScviReference(state=state, genes=[str(g) for g in np.asarray(raw["var_names"])], init=init,
                             batch_key=str(batch.get("original_key") or setup.get("batch_key")),
                             batches=[str(b) for b in batch["categorical_mapping"]],
                             model_name=str(registry.get("model_name", "?")))
    except (KeyError, TypeError) as exc:
        raise AtlasFormatError(f"{path} is not an scvi-tools model saved by model.save (missing {exc})") from exc


def _flatten_kwargs(kwargs: dict) -> dict:
    """scvi-tools nests ``**model_kwargs`` as {"kwargs": {...}}: return one flat dict."""
    out = {}
    for key, value in kwargs.items():
        out.update(_flatten_kwargs(value) if key == "kwargs" and isinstance(value, dict) else {key: value})
    return out


def _check_setup(setup: dict) -> None:
    """Refuse an AnnData setup with covariates the engine's model does not have."""
    refuse = {
        "categorical_covariate_keys": "extra categorical covariates",
        "continuous_covariate_keys": "continuous covariates",
        "size_factor_key": "a size factor",
    }
    for key, what in refuse.items():
        if setup.get(key):
            raise InputError(f"the scvi-tools model was set up with {what} ({key}={setup[key]!r}); the engine's "
                             "model has one batch covariate and the observed library size only")


REQUIRED = {
    "use_layer_norm": ("both", "layer norm in encoder and decoder"),
    "use_batch_norm": ("none", "no batch norm"),
    "encode_covariates": (True, "covariates encoded"),
    "deeply_inject_covariates": (True, "covariates injected into every layer"),
    "dispersion": ("gene", "a gene dispersion"),
    "use_observed_lib_size": (True, "the observed library size"),
    "latent_distribution": ("normal", "a normal latent"),
    "log_variational": (True, "log1p of the counts at the encoder input"),
    "batch_representation": ("one-hot", "a one-hot batch input"),
    "var_activation": (None, "exp for the posterior variance"),
    "extra_encoder_kwargs": (None, "scvi-tools' default encoder"),
    "extra_decoder_kwargs": (None, "scvi-tools' default decoder"),
}
DEFAULTS = {"deeply_inject_covariates": True, "use_observed_lib_size": True, "latent_distribution": "normal",
            "dispersion": "gene", "use_batch_norm": "both", "use_layer_norm": "none", "encode_covariates": False,
            "log_variational": True, "batch_representation": "one-hot", "var_activation": None,
            "extra_encoder_kwargs": None, "extra_decoder_kwargs": None}


def model_config(ref: ScviReference) -> ModelConfig:
    """Return the engine's ``ModelConfig`` for an scvi-tools reference, or refuse naming what it cannot represent."""
    if ref.model_name != "SCVI":
        raise InputError(f"the checkpoint holds a {ref.model_name} model; the engine imports scvi-tools SCVI models only")
    for key, (want, what) in REQUIRED.items():
        have = ref.init.get(key, DEFAULTS[key])
        have = None if isinstance(have, dict) and not have else have  # {} extra kwargs are scvi-tools' default
        if have != want:
            raise InputError(f"the scvi-tools model has {key}={have!r}; the engine represents {what} ({key}={want!r}) "
                             "only: retrain the reference with scArches settings, or build the atlas from counts")
    likelihood = ref.init.get("gene_likelihood", "zinb")
    if likelihood not in ("nb", "zinb"):
        raise InputError(f"the scvi-tools model has gene_likelihood={likelihood!r}; the engine represents nb or zinb only")
    return ModelConfig(n_hidden=int(ref.init.get("n_hidden", 128)), n_layers=int(ref.init.get("n_layers", 1)),
                       n_latent=int(ref.init.get("n_latent", 10)), dropout_rate=float(ref.init.get("dropout_rate", 0.1)),
                       likelihood=likelihood)


def to_module(ref: ScviReference) -> CVAE:
    """Build the engine's model with the scvi-tools weights: same embeddings, same likelihood.

    scvi-tools' covariate layers take ``[input, one-hot(batch)]``: the first columns of each
    weight are the engine's ``linear``, the last ``n_batches`` its ``batch_weight`` (transposed).
    A model of one batch has no batch columns (scvi-tools drops a covariate with one category):
    its batch weights are zero.
    """
    cfg = model_config(ref)
    n_genes, n_batches = len(ref.genes), len(ref.batches)
    module = CVAE(n_genes, n_batches, cfg)
    shapes = {k: v.shape for k, v in module.state_dict().items()}

    def weight(name: str) -> torch.Tensor:
        if name not in ref.state:
            raise AtlasFormatError(f"the scvi-tools checkpoint has no weight {name!r}: not a model the engine can "
                                   "import (SCVI with the scArches settings)")
        return ref.state[name]

    target: dict[str, torch.Tensor] = {}
    for part, prefix in (("encoder", "z_encoder.encoder"), ("decoder", "decoder.px_decoder")):
        for i in range(cfg.n_layers):
            w = weight(f"{prefix}.fc_layers.Layer {i}.0.weight")
            n_in = shapes[f"{part}.layers.{i}.linear.weight"][1]
            if w.shape[1] == n_in and n_batches == 1:
                target[f"{part}.layers.{i}.linear.weight"] = w
                target[f"{part}.layers.{i}.batch_weight"] = torch.zeros(shapes[f"{part}.layers.{i}.batch_weight"])
            elif w.shape[1] == n_in + n_batches:
                target[f"{part}.layers.{i}.linear.weight"] = w[:, :n_in]
                target[f"{part}.layers.{i}.batch_weight"] = w[:, n_in:].T
            else:
                raise AtlasFormatError(f"the scvi-tools weight {prefix}.fc_layers.Layer {i}.0.weight has {w.shape[1]} "
                                       f"inputs; the model's settings and {n_batches} batch(es) give {n_in} + "
                                       f"{n_batches}")
            target[f"{part}.layers.{i}.linear.bias"] = weight(f"{prefix}.fc_layers.Layer {i}.0.bias")
    pairs = {"z_mean": "z_encoder.mean_encoder", "z_var": "z_encoder.var_encoder", "px_scale": "decoder.px_scale_decoder.0"}
    if cfg.likelihood == "zinb":
        pairs["px_dropout"] = "decoder.px_dropout_decoder"
    for ours, theirs in pairs.items():
        target[f"{ours}.weight"] = weight(f"{theirs}.weight")
        target[f"{ours}.bias"] = weight(f"{theirs}.bias")
    target["px_r"] = weight("px_r")
    expected = set(module.state_dict())
    if set(target) != expected:
        raise AtlasFormatError(f"cannot map the scvi-tools weights: missing {sorted(expected - set(target))}")
    module.load_state_dict({k: v.detach().clone().contiguous().float() for k, v in target.items()})
    return module.eval()


def origin(ref: ScviReference, model_dir: str | Path) -> dict[str, Any]:
    """Return what the version record keeps of the import (JSON-ready): the source and its settings."""
    settings = json.loads(json.dumps(ref.init, default=str))
    return {"from": "scvi-tools SCVI", "model_dir": str(model_dir), "batch_key": ref.batch_key, "settings": settings}
