"""Command line: ``python -m LandmarkDetectionLib <command>`` (console script ``landmark-detection``).

Every user-caused problem ends in one line ``error: <file>: <problem>`` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from pathlib import Path

from .errors import LandmarkError
from .agreement import add_agreement_command
from .annotation import add_qa_command
from .datasets import add_dataset_command
from .planes import add_planes_command
from .recipes import RECIPES
from .resources import BUNDLED_MODELS, bundled_model_path
from .sample_data import SAMPLE_SCHEMAS


def _triple(kind):
    def parse(text):
        parts = [p for p in text.replace("x", ",").split(",") if p]
        if len(parts) != 3:
            raise argparse.ArgumentTypeError(f"expected three values like 224,224,101, got {text!r}")
        return tuple(kind(p) for p in parts)
    return parse


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (options whose default is None, False or absent have none)."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        default = action.default
        if ((action.option_strings or action.nargs == "?") and not action.required and "(default" not in help_text
                and not any(default is v for v in (None, False, argparse.SUPPRESS))):
            shown = ",".join(map(str, default)) if isinstance(default, (tuple, list)) else default
            help_text += f" (default: {str(shown).replace('%', '%%')})"
        return help_text


class _Parser(argparse.ArgumentParser):
    """Help with defaults; a usage error is one line naming the command, exit code 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def number(kind, low, high, low_open=False):
    """An argparse type: a ``kind`` number from ``low`` to ``high`` (above ``low`` when ``low_open``)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (low < value if low_open else low <= value) or not value <= high:
            raise argparse.ArgumentTypeError(f"{text} is out of range: expected {'above' if low_open else 'from'} "
                                             f"{low} {'and at most' if low_open else 'to'} {high}")
        return value
    return parse


MAX_PASSES = 1000


def _passes(text):
    """--uncertainty: 0 (off) or 2 to MAX_PASSES noise passes (one pass has no spread)."""
    value = number(int, 0, MAX_PASSES)(text)
    if value == 1:
        raise argparse.ArgumentTypeError("1 pass gives no spread: use 0 (off) or 2 to 1000 passes")
    return value


def _ints(text):
    return tuple(int(v) for v in text.split(","))


def _on_off(text):
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, not {text!r}")
    return text == "on"


def _floats(text):
    return tuple(float(v) for v in text.split(","))


def _add_uncertainty(parser, default_passes=0):
    """``default_passes`` None: the model decides (detect.uncertainty_passes)."""
    default_text = ("default: the model's calibrated passes if it fuses with its registration prior, else 0"
                    if default_passes is None else f"default: {default_passes}")
    parser.add_argument("--uncertainty", type=_passes, nargs="?", const=50, default=default_passes, metavar="N",
                        help=f"test-time noise passes for uncertainty ellipsoids: 0 = off, or 2 to {MAX_PASSES} "
                             f"(N defaults to 50; {default_text})")
    parser.add_argument("--shift-mm", type=number(float, 0, 50), default=5.0,
                        help="locnet: uniform shift of the finest crops, 0 to 50 mm")
    parser.add_argument("--level", type=number(float, 0, 0.999, low_open=True), default=0.9,
                        help="confidence level of the ellipsoids, above 0 and below 1")
    parser.add_argument("--flag-mm", type=number(float, 0, 1000, low_open=True), default=5.0,
                        help="flag landmarks whose ellipsoid's longest semi-axis exceeds this (mm)")
    parser.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=0, help="seed of the noise passes")


def _uncertainty_options(args, model=None):
    from .detect import UncertaintyOptions, uncertainty_passes

    if not 0 < args.level < 1:
        raise ValueError(f"--level {args.level}: expected a probability between 0 and 1")
    passes = args.uncertainty if model is None else uncertainty_passes(model, args.uncertainty)
    return UncertaintyOptions(passes, args.shift_mm, args.level, args.flag_mm, args.seed)


def _add_common(parser, progress=True):
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    if progress:
        parser.add_argument("--progress", choices=("bar", "json", "none"), default="bar",
                            help="progress bar for people, or JSON lines for the Slicer GUI")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="landmark-detection", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND",
                                     help="what to do (each command has its own --help)")

    # Options left out are absent from the namespace (SUPPRESS): a new run takes TrainOptions' defaults (shown
    # in the help; Testing/test_train.py checks they agree), --resume the checkpoint's.
    p = commands.add_parser("train", help="train a model on a dataset folder or manifest",
                            argument_default=argparse.SUPPRESS)
    p.set_defaults(handler=cmd_train)
    p.add_argument("--dataset", help="folder of NAME.nii.gz + NAME.mrk.json pairs, or a manifest CSV "
                                     "(required, except with --resume)")
    p.add_argument("--output", required=True, help="folder for model.safetensors, checkpoint, logs")
    p.add_argument("--recipe", choices=tuple(RECIPES),
                   help="start from a recipe's options (the ones that train the bundled models): it sets the "
                        "default of every option it names; options given on this command line win (default: none)")
    p.add_argument("--schema", help="built-in schema name or schema JSON file (default: the built-in schema whose "
                                    "landmarks the first case's file holds)")
    p.add_argument("--architecture", help="network architecture (models/): highres3dnet (the paper's) or locnet "
                                          "(multi-scale) (default: highres3dnet)")
    p.add_argument("--channels", type=_ints,
                   help="channels per stage (default: highres3dnet 16,32,64; locnet 16,16,12)")
    p.add_argument("--blocks-per-stage", type=int, help="highres3dnet residual blocks per stage (default: 3)")
    p.add_argument("--dropout", type=float, help="highres3dnet dropout, also MC-dropout uncertainty (default: 0.1)")
    p.add_argument("--scales-mm", type=_floats, help="locnet stage scales, coarse to fine (default: 4,2,1)")
    p.add_argument("--patch-sizes", type=_ints, help="locnet patch voxels per refining stage (default: 24,16)")
    p.add_argument("--train-patch-landmarks", type=int,
                   help="locnet: train the patch stages on this many random landmarks per step, for large "
                        "schemas (0: all) (default: 0)")
    p.add_argument("--input-statistics", type=_on_off, metavar="on|off",
                   help="locnet: batch normalisation by the input's own statistics at inference too, as in "
                        "training; off: torch's running averages (default: on)")
    p.add_argument("--size", type=_triple(int), help="input grid voxels i,j,k (default: 224,224,101)")
    p.add_argument("--spacing", type=_triple(float), help="input grid spacing mm (default: 1,1,2.2)")
    p.add_argument("--epochs", type=int, help="epochs to train, at least 1; with --resume a larger value "
                                              "continues a finished run (default: 100)")
    p.add_argument("--batch-size", type=int, help="(default: 1)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default: 1e-3)")
    p.add_argument("--schedule", choices=("plateau", "cosine"),
                   help="learning rate: halve when validation stalls, or cosine-anneal to lr/100 over --epochs "
                        "(default: plateau)")
    p.add_argument("--loss", choices=("mse", "mixed"), help="(default: mixed)")
    p.add_argument("--alpha", type=float, help="heatmap weight of the Mixed loss (default: 0.4)")
    p.add_argument("--sigma-mm", type=float, help="Gaussian heatmap target width (default: 3.0)")
    p.add_argument("--val-fraction", type=float, help="(default: 0.2)")
    p.add_argument("--test-fraction", type=float, help="(default: 0.0)")
    p.add_argument("--patience", type=int, help="early stopping: epochs without improvement (default: 20)")
    p.add_argument("--seed", type=int, help="(default: 0)")
    p.add_argument("--no-amp", dest="amp", action="store_false", default=argparse.SUPPRESS,
                   help="disable mixed precision on CUDA")
    p.add_argument("--workers", type=int, help="DataLoader worker processes (default: 0)")
    p.add_argument("--augment", help="augmentation policy set: 'default' or a policy JSON file (default: none)")
    p.add_argument("--synthesis", help="the generalising recipe: 'default' or a synthesis JSON file "
                                       "(synthetic appearance and anatomy in the first case's frame; "
                                       "the model aligns every scan to it) (default: none)")
    p.add_argument("--samples-per-epoch", type=int, help="with --synthesis: samples per epoch (default: 100)")
    p.add_argument("--val-samples", type=int, help="with --synthesis: fixed synthetic validation samples; 0: 8, "
                                                   "or 4 per validation case (default: 0)")
    p.add_argument("--ema-decay", type=float,
                   help="validate and save an exponential moving average of the weights, updated every step "
                        "with this decay, e.g. 0.995; 0: off (default: 0.0)")
    p.add_argument("--init-from", metavar="MODEL", help="fine-tune: start from this model's weights (same schema; "
                                                        "the model's architecture, network options, input grid and "
                                                        "reference frame are the run's defaults) (default: none)")
    p.add_argument("--resume", action="store_true", default=False,
                   help="continue the run in --output after its last epoch, with the options stored in its "
                        "checkpoint (options given again must match, except --epochs, --patience, --workers, "
                        "--no-amp, --device, --progress)")
    _add_common(p)

    p = commands.add_parser("detect", help="detect landmarks in a volume or a folder of volumes")
    p.set_defaults(handler=cmd_detect)
    p.add_argument("--model", help="model .safetensors file (default: the bundled model of --schema)")
    p.add_argument("--schema", default=None,
                   help=f"without --model: the schema whose bundled model detects ({', '.join(BUNDLED_MODELS)}; "
                        f"default: {next(iter(BUNDLED_MODELS))}); with --model: the schema the model must detect")
    p.add_argument("--input", required=True, help="volume file, DICOM folder, folder of volumes or BIDS dataset")
    p.add_argument("--output", required=True, help="folder for NAME.mrk.json and NAME.csv")
    p.add_argument("--bids", action="store_true", help="write a BIDS-derivatives layout: "
                                                       "sub-X/[ses-Y/]anat/<input name>_landmarks.mrk.json, ...")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    _add_uncertainty(p, default_passes=None)
    _add_common(p)

    p = commands.add_parser("calibrate", help="fit the uncertainty recalibration factor on validation data")
    p.set_defaults(handler=cmd_calibrate)
    p.add_argument("--model", required=True, help="model .safetensors file to calibrate (only read)")
    p.add_argument("--dataset", required=True, help="validation cases (folder or manifest) the model did not train on")
    p.add_argument("--output", required=True, help="the calibrated model file to write (never the input model)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--input-statistics", type=_on_off, metavar="on|off",
                   help="locnet: switch batch normalisation at inference to the input's own statistics (on) or "
                        "running averages (off) before calibrating, e.g. for a model trained before the option "
                        "existed (default: as the model is)")
    _add_uncertainty(p, default_passes=50)
    _add_common(p)

    p = commands.add_parser("evaluate", help="compare predictions with the truth")
    p.set_defaults(handler=cmd_evaluate)
    p.add_argument("--predictions", required=True, help="folder of predicted landmark files")
    p.add_argument("--truth", required=True, help="folder of truth landmark files, or a dataset manifest CSV")
    p.add_argument("--output", required=True, help="CSV report file")
    p.add_argument("--schema", default=None, help="schema (default: from --model, else the built-in schema whose "
                                                  "landmarks the first truth file holds)")
    p.add_argument("--model", default=None, help="take the schema from this model")
    p.add_argument("--plot", default=None, help="uncertainty vs error PNG (when predictions have .uncertainty.json)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")

    p = commands.add_parser("schema", help="list, show or validate landmark schemas")
    p.set_defaults(handler=cmd_schema)
    p.add_argument("action", choices=("list", "show", "validate"),
                   help="list the built-in schemas, show one's landmarks and guidelines, or validate a schema file")
    p.add_argument("name", nargs="?", default="brain-88", help="schema name or JSON file")

    p = commands.add_parser("augment", help="write augmented copies of a dataset, or a preview figure")
    p.set_defaults(handler=cmd_augment)
    p.add_argument("--input", required=True, help="dataset folder or manifest CSV (only read)")
    p.add_argument("--output", help="folder for the augmented copies and manifest.csv")
    p.add_argument("--copies", type=number(int, 1, 1000), default=5, help="augmented copies per case, 1 to 1000")
    p.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=0, help="seed of the augmentation draws")
    p.add_argument("--policies", default="default", help="policy set: 'default' or a JSON file like "
                                                          "Resources/Augmentation/default.json")
    p.add_argument("--schema", default=None, help="schema name or JSON file (default: the built-in schema whose "
                                                  "landmarks the first case's file holds)")
    p.add_argument("--preview", help="instead of copies, draw each policy's effect on the first case to this PNG")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    _add_common(p)

    p = commands.add_parser("demo", help="the main job: detect the landmarks of an unseen scan of the sample brain")
    p.set_defaults(handler=cmd_demo)
    p.add_argument("--schema", choices=SAMPLE_SCHEMAS, default="afids-32",
                   help="afids-32 (the human AFIDs consensus is the truth) or brain-88 (the project's reference "
                        "annotation is the truth), each with its bundled model (default: afids-32)")
    p.add_argument("--output", default="demo-output", help="folder for the scan, landmarks and summary")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier demo in --output")
    p.add_argument("--model", default=None, help="model file (default: the bundled model of --schema)")
    p.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=2026,
                   help="seed of the test scan's head position and artefacts")
    p.add_argument("--train-model", metavar="WORK", help="instead, train the bundled model from scratch in WORK")
    p.add_argument("--recipe", default="afids-32", choices=tuple(RECIPES),
                   help="with --train-model: afids-32 or brain-88 (the generalising recipe on each schema) or "
                        "afids-32-poses (the earlier one) (default: afids-32)")
    p.add_argument("--epochs", type=number(int, 1, 10000), default=None,
                   help="with --train-model (default: the recipe's)")
    p.add_argument("--workers", type=number(int, 0, 64), default=None,
                   help="with --train-model: DataLoader workers (default: the recipe's)")
    p.add_argument("--resume", action="store_true", help="with --train-model: continue an interrupted training")
    _add_common(p)

    p = commands.add_parser("gradcam", help="3D Grad-CAM volumes per landmark, focus metrics, model comparison")
    p.set_defaults(handler=cmd_gradcam)
    p.add_argument("--model", help="model file")
    p.add_argument("--compare", nargs=2, metavar=("MODEL_A", "MODEL_B"), help="compare two models' focus")
    p.add_argument("--input", required=True, help="one volume")
    p.add_argument("--output", required=True, help="folder for the CAM volumes and focus CSV")
    p.add_argument("--landmarks", default="all", help="comma-separated names, a sub-anatomy name, or 'all'")
    p.add_argument("--layer", default=None, help="layer to explain (default: the architecture's, in its finest "
                                                 "stage; a name that is not a layer lists the layers)")
    p.add_argument("--target", choices=("argmax", "coordinate"), default="argmax",
                   help="what the gradient explains: the heatmap's peak or the predicted coordinate")
    p.add_argument("--format", choices=("nii.gz", "nrrd"), default="nii.gz", help="file format of the CAM volumes")
    p.add_argument("--single-file", action="store_true", help="one multi-component volume instead of one per landmark")
    p.add_argument("--normalize", action="store_true", help="scale each CAM to a maximum of 1")
    p.add_argument("--radius-mm", type=number(float, 0, 200, low_open=True), default=10.0,
                   help="radius of the focus metric (mm)")
    p.add_argument("--chunk", type=number(int, 1, 128), default=4, help="landmarks per backward pass, 1 to 128")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    _add_common(p)

    p = commands.add_parser("info", help="describe a model file (read without torch)")
    p.set_defaults(handler=cmd_info)
    p.add_argument("model", help="model .safetensors file")
    p.add_argument("--json", action="store_true", help="print the whole metadata as one JSON object instead")

    add_planes_command(commands)
    _add_qa_figure_options(add_qa_command(commands))
    add_dataset_command(commands)
    add_agreement_command(commands)
    _accept_progress(commands)
    return parser


def _accept_progress(subparsers) -> None:
    """The Slicer modules' BackendJob ends every command line with ``--progress json``: every command (and
    sub-command) that does not define --progress itself accepts it here; such a command is short and has no
    steps to report."""
    for parser in subparsers.choices.values():
        nested = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
        for action in nested:
            _accept_progress(action)
        if not nested and "--progress" not in parser._option_string_actions:
            parser.add_argument("--progress", choices=("bar", "json", "none"), default="bar",
                                help="accepted from the Slicer GUI, which adds --progress json to every command; "
                                     "this command has no steps to report")


def main(argv=None) -> int:
    from .fileio import remove_if_empty

    args = build_parser().parse_args(argv)
    output = getattr(args, "output", None)
    new_output = output is not None and not Path(output).exists()
    code = 1
    try:
        code = args.handler(args) or 0
    except LandmarkError as error:
        print(f"error: {error}", file=sys.stderr)
        code = 2
    except ValueError as error:  # bad option values (e.g. an unavailable --device)
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        code = 130
    finally:
        if code and new_output:  # a failed run leaves no empty output folder behind
            remove_if_empty(output)
    return code


def cmd_train(args) -> int:
    from .train import TrainOptions, train_command

    path = train_command({k: v for k, v in vars(args).items() if k in TrainOptions.__dataclass_fields__})
    print(f"best model: {path}")
    return 0


def cmd_detect(args) -> int:
    from .data import input_volumes, write_bids_description
    from .detect import calibration_mismatch, detect_many, detection_summary
    from .fileio import check_writable_dir
    from .modelfile import load_model
    from .runtime import Progress, pick_device

    device = pick_device(args.device)
    model_path = args.model or bundled_model_path(args.schema)
    model = load_model(model_path, device)
    if args.schema and args.schema != model.schema.name:
        raise LandmarkError(model_path, f"detects schema '{model.schema.name}', not --schema {args.schema}")
    volumes = input_volumes(args.input, args.bids, warn=lambda text: print(f"warning: {text}", file=sys.stderr))
    output = check_writable_dir(args.output)
    options = _uncertainty_options(args, model)
    if (mismatch := calibration_mismatch(model, options)) is not None:
        print(f"warning: {model_path}: {mismatch}", file=sys.stderr)
    if args.bids:
        write_bids_description(output)
    progress = Progress(args.progress)
    progress.start("detect", len(volumes))
    failures = 0
    results = detect_many(model, volumes, output, device, options, args.overwrite)
    for step, (volume, detection, error) in enumerate(results, start=1):
        if error is not None:  # one bad volume of a folder does not stop the others
            failures += 1
            print(f"error: {error}", file=sys.stderr)
        elif detection.out_of_distribution:  # never a silent answer
            print(f"warning: {volume}: {detection_summary(model, detection, options)}", file=sys.stderr)
        else:
            progress.message(f"{volume.name}: {detection_summary(model, detection, options)}")
        progress.update(step)
    progress.close()
    if failures and len(volumes) > 1:
        print(f"error: {args.input}: {failures} of {len(volumes)} volume(s) failed", file=sys.stderr)
    return 2 if failures else 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate, format_table, write_evaluation_csv
    from .fileio import check_outputs
    from .evaluate import truth_files
    from .modelfile import load_model
    from .schema import load_schema, schema_of_labels

    if args.model:
        schema = load_model(args.model).schema
        if args.schema:
            load_model(args.model).check_schema(load_schema(args.schema), args.schema)
    elif args.schema:
        schema = load_schema(args.schema)
    else:
        schema = schema_of_labels(truth_files(args.truth)[0])
    evaluation = evaluate(args.predictions, args.truth, schema)
    check_outputs([args.output, *([args.plot] if args.plot else [])], evaluation.files, args.overwrite)
    write_evaluation_csv(evaluation, args.output)
    print(format_table(evaluation))
    print(f"report: {args.output}")
    if evaluation.calibration:
        c = evaluation.calibration
        print(f"uncertainty: {c['coverage'] * 100:.1f}% of truths inside the {c['level'] * 100:.0f}% ellipsoids "
              f"(n={c['n']}); error vs uncertainty Spearman {c['spearman']:.3f}, Pearson {c['pearson']:.3f}")
        if args.plot:
            from .evaluate import plot_uncertainty

            plot_uncertainty(evaluation, args.plot)
            print(f"plot: {args.plot}")
    return 0


def cmd_calibrate(args) -> int:
    from .calibrate import calibrate
    from .data import discover_cases
    from .fileio import check_outputs
    from .modelfile import check_config, load_model, set_input_statistics
    from .runtime import Progress, pick_device

    cases = discover_cases(args.dataset)
    inputs = [args.model, args.dataset, *(c.image for c in cases), *(c.landmarks for c in cases)]
    check_outputs([args.output], inputs, args.overwrite)
    device = pick_device(args.device)
    model = load_model(args.model, device)
    if args.input_statistics is not None:
        set_input_statistics(model, args.input_statistics, args.model)
    result = calibrate(model, cases, device, _uncertainty_options(args), Progress(args.progress))
    try:  # the bounds load_model holds a file to: never write a model that cannot be read back
        check_config(model.config)
    except ValueError as error:
        raise LandmarkError(args.model, f"cannot be calibrated on {args.dataset}: the fitted {error} is out of "
                                        "bounds (the passes barely spread, or the network's spread is far smaller "
                                        "than its errors there); nothing written") from None
    model.save(args.output)
    print("\n".join(result.report()))
    print(f"calibrated model: {args.output}")
    return 0


def cmd_schema(args) -> int:
    from .schema import builtin_schemas, load_schema

    if args.action == "list":
        for name in builtin_schemas():
            schema = load_schema(name)
            print(f"{name}: {len(schema)} landmarks in {len(schema.sub_anatomies)} sub-anatomies")
        return 0
    schema = load_schema(args.name)
    if args.action == "validate":
        print(f"{args.name}: valid, {len(schema)} landmarks in {len(schema.sub_anatomies)} sub-anatomies")
        return 0
    for sub in schema.sub_anatomies:
        print(f"{sub.name} ({sub.plane} plane): {sub.guideline}")
        for i in schema.indices_of(sub.name):
            lm = schema.landmarks[i]
            extra = f" [secondary between {lm.between[0]} and {lm.between[1]}]" if lm.between else ""
            print(f"  {lm.number:>3} {lm.name}{extra}: {lm.definition}")
    return 0


def cmd_augment(args) -> int:
    from .augment import augment_dataset, preview
    from .data import discover_cases, read_case
    from .fileio import check_outputs
    from .runtime import Progress
    from .schema import load_schema, schema_of_labels

    schema = load_schema(args.schema) if args.schema else schema_of_labels(discover_cases(args.input)[0].landmarks)
    if args.preview:
        case = discover_cases(args.input)[0]
        check_outputs([args.preview], [args.input, case.image, case.landmarks], args.overwrite)
        preview(*read_case(case, schema), args.preview, args.seed,
                args.policies)
        print(f"preview: {args.preview}")
        return 0
    if not args.output:
        raise LandmarkError(None, "augment needs --output (or --preview PNG)")
    manifest = augment_dataset(args.input, args.output, args.copies, args.seed, schema, args.policies,
                               Progress(args.progress), args.overwrite)
    print(f"manifest: {manifest}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    if args.train_model:
        from .recipes import train_bundled_model

        path = train_bundled_model(args.train_model, args.recipe, args.epochs, args.workers, args.device,
                                   args.progress, args.resume)
        schema = RECIPES[args.recipe]["schema"]
        bundled = f" (the bundled one is {bundled_model_path(schema)})" if schema in BUNDLED_MODELS else ""
        print(f"model: {path}{bundled}")
        return 0
    summary = run_demo(args.output, args.model, args.device, args.seed, overwrite=args.overwrite,
                       schema_name=args.schema)
    print(f"Detected {summary['n']} landmarks ({summary['schema']}) on an unseen scan of the sample brain in {summary['detect_seconds']} s "
          f"(with {summary['passes']} uncertainty passes; {summary['seconds']} s for the whole demo "
          f"with Grad-CAM and the report, {summary['device']}).")
    print(f"Mean radial error {summary['mre_mm']:.2f} +- {summary['sd_mm']:.2f} mm; within 2 mm: "
          f"{summary['sdr_2mm']:.0f}%, within 4 mm: {summary['sdr_4mm']:.0f}%.")
    print(f"{summary['flagged']} landmark(s) flagged as uncertain; {summary['coverage'] * 100:.0f}% of truths inside "
          f"their 90% ellipsoids.")
    print(summary["note"])
    print(f"Landmarks: {summary['landmarks']} (open in 3D Slicer with {Path(args.output) / 'test_scan.nii.gz'})")
    print(f"Report: {summary['report']}")
    return 0


def cmd_gradcam(args) -> int:
    from .fileio import check_writable_dir, read_volume, stem
    from .gradcam import cam_prefix, compute_gradcam, focus_metrics, format_focus_table, write_cams, write_focus_table
    from .modelfile import load_model
    from .runtime import pick_device

    device = pick_device(args.device)
    models = args.compare or ([args.model] if args.model else [])
    if not models:
        raise LandmarkError(None, "gradcam needs --model or --compare MODEL_A MODEL_B")
    image = read_volume(args.input)
    output = check_writable_dir(args.output)
    name = stem(args.input)
    tables, schema, predicted = [], None, None
    for index, path in enumerate(models):
        model = load_model(path, device)
        if schema is not None:
            model.check_schema(schema, path)
        landmarks = model.schema.select(args.landmarks)
        result = compute_gradcam(model, image, landmarks, args.layer, args.target, device, args.chunk)
        paths = write_cams(result, model, image, output, cam_prefix(name, index, len(models)), args.format,
                           args.single_file, args.normalize, overwrite=args.overwrite, inputs=[args.input, *models])
        tables.append(focus_metrics(result, args.radius_mm))
        if schema is None:
            schema, predicted = model.schema, result.predicted_ras
        print(f"{path}: {len(landmarks)} Grad-CAM volume(s) at layer {result.layer} -> {paths[0].parent}")
    csv_path = write_focus_table(output, name, schema, predicted, tables, args.radius_mm, args.overwrite)
    print(format_focus_table(schema, tables))
    print(f"focus table: {csv_path}")
    return 0


def cmd_info(args) -> int:
    from .modelheader import read_header

    header = read_header(args.model)
    if args.json:
        print(json.dumps({k: v if k == "format" or k == "format_version" else json.loads(v)
                          for k, v in header.metadata.items()}))
        return 0
    config, training, metrics, schema = header.config, header.training, header.metrics, header.schema
    geometry = config.get("geometry", {})
    lines = [f"model:        {args.model}",
             f"schema:       {schema.get('name')} ({len(schema.get('landmarks', []))} landmarks)",
             f"architecture: {config.get('architecture')} {json.dumps(config.get('network', {}))}",
             f"input grid:   {geometry.get('size')} voxels at {geometry.get('spacing')} mm"
             + (", in the reference frame (scans are aligned first)" if "reference" in header.metadata else "")]
    if training:
        lines.append(f"trained on:   {training.get('training_data') or training.get('dataset')} "
                     f"({training.get('epochs_trained')} epochs, recipe {training.get('recipe', '-')})")
    validation = metrics.get("validation", {})
    if validation:
        lines.append(f"validation:   MRE {validation.get('mre_mm', float('nan')):.2f} mm (n={validation.get('n')})")
    if "calibration" in metrics:
        lines.append(f"uncertainty:  covariance scale {metrics['calibration']['scale']:.3f} "
                     f"({metrics['calibration'].get('passes')} passes)")
    for name, row in metrics.get("heldout", {}).get("templates", {}).items():
        lines.append(f"held-out:     {name}: MRE {row['model_mre_mm']:.2f} mm vs SimpleITK affine "
                     f"{row['sitk_affine_mre_mm']:.2f}, B-spline {row['sitk_bspline_mre_mm']:.2f} mm")
    if training.get("intended_use"):
        lines.append(f"intended use: {training['intended_use']}")
    print("\n".join(lines))
    return 0


def _add_qa_figure_options(p) -> None:
    """``qa`` (defined in annotation.py) plus its figures: --figures DIR and the optional --image."""
    p.add_argument("--figures", default=None, metavar="DIR",
                   help="also write figures into this folder: per sub-anatomy the image on the plane of its points "
                        "(points labelled and coloured by distance to the plane, boundary curves, the QA row in the "
                        "title), qa_NN_<sub-anatomy>.png, and the table of every check, qa_overview.png")
    p.add_argument("--image", default=None, help="with --figures: the scan the landmarks were placed on (without "
                                                 "it the figures show the points only)")
    p.set_defaults(handler=cmd_qa)


def cmd_qa(args) -> int:
    """``qa``: annotation.run_qa (table, CSV, fix), and with --figures the QA figures (figures.py), which
    land together with the CSV and fix or not at all."""
    from .annotation import annotation_qa, curves_for_qa, read_msp_normal, run_qa
    from .figures import qa_figure_paths, write_qa_figures
    from .fileio import check_outputs, read_landmarks, read_volume, remove_if_empty, written_together
    from .schema import load_schema, schema_of_labels

    if not args.figures:
        if args.image:
            raise LandmarkError(args.image, "--image is only used with --figures DIR")
        return run_qa(args)
    folder = Path(args.figures)
    if folder.exists() and not folder.is_dir():
        raise LandmarkError(folder, "--figures must be a folder (the PNGs are written into it), not a file")
    schema = load_schema(args.schema) if args.schema else schema_of_labels(args.landmarks)
    landmarks = read_landmarks(args.landmarks, schema)
    curves = curves_for_qa(args.landmarks, args.curves, schema)[0]
    msp = read_msp_normal(args.msp) if args.msp else None
    image = read_volume(args.image) if args.image else None
    check_outputs(qa_figure_paths(folder, schema).values(), [args.landmarks, args.image], args.overwrite)
    new_folder = not folder.exists()
    try:
        # run_qa's CSV and fix land at the end of its own block, the figures after them at the end of this one
        with written_together():
            paths = write_qa_figures(folder, image, schema, landmarks, annotation_qa(schema, landmarks, curves, msp),
                                     curves, msp, note=f"landmarks: {Path(args.landmarks).name}"
                                     + (f", image: {Path(args.image).name}" if args.image else ""),
                                     image_path=args.image)
            code = run_qa(args)
    except BaseException:
        if new_folder:  # a failed run leaves no empty figures folder behind
            remove_if_empty(folder)
        raise
    print(f"figures: {folder} ({len(paths)} PNG files)")
    return code
