"""Headless batch detection over a folder of volumes.

    Slicer --no-main-window --python-script LandmarkDetection/Scripts/batch_detect.py \\
        --input DIR --output DIR [--model M] [--uncertainty N]
    PythonSlicer LandmarkDetection/Scripts/batch_detect.py --input DIR --output DIR   (or any Python)

One line per volume, a summary, and exit code 0 only when every volume succeeded; a failing volume does
not stop the others. Detection is the backend's, exactly as the GUI's process runs it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# In a source checkout or a plain Python, make the backend importable from beside this script.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(argv=None) -> int:
    from LandmarkDetectionLib.data import input_volumes
    from LandmarkDetectionLib.detect import (UncertaintyOptions, calibration_mismatch, detect_many, detection_summary,
                                             uncertainty_passes)
    from LandmarkDetectionLib.errors import LandmarkError
    from LandmarkDetectionLib.fileio import check_writable_dir
    from LandmarkDetectionLib.modelfile import load_model
    from LandmarkDetectionLib.resources import bundled_model_path
    from LandmarkDetectionLib.runtime import pick_device

    parser = argparse.ArgumentParser(prog="batch_detect.py", description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="folder of volumes (or one volume)")
    parser.add_argument("--output", required=True, help="folder for NAME.mrk.json, NAME.csv and uncertainty files")
    parser.add_argument("--model", default=None, help="model file (default: the bundled model)")
    parser.add_argument("--uncertainty", type=int, default=None,
                        help="noise passes for uncertainty ellipsoids (0 = off; default: the model's calibrated "
                             "passes if it fuses with its registration prior, else 0)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        device = pick_device(args.device)
        model = load_model(args.model or bundled_model_path(), device)
        volumes = input_volumes(args.input, warn=lambda text: print(f"warning: {text}", flush=True))
        output = check_writable_dir(args.output)
    except (LandmarkError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    options = UncertaintyOptions(passes=uncertainty_passes(model, args.uncertainty))
    mismatch = calibration_mismatch(model, options)
    if mismatch is not None:
        print(f"warning: {mismatch}", flush=True)
    failed = 0
    started = time.monotonic()
    t0 = time.monotonic()
    for volume, detection, error in detect_many(model, volumes, output, device, options, args.overwrite):
        if error is not None:
            failed += 1
            print(f"FAILED {volume.name}: {error}", flush=True)
        else:
            print(f"ok     {volume.name}: {detection_summary(model, detection, options)} "
                  f"({time.monotonic() - t0:.1f} s)", flush=True)
        t0 = time.monotonic()
    print(f"{len(volumes) - failed} of {len(volumes)} volume(s) succeeded in {time.monotonic() - started:.1f} s; "
          f"results in {output}")
    return 0 if failed == 0 else 1


def main() -> None:
    code = run(sys.argv[1:])
    try:  # inside Slicer, leave through the application so it exits with this code
        import slicer

        if hasattr(slicer, "app") and slicer.app is not None:
            slicer.util.exit(code)
            return
    except ImportError:
        pass
    sys.exit(code)


if __name__ == "__main__":
    main()
