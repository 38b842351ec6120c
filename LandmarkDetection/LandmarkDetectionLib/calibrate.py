"""Calibration of the uncertainty ellipsoids on validation cases the model did not train on: the
covariance factor that makes a ``level`` ellipsoid hold the truth a ``level`` fraction of the time."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data import Case, read_case
from .detect import UncertaintyOptions, detect_volume
from .modelfile import LandmarkModel
from .runtime import Progress
from .uncertainty import fit_scale


@dataclass
class Calibration:
    scale: float
    coverage_before: float  # fraction of truths inside the ellipsoids without recalibration
    coverage_after: float
    cases: int


def calibrate(model: LandmarkModel, cases: list[Case], device, options: UncertaintyOptions,
              progress: Progress | None = None) -> Calibration:
    """Fit ``model.config.uncertainty_scale`` on ``cases`` and record it in the model's metrics."""
    if options.passes < 2:
        raise ValueError("--uncertainty must be at least 2 passes to calibrate")
    model.config.uncertainty_scale = 1.0
    distances, inside = [], []
    progress = progress or Progress("none")
    progress.start("calibrate", len(cases))
    for step, case in enumerate(cases, start=1):
        image, truth = read_case(case, model.schema)
        detection = detect_volume(model, image, device, case.name, options, case.image)
        distances.append(detection.uncertainty.mahalanobis_squared(truth))
        inside.append(detection.uncertainty.covers(truth))
        progress.update(step)
    progress.close()
    distances = np.concatenate(distances)
    scale = fit_scale(distances, options.level)
    from scipy.stats import chi2

    result = Calibration(scale, float(np.concatenate(inside).mean()),
                         float((distances / scale <= chi2.ppf(options.level, 3)).mean()), len(cases))
    model.config.uncertainty_scale = scale
    model.metrics["calibration"] = {"scale": scale, "level": options.level, "cases": len(cases),
                                    "passes": options.passes, "shift_mm": options.shift_mm,
                                    "coverage_before": result.coverage_before, "coverage_after": result.coverage_after}
    return result
