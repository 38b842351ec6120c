"""Live annotation QA speed: annotation_qa on all 88 brain-88 landmarks (the Slicer module runs it on
every point edit, so it must stay well under 100 ms), without curves and with a drawn boundary curve per
sub-anatomy that has secondaries, and the one-click fix. Prints the median of many runs (ms); last
line: one JSON object.

    python benchmarks/annotation_qa.py [--repeats 200] [--curve-points 500]
"""

import argparse
import json
import time

import numpy as np

from _common import ROOT  # noqa: F401  (puts the backend on sys.path)
from LandmarkDetectionLib.annotation import Curve, annotation_qa, fix_annotation
from LandmarkDetectionLib.schema import load_schema


def median_ms(function, repeats: int) -> float:
    function()  # warm up (the schema layout is cached on first use)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200, help="timed runs per measurement")
    parser.add_argument("--curve-points", type=int, default=500, help="points per drawn boundary curve")
    args = parser.parse_args()

    schema = load_schema("brain-88")
    rng = np.random.default_rng(0)
    landmarks = rng.normal(0, 40, (len(schema), 3))  # annotation in progress: a few points still missing
    landmarks[[5, 40, 70]] = np.nan
    t = np.linspace(0, 2 * np.pi, args.curve_points, endpoint=False)
    curves = {}
    for sub in schema.sub_anatomies:  # one closed curve per sub-anatomy with secondary points (two lobes: two)
        if any(lm.role == "secondary" for lm in schema.landmarks if lm.sub_anatomy == sub.name):
            count = 2 if sub.name == "Temporal Lobe" else 1
            curves[sub.name] = [Curve(np.stack([50 * np.cos(t) + 40 * k, 60 * np.sin(t), 5 * np.sin(3 * t)], 1), True)
                                for k in range(count)]

    result = {"landmarks": len(schema), "repeats": args.repeats, "curve_points": args.curve_points,
              "qa_ms": median_ms(lambda: annotation_qa(schema, landmarks), args.repeats),
              "qa_with_curves_ms": median_ms(lambda: annotation_qa(schema, landmarks, curves), args.repeats),
              # the curves rebuilt on every call (a GUI that does not keep its Curve objects between edits)
              "qa_with_new_curves_ms": median_ms(lambda: annotation_qa(schema, landmarks, {
                  k: [Curve(c.points, c.closed) for c in v] for k, v in curves.items()}), args.repeats),
              "fix_ms": median_ms(lambda: fix_annotation(schema, landmarks), args.repeats),
              "fix_with_curves_ms": median_ms(lambda: fix_annotation(schema, landmarks, curves), args.repeats)}
    print(f"annotation QA of {len(schema)} landmarks: median {result['qa_ms']:.2f} ms, with "
          f"{sum(map(len, curves.values()))} drawn curves of {args.curve_points} points "
          f"{result['qa_with_curves_ms']:.2f} ms ({result['qa_with_new_curves_ms']:.2f} ms with the curves rebuilt each "
          f"time; budget 100 ms: {100 / result['qa_with_new_curves_ms']:.0f}x headroom); "
          f"one-click fix {result['fix_ms']:.2f} ms, with curves {result['fix_with_curves_ms']:.2f} ms")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
