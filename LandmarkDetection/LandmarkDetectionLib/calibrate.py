"""Calibration on validation cases the model did not train on: the covariance factor that makes a
``level`` ellipsoid hold the truth a ``level`` fraction of the time, and, for models that align scans to
their reference, the spread of the registration prior that detection fuses with the network."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import chi2

from .data import Case, read_case
from .detect import UncertaintyOptions, detect_volume, registration_prior, reported_uncertainty
from .modelfile import LandmarkModel
from .runtime import Progress
from .uncertainty import Uncertainty, fit_scale, innovation


@dataclass
class Calibration:
    scale: float
    coverage_before: float  # fraction of truths inside the ellipsoids without recalibration
    coverage_after: float
    cases: int
    prior_sd_mm: float | None = None  # models with a registration prior: its measured spread (RMS per axis)
    network_mre_mm: float | None = None  # the network alone and fused with the prior, on these cases
    fused_mre_mm: float | None = None
    fused_coverage: float | None = None
    mirror: dict | None = None  # models with test_time_mirror: the network's MRE with and without, and the choice
    level: float = 0.9
    rater_coverage: float | None = None  # exact truths: coverage once the schema's rater spread is added

    def report(self) -> list[str]:
        """What the calibration found, in lines for people."""
        lines = [f"covariance scale {self.scale:.3f} fitted on {self.cases} case(s): {self.coverage_before * 100:.0f}% "
                 f"of truths inside the {self.level * 100:.0f}% ellipsoids before, {self.coverage_after * 100:.0f}% after"]
        if self.mirror is not None:
            lines.append(f"test-time mirror image: network MRE {self.mirror['network_mre_mm']:.2f} mm with it, "
                         f"{self.mirror['without_mre_mm']:.2f} mm without; {'used' if self.mirror['used'] else 'not used'}")
        if self.prior_sd_mm is not None:
            lines.append(f"registration prior: {self.prior_sd_mm:.2f} mm SD per axis; MRE on these cases "
                         f"{self.network_mre_mm:.2f} mm (network) -> {self.fused_mre_mm:.2f} mm (fused), coverage "
                         f"{self.fused_coverage * 100:.0f}%")
        if self.rater_coverage is not None:
            lines.append(f"these truths are exact, so detection adds the schema's rater spread to the ellipsoids: "
                         f"{self.rater_coverage * 100:.0f}% of these truths inside then")
        return lines


def calibrate(model: LandmarkModel, cases: list[Case], device, options: UncertaintyOptions,
              progress: Progress | None = None, exact_truths: bool = False) -> Calibration:
    """Fit ``model.config.uncertainty_scale`` on ``cases`` and record it in the model's metrics. For a
    model that carries its registration prior (the reference's landmarks), also measure how far the
    cases' landmarks lie from where the alignment alone puts them: ``model.prior_covariance``, which
    detection fuses with the network's estimate. Both describe the network and the prior separately, so
    each is fitted without the other. A model with ``test_time_mirror`` is run with and without the
    mirror image, and keeps it only if it makes the network more accurate on these cases (it did for the
    AFIDs model, 2.92 -> 2.61 mm, not for the weaker brain-88 network, 5.70 -> 5.78 mm).

    ``exact_truths``: the cases' landmarks are exact (synthetic scans of an annotated template), not a
    person's placements; the fitted ellipsoids then miss how far raters' placements stray, and detection
    adds the schema's ``rater_sd_mm`` (``model.config.rater_spread``)."""
    if options.passes < 2:
        raise ValueError("--uncertainty must be at least 2 passes to calibrate")
    model.config.uncertainty_scale = model.config.fused_scale = 1.0
    model.config.innovation_reference, model.config.rater_spread = None, False
    model.prior_covariance = None  # the network alone first
    progress = progress or Progress("none")
    mirror_choice = None
    if model.config.test_time_mirror:
        progress.start("calibrate (with and without the mirror image)", 2 * len(cases))
        mirrored, truths = _detect_cases(model, cases, device, options, progress)
        model.config.test_time_mirror = False
        plain, _ = _detect_cases(model, cases, device, options, progress, len(cases))
        mirror_choice = {"network_mre_mm": _network_mre(mirrored, truths), "without_mre_mm": _network_mre(plain, truths)}
        # the mirror image is read only where it makes the network more accurate on these cases
        model.config.test_time_mirror = mirror_choice["network_mre_mm"] < mirror_choice["without_mre_mm"]
        detections = mirrored if model.config.test_time_mirror else plain
    else:
        progress.start("calibrate", len(cases))
        detections, truths = _detect_cases(model, cases, device, options, progress)
    progress.close()
    distances = np.concatenate([d.uncertainty.mahalanobis_squared(t) for d, t in zip(detections, truths)])
    scale = fit_scale(distances, options.level)
    threshold = chi2.ppf(options.level, 3)
    with np.errstate(divide="ignore", invalid="ignore"):  # passes without spread: no scale (the caller refuses)
        after = float((distances / scale <= threshold).mean())
    result = Calibration(scale, float((distances <= threshold).mean()), after, len(cases), level=options.level)
    model.config.uncertainty_scale = scale
    model.metrics["calibration"] = {"scale": scale, "level": options.level, "cases": len(cases),
                                    "passes": options.passes, "shift_mm": options.shift_mm,
                                    "coverage_before": result.coverage_before, "coverage_after": result.coverage_after}
    if mirror_choice is not None:
        result.mirror = {**mirror_choice, "used": model.config.test_time_mirror}
        model.metrics["calibration"]["test_time_mirror"] = result.mirror
    if model.prior is not None and all(d.alignment is not None for d in detections):
        _fit_prior(model, detections, truths, result, options.level)
    if exact_truths:
        model.config.rater_spread = True
        result.rater_coverage = _rater_coverage(model, detections, truths, result, options.level)
        model.metrics["calibration"].update(exact_truths=True, rater_coverage=result.rater_coverage)
    return result


def _detect_cases(model: LandmarkModel, cases: list[Case], device, options: UncertaintyOptions, progress: Progress,
                  done: int = 0):
    detections, truths = [], []
    for step, case in enumerate(cases, start=done + 1):
        image, truth = read_case(case, model.schema)
        detections.append(detect_volume(model, image, device, case.name, options, case.image))
        truths.append(truth)
        progress.update(step)
    return detections, truths


def _network_mre(detections, truths) -> float:
    return float(np.nanmean(np.concatenate([np.linalg.norm(d.uncertainty.mean - t, axis=1)
                                            for d, t in zip(detections, truths)])))


def _fit_prior(model: LandmarkModel, detections, truths, result: Calibration, level: float) -> None:
    """The prior's covariance: the second moment of (truth - prior) in the reference frame, pooled over
    landmarks (a handful of cases cannot tell landmarks apart reliably). Then how much the network and the
    prior disagree on a typical case (``innovation_reference``, the median over cases), and the fused
    ellipsoids' own factor (``fused_scale``), fitted with each case's innovation_inflation applied: the
    network's spread weighs it against the prior, but need not describe the combination's error as well."""
    residuals = np.concatenate([d.alignment.to_reference(t) - model.prior for d, t in zip(detections, truths)])
    residuals = residuals[np.isfinite(residuals).all(1)]
    if len(residuals) < 3:
        return
    pooled = residuals.T @ residuals / len(residuals)
    model.prior_covariance = np.repeat(pooled[None], len(model.schema), axis=0)
    networks = [Uncertainty(d.uncertainty.mean, d.uncertainty.covariance * result.scale, level) for d in detections]
    disagreements = [innovation(n.mean, n.covariance, *registration_prior(model, d.alignment))
                     for n, d in zip(networks, detections)]
    model.config.innovation_reference = float(np.median(disagreements))
    network_errors, fused_errors, distances = [], [], []
    for network, detection, truth in zip(networks, detections, truths):
        fused = reported_uncertainty(model, network, detection.alignment)  # fused_scale still 1 here
        known = np.isfinite(truth).all(1)
        network_errors.append(np.linalg.norm(network.mean - truth, axis=1)[known])
        fused_errors.append(np.linalg.norm(fused.mean - truth, axis=1)[known])
        distances.append(fused.mahalanobis_squared(truth)[known])
    distances = np.concatenate(distances)
    model.config.fused_scale = fit_scale(distances, level)
    result.prior_sd_mm = float(np.sqrt(np.trace(pooled) / 3))
    result.network_mre_mm = float(np.concatenate(network_errors).mean())
    result.fused_mre_mm = float(np.concatenate(fused_errors).mean())
    result.fused_coverage = float((distances / model.config.fused_scale <= chi2.ppf(level, 3)).mean())
    model.metrics["calibration"].update(fused_scale=model.config.fused_scale, prior_sd_mm=result.prior_sd_mm,
                                        network_mre_mm=result.network_mre_mm, fused_mre_mm=result.fused_mre_mm,
                                        fused_coverage=result.fused_coverage,
                                        innovation_reference=model.config.innovation_reference)


def _rater_coverage(model: LandmarkModel, detections, truths, result: Calibration, level: float) -> float:
    """The fraction of the cases' truths inside the ellipsoids detection reports (rater spread added)."""
    inside = []
    for detection, truth in zip(detections, truths):
        network = Uncertainty(detection.uncertainty.mean, detection.uncertainty.covariance * result.scale, level)
        known = np.isfinite(truth).all(1)
        inside.append(reported_uncertainty(model, network, detection.alignment).covers(truth)[known])
    return float(np.concatenate(inside).mean())
