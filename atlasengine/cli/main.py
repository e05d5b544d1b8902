"""The ``atlasengine`` command line.

atlasengine demo                      build an atlas from real data, fold in two queries
atlasengine create PATH -i ref.h5ad --batch-key tech --label-key celltype [--backed]
atlasengine create PATH -i census.soma --soma --obs-filter "tissue == 'lung'" --batch-key ... --label-key ...
atlasengine ingest PATH -i query.h5ad --batch-key tech --strategy ewc
atlasengine transfer PATH -i query.h5ad --batch-key tech -o predictions.csv|.tsv|.parquet|.h5ad
atlasengine versions PATH
atlasengine report PATH -o audit.html
atlasengine export PATH -o atlas.h5ad [--counts] [--version N]
atlasengine relabel PATH --cells cells.txt --label NAME [--note TEXT]
atlasengine unlock PATH [--force]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

from atlasengine.cli.output import configure_logging, versions_table
from atlasengine.config import STRATEGIES
from atlasengine.errors import AtlasError


def _read(path: str, backed: bool = False):
    import anndata as ad

    p = Path(path)
    if not p.exists():
        raise AtlasError(f"input file {p} does not exist")
    try:
        with warnings.catch_warnings():  # the engine names duplicate cell names itself, as an error
            warnings.filterwarnings("ignore", message="(Observation|Variable) names are not unique",
                                    category=UserWarning)
            return ad.read_h5ad(p, backed="r" if backed else None)
    except Exception as exc:  # h5py/anndata raise many types for a bad file
        raise AtlasError(f"cannot read {p} as an .h5ad file: {exc}") from exc


def _source(args: argparse.Namespace) -> tuple[Any, str | None]:
    """Return the input of create / ingest: an .h5ad file (in memory, or backed with --backed) or a SOMA experiment.

    Returns the data and the layer argument for the call (a SOMA experiment's layer goes into its SomaInput).
    """
    from atlasengine import SomaInput

    if args.soma:
        return SomaInput(args.input, obs_filter=args.obs_filter, layer=args.layer), None
    if args.obs_filter:
        raise AtlasError("--obs-filter selects cells of a SOMA experiment: pass --soma with it")
    return _read(args.input, backed=args.backed), args.layer


def cmd_create(args: argparse.Namespace) -> None:
    """Train a reference on ``args.input`` and write version 1 of a new atlas at ``args.path``."""
    from atlasengine import Atlas

    config = {"reference_training": {"max_epochs": args.epochs}} if args.epochs is not None else None
    data, layer = _source(args)
    atlas = Atlas.create(args.path, data, batch_key=args.batch_key, label_key=args.label_key,
                         dataset=args.dataset, layer=layer, config=config, runtime=_runtime(args))
    print(f"created {atlas}")


def cmd_ingest(args: argparse.Namespace) -> None:
    """Fold ``args.input`` into the atlas as a new version and print a summary of the fold-in."""
    from atlasengine import Atlas

    atlas = Atlas.open(args.path)
    training = {"max_epochs": args.epochs} if args.epochs is not None else None
    continual = {k: v for k, v in (("ewc_lambda", args.ewc_lambda), ("embedding_anchor", args.embedding_anchor))
                 if v is not None} or None
    data, layer = _source(args)
    res = atlas.ingest(data, batch_key=args.batch_key, strategy=args.strategy, label_key=args.label_key,
                       dataset=args.dataset, layer=layer, training=training, continual=continual,
                       runtime=_runtime(args))
    p = res.predictions
    low, high = p.attrs["novel_share_interval"]
    print(f"version {res.version.number} ({args.strategy}): {res.version.n_new_cells} cells folded in, "
          f"{float(p['is_unknown'].mean()):.1%} called Unknown (rule: {p.attrs['unknown_rule']}; it finds "
          f"{p.attrs['novel_share']:.1%} of the cells new to the atlas, 90% interval {low:.1%}-{high:.1%}); "
          f"{res.training['epochs']} epochs in {res.training['seconds']:.1f} s. Predictions: atlasengine export "
          f"{shlex.quote(str(args.path))} -o out.h5ad")


def cmd_transfer(args: argparse.Namespace) -> None:
    """Label the cells of ``args.input`` without folding them in; write the predictions as the output's suffix names."""
    from atlasengine import Atlas

    atlas = Atlas.open(args.path, version=args.version)
    rule = {"unknown_rule": args.unknown_rule, "novelty_target": args.novelty_target,
            "novelty_calibration": args.novelty_calibration}
    suffix = Path(args.output).suffix.lower()
    if suffix not in PREDICTION_FORMATS:
        raise AtlasError(f"cannot tell the format of {args.output} from its extension: use one of "
                         f"{', '.join(PREDICTION_FORMATS)}")
    if Path(args.output).resolve() == Path(args.input).resolve():
        raise AtlasError(f"-o {args.output} is the input file: the predictions would replace it; write them to "
                         "another file")
    from atlasengine.api.outputs import check_output_path

    output = check_output_path(args.output, "the predictions")  # before the labelling, not after it
    query = _read(args.input)
    pred = atlas.transfer_labels(query, batch_key=args.batch_key, layer=args.layer,
                                 config={k: v for k, v in rule.items() if v is not None})
    try:
        _write_predictions(pred, query, str(output), suffix, atlas)
    except OSError as exc:
        raise AtlasError(f"cannot write the predictions to {args.output}: {exc.strerror or exc}") from exc
    low, high = pred.attrs["novel_share_interval"]
    print(f"wrote {len(pred)} predictions to {args.output} ({pred['is_unknown'].mean():.1%} Unknown, "
          f"rule: {pred.attrs.get('unknown_rule', 'uncertainty')}); the rule finds {pred.attrs['novel_share']:.1%} "
          f"of the cells new to the atlas (90% interval {low:.1%}-{high:.1%})")


PREDICTION_FORMATS = {".csv": "CSV", ".tsv": "tab-separated", ".parquet": "Parquet",
                      ".h5ad": "the input AnnData with the predictions in obs"}


def _write_predictions(pred, query, path: str, suffix: str, atlas) -> None:
    """Write ``pred`` (one row per cell of ``query``, from ``atlas``) in the format ``suffix`` names."""
    if suffix == ".csv":
        pred.to_csv(path)
    elif suffix == ".tsv":
        pred.to_csv(path, sep="\t")
    elif suffix == ".parquet":
        pred.to_parquet(path)
    else:
        from atlasengine.api.anndata_out import query_anndata

        query_anndata(query, pred, None, atlas.source, atlas.version).write_h5ad(path)  # the input's own columns aside


def cmd_versions(args: argparse.Namespace) -> None:
    """Print the committed versions of the atlas as a table."""
    from atlasengine import Atlas

    print(versions_table(Atlas.open(args.path)))


def cmd_report(args: argparse.Namespace) -> None:
    """Write the drift audit report (HTML) of the atlas to ``args.output``."""
    from atlasengine import Atlas
    from atlasengine.api.outputs import check_output_path

    check_output_path(args.output, "the report")  # a folder that does not exist is refused, as everywhere here
    _refuse_suffix(args.output, (".html", ".htm"), "the report (HTML)")
    report = Atlas.open(args.path, version=args.version).audit(args.output)
    path = report.path.resolve()
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); open {path.as_uri()} in a browser")
    for line in report.headline:
        print(f"  {line}")


def cmd_export(args: argparse.Namespace) -> None:
    """Write the atlas (metadata, predictions, embedding; counts with --counts) to an .h5ad file."""
    from atlasengine import Atlas
    from atlasengine.api.outputs import check_output_path

    output = check_output_path(args.output, "the export")
    _refuse_suffix(args.output, (".h5ad",), "the export (an AnnData file)")
    adata = Atlas.open(args.path, version=args.version).to_anndata(counts=args.counts)
    try:
        adata.write_h5ad(output)
    except OSError as exc:
        raise AtlasError(f"cannot write {args.output}: {exc}") from exc
    print(f"wrote {args.output}: {adata.n_obs} cells, embedding in obsm['X_atlasengine']"
          + (", counts in X" if args.counts else ""))


def _refuse_suffix(output: str, suffixes: tuple[str, ...], what: str) -> None:
    """Refuse an output whose extension names another format than the one written."""
    if Path(output).suffix.lower() not in suffixes:
        raise AtlasError(f"{what} is written as {' or '.join(suffixes)}; {output} names another format")


def _cell_names(path: str) -> list[str]:
    p = Path(path)
    if not p.exists():
        raise AtlasError(f"cell list {p} does not exist")
    try:
        text = p.read_text(encoding="utf-8-sig")  # a byte-order mark (Excel, Notepad) is not part of a name
    except (OSError, UnicodeDecodeError) as exc:
        raise AtlasError(f"cannot read the cell list {p}: {exc}") from exc
    return [line.strip() for line in text.splitlines() if line.strip()]


def cmd_relabel(args: argparse.Namespace) -> None:
    """Give the cells named in ``args.cells`` (one a line) the label ``args.label`` in a new version."""
    from atlasengine import Atlas

    info = Atlas.open(args.path).relabel(_cell_names(args.cells), args.label, note=args.note)
    r = info.relabel
    before = [f"{n} {label}" for label, n in r.from_labels.items()]
    before += [f"{r.from_unlabelled} unlabelled"] if r.from_unlabelled else []
    print(f"version {info.number} (relabel): {r.n_cells} cells labelled {r.label!r} (before: {', '.join(before)})")


def cmd_unlock(args: argparse.Namespace) -> None:
    """Say whether the atlas's write lock is held; a lock a live process holds is never broken (``--force`` too)."""
    from atlasengine import Atlas

    if not Atlas.break_lock(args.path):
        print("the atlas is not locked (a writer that died holds no lock: the next ingest just runs)")


def cmd_demo(args: argparse.Namespace) -> None:
    """Run the demo: build an atlas from real data in ``args.out`` and fold in two queries."""
    from atlasengine.cli.demo import run_demo

    run_demo(Path(args.out), quick=args.quick)


def _runtime(args: argparse.Namespace) -> dict:
    """Return the machine settings of create / ingest: accelerator and training processes."""
    devices = args.devices.strip()
    return {"accelerator": args.accelerator, "devices": int(devices) if devices.isdigit() else devices}


def _streaming_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backed", action="store_true",
                   help="read the .h5ad backed: counts in parts, never whole in memory (for data larger than memory)")
    p.add_argument("--soma", action="store_true",
                   help="the input is a TileDB-SOMA experiment (a folder or URI); --layer names its X layer")
    p.add_argument("--obs-filter", help="with --soma: a SOMA value filter selecting cells, e.g. \"tissue == 'lung'\"")
    p.add_argument("--accelerator", default="auto", help="where training runs: auto (a GPU if there is one), cpu, gpu")
    p.add_argument("--devices", default="1",
                   help="training processes (DDP): a count, or GPU ids such as 0,1 (default 1)")


PATH_HELP = "the atlas folder"
INPUT_HELP = "an .h5ad file of raw counts (X, or --layer)"
BATCH_HELP = "obs column of the batch (donor, sample, technology)"


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of the ``atlasengine`` command and its subcommands."""
    p = argparse.ArgumentParser(prog="atlasengine", description="A versioned single-cell reference atlas with continual (EWC) fold-in.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details; tracebacks of errors")
    common = argparse.ArgumentParser(add_help=False)  # -v after the subcommand too
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log progress details; tracebacks of errors")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, **kwargs) -> argparse.ArgumentParser:  # every subcommand takes -v too
        return sub.add_parser(name, parents=[common], **kwargs)

    d = command("demo", help="build an atlas from real data and fold in two queries")
    d.add_argument("--out", default="atlasengine-demo", help="folder for the demo atlas and report")
    d.add_argument("--quick", action="store_true", help="few epochs (a smoke run)")
    d.set_defaults(func=cmd_demo)

    c = command("create", help="train a reference and write version 1")
    c.add_argument("path", help="where the new atlas goes (a folder that does not exist yet, or is empty)")
    c.add_argument("-i", "--input", required=True, help=INPUT_HELP + ", or a SOMA experiment with --soma")
    c.add_argument("--batch-key", required=True, help=BATCH_HELP)
    c.add_argument("--label-key", required=True, help="obs column of the cell types")
    c.add_argument("--dataset", default="reference", help="the dataset's name in the atlas (default: reference)")
    c.add_argument("--layer", help="the layer holding raw counts, if not X")
    c.add_argument("--epochs", type=int, help="training epochs (default: scvi-tools' rule, at most 400)")
    _streaming_options(c)
    c.set_defaults(func=cmd_create)

    i = command("ingest", help="fold a query into the atlas as a new version (predictions: atlasengine export)")
    i.add_argument("path", help=PATH_HELP)
    i.add_argument("-i", "--input", required=True, help=INPUT_HELP + ", or a SOMA experiment with --soma")
    i.add_argument("--batch-key", required=True, help=BATCH_HELP + "; its values must be new to the atlas")
    i.add_argument("--label-key", help="obs column of known labels, if any (they label later queries)")
    i.add_argument("--strategy", choices=list(STRATEGIES), default="ewc",
                   help="ewc: every weight trains under the EWC penalty, with reference replay (default); "
                   "finetune: no penalty; surgery: only the new batch columns train (scArches)")
    i.add_argument("--dataset", help="the dataset's name in the atlas (default: dataset_v<N>)")
    i.add_argument("--layer", help="the layer holding raw counts, if not X")
    i.add_argument("--epochs", type=int, help="training epochs (default: scvi-tools' rule, at most 200)")
    i.add_argument("--ewc-lambda", type=float,
                   help="ewc: strength of the EWC penalty, a multiple of the Laplace weight (default: the atlas's; 1 for "
                   "a new atlas)")
    i.add_argument("--embedding-anchor", type=float,
                   help="ewc: weight of the penalty that holds the replayed reference cells' embeddings (default: the "
                   "atlas's; 1000 for a new atlas; 0 = off, and --ewc-lambda 100 --embedding-anchor 0 is the default before "
                   "2026-12-06)")
    _streaming_options(i)
    i.set_defaults(func=cmd_ingest)

    t = command("transfer", help="label cells without folding them in")
    t.add_argument("path", help=PATH_HELP)
    t.add_argument("-i", "--input", required=True, help=INPUT_HELP)
    t.add_argument("--batch-key", required=True, help=BATCH_HELP)
    t.add_argument("--layer", help="the layer holding raw counts, if not X")
    t.add_argument("-o", "--output", required=True,
                   help="where the predictions go, in the format its extension names: " + ", ".join(
                       f"{k} ({v})" for k, v in PREDICTION_FORMATS.items()))
    t.add_argument("--version", type=int, help="label with this version of the atlas (default: the newest)")
    t.add_argument("--unknown-rule", choices=["uncertainty", "novelty"],
                   help="Unknown when the calibrated novelty score is above its threshold for --novelty-target false "
                   "alarms (novelty, the atlas default) or when the kNN uncertainty is above 0.3 (the paper's rule)")
    t.add_argument("--novelty-target", type=float, help="share of known cells allowed to be called Unknown (0.05)")
    t.add_argument("--novelty-calibration", choices=["query", "reference"],
                   help="take the query's shift from the reference off first (query, the default) or not")
    t.set_defaults(func=cmd_transfer)

    v = command("versions", help="list the committed versions")
    v.add_argument("path", help=PATH_HELP)
    v.set_defaults(func=cmd_versions)

    r = command("report", help="write the drift audit report (HTML)")
    r.add_argument("path", help=PATH_HELP)
    r.add_argument("-o", "--output", required=True, help="the HTML file to write (works offline)")
    r.add_argument("--version", type=int, help="the version to audit (default: the newest)")
    r.set_defaults(func=cmd_report)

    e = command("export", help="write the atlas as an .h5ad file (obs, embedding; counts with --counts)")
    e.add_argument("path", help=PATH_HELP)
    e.add_argument("-o", "--output", required=True, help="the .h5ad file to write")
    e.add_argument("--version", type=int, help="the version to export (default: the newest)")
    e.add_argument("--counts", action="store_true", help="also read every cell's raw counts into X")
    e.set_defaults(func=cmd_export)

    lb = command("relabel", help="name cells (a new version that changes labels only; no retraining)")
    lb.add_argument("path", help=PATH_HELP)
    lb.add_argument("--cells", required=True, help="a text file with one cell name (atlas obs index) per line")
    lb.add_argument("--label", required=True, help="the new or existing cell type name")
    lb.add_argument("--note", help="why, kept with the version's record")
    lb.set_defaults(func=cmd_relabel)

    u = command("unlock", help="check the write lock: a dead writer holds none, a live one's is not broken")
    u.add_argument("path", help=PATH_HELP)
    u.add_argument("--force", action="store_true",
                   help="accepted for old scripts; a lock that a live process holds is still not broken")
    u.set_defaults(func=cmd_unlock)
    return p


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


CLI_WORDS = (
    ("pass dataset=<new name>", "pass --dataset <new name>"),
    ("the layer that holds them with layer=", "the layer that holds them with --layer"),
    ("open it with Atlas.open", "fold data into it with `atlasengine ingest`"),
)
"""The API's words in the engine's messages that mean an option on the command line: (API, CLI)."""


def _cli_words(message: str) -> str:
    """Say an engine message in the command line's terms (``--layer``, not ``layer=``)."""
    for api, cli in CLI_WORDS:
        message = message.replace(api, cli)
    return message


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv``; return the exit status.

    An error is one line on stderr, without a traceback (``-v`` adds it): status 2 for the
    engine's own errors (:class:`AtlasError`), 1 for anything else, 130 when interrupted.
    """
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        args.func(args)
        return 0
    except AtlasError as exc:
        error, status, line = exc, 2, f"atlasengine: error: {_cli_words(_one_line(exc))}"
    except KeyboardInterrupt as exc:
        error, status, line = exc, 130, "atlasengine: interrupted; nothing was committed unless the command said so"
    except Exception as exc:  # a bug or a library failure: still one line, the traceback with -v
        error, status, line = exc, 1, f"atlasengine: unexpected error ({type(exc).__name__}): {_one_line(exc)}"
    if args.verbose:
        traceback.print_exception(error)
    elif status == 1:
        line += " (-v shows the traceback)"
    print(line, file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
