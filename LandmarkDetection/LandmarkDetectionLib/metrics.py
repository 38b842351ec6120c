"""Accuracy measures of the source papers: radial error, MRE +- SD, per-sub-anatomy MAE and RMSE
(Patel et al., Table IV), and successful detection rates (SDR) at 1-5 mm."""

from __future__ import annotations

import numpy as np

SDR_THRESHOLDS_MM = (1.0, 2.0, 3.0, 4.0, 5.0)


def radial_errors(pred_ras: np.ndarray, true_ras: np.ndarray) -> np.ndarray:
    """Euclidean distance per landmark (..., K); NaN where the truth is missing."""
    return np.linalg.norm(np.asarray(pred_ras, float) - np.asarray(true_ras, float), axis=-1)


def summarize(errors: np.ndarray, thresholds=SDR_THRESHOLDS_MM) -> dict:
    """MRE, SD, median, RMSE, max and SDR (% within each threshold) over all finite errors."""
    values = np.asarray(errors, dtype=float).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"n": 0}
    out = {"n": int(values.size), "mre_mm": float(values.mean()), "sd_mm": float(values.std(ddof=1)) if values.size > 1 else 0.0,
           "median_mm": float(np.median(values)), "rmse_mm": float(np.sqrt((values ** 2).mean())),
           "max_mm": float(values.max())}
    for t in thresholds:
        out[f"sdr_{t:g}mm"] = float(100.0 * (values <= t).mean())
    return out
