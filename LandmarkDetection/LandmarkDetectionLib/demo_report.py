"""The demo's report: figures (matplotlib) and one self-contained report.html (figures embedded)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.stats import chi2

from . import figures
from .fileio import atomic_write_text
from .metrics import SDR_THRESHOLDS_MM


def _ellipse_outline(covariance, frame, center, level, n=64):
    """Outline of the ellipsoid's shadow on the picture plane: the marginal covariance in (u, v) with the
    same chi-square threshold as the 3D ellipsoid (an ellipsoid projects onto exactly that ellipse)."""
    c0, u, v, half = frame
    basis = np.stack([u, v])  # (2, 3)
    marginal = basis @ covariance @ basis.T
    values, vectors = np.linalg.eigh(marginal)
    t = np.linspace(0, 2 * np.pi, n)
    circle = np.stack([np.cos(t), np.sin(t)])
    points = vectors @ (np.sqrt(np.clip(values, 0, None) * chi2.ppf(level, 3))[:, None] * circle)
    offset = basis @ (np.asarray(center) - c0)
    return points[0] + offset[0] + half, points[1] + offset[1] + half


def landmark_panels(image, schema, predicted, truth, uncertainty, path, zoom_mm=30.0, per_row=4):
    """Three orthogonal slices through each predicted landmark: prediction (red +), truth (green x),
    ellipsoid shadow (yellow)."""
    k = len(schema)
    rows = int(np.ceil(k / per_row))
    figure, axes = figures.plt.subplots(rows, 3 * per_row, figsize=(1.15 * 3 * per_row, 1.3 * rows))
    axes = np.atleast_2d(axes)
    for ax in axes.ravel():
        ax.axis("off")
    for i, landmark in enumerate(schema.landmarks):
        row, col = divmod(i, per_row)
        for v, view in enumerate(figures.VIEWS):
            ax = axes[row, 3 * col + v]
            picture, frame = figures.ras_slab(image, predicted[i], view, zoom_mm, pixel_mm=0.5)
            low, high = np.percentile(picture, (1, 99.5))
            extent = (0, 2 * zoom_mm, 2 * zoom_mm, 0)
            ax.imshow(picture, cmap="gray", vmin=low, vmax=high, extent=extent)
            if uncertainty is not None:
                x, y = _ellipse_outline(uncertainty.covariance[i], frame, uncertainty.mean[i], uncertainty.level)
                ax.plot(x, y, color="yellow", lw=0.8)
            tx, ty, td = figures.project(truth[i][None], frame)
            ax.scatter(tx, ty, marker="x", c="lime", s=18, linewidths=1.0)
            px, py, _ = figures.project(predicted[i][None], frame)
            ax.scatter(px, py, marker="+", c="red", s=26, linewidths=1.0)
            ax.set_xlim(0, 2 * zoom_mm)
            ax.set_ylim(2 * zoom_mm, 0)
            if v == 1:
                ax.set_title(landmark.name, fontsize=7)
    figure.suptitle("Each landmark in axial, coronal and sagittal slices (60 mm wide): red + prediction, "
                    "green x truth, yellow 90% ellipsoid", fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 0.98))
    figures.save(figure, path)


def error_figure(schema, errors, path):
    figure, (left, right) = figures.plt.subplots(1, 2, figsize=(12, 3.6), gridspec_kw={"width_ratios": [3, 1]})
    colors = [schema.sub_anatomy(lm.sub_anatomy).color for lm in schema.landmarks]
    left.bar(range(len(errors)), errors, color=colors)
    left.set_xticks(range(len(errors)), schema.names, rotation=90, fontsize=7)
    left.set_ylabel("radial error (mm)")
    left.set_title("Error per landmark (colour: sub-anatomy)", fontsize=9)
    sdr = [100 * np.mean(errors <= t) for t in SDR_THRESHOLDS_MM]
    right.bar([f"{t:g}" for t in SDR_THRESHOLDS_MM], sdr, color="#4363d8")
    right.set_xlabel("threshold (mm)")
    right.set_ylabel("landmarks within (%)")
    right.set_ylim(0, 112)
    right.set_title("Successful detection rate", fontsize=9)
    for x, value in enumerate(sdr):
        right.text(x, value + 2, f"{value:.0f}", ha="center", fontsize=8)
    figure.tight_layout()
    figures.save(figure, path)


def gradcam_figure(image, schema, cams: dict, predicted, path, layer: str, zoom_mm=80.0):
    """For a few landmarks: Grad-CAM (hot colours, over 20% of its maximum) over three slices."""
    figure, axes = figures.plt.subplots(len(cams), 3, figsize=(8, 2.8 * len(cams)))
    axes = np.atleast_2d(axes)
    for row, (index, cam) in enumerate(cams.items()):
        top = float(sitk.GetArrayViewFromImage(cam).max()) or 1.0
        for ax, view in zip(axes[row], figures.VIEWS):
            picture, frame = figures.ras_slab(image, predicted[index], view, zoom_mm)
            heat, _ = figures.ras_slab(cam, predicted[index], view, zoom_mm)
            extent = (0, 2 * zoom_mm, 2 * zoom_mm, 0)
            low, high = np.percentile(picture, (1, 99.5))
            ax.imshow(picture, cmap="gray", vmin=low, vmax=high, extent=extent)
            ax.imshow(np.ma.masked_less(heat / top, 0.2), cmap="hot", vmin=0, vmax=1, alpha=0.55, extent=extent)
            x, y, _ = figures.project(predicted[index][None], frame)
            ax.scatter(x, y, marker="+", c="cyan", s=40)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{schema.landmarks[index].name}: {view}", fontsize=8)
    figure.suptitle(f"Grad-CAM at layer {layer}: where the network looked (cyan + the prediction)", fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 0.97))
    figures.save(figure, path)


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}" style="max-width:100%">'


def write_html(path, summary: dict, model, schema, errors, semi_axes, flag_mm, figure_paths: dict, attribution: str):
    e = html.escape
    rows = "".join(
        f"<tr{' class=flag' if s > flag_mm else ''}><td>{lm.number}</td><td>{e(lm.name)}</td><td>{e(lm.sub_anatomy)}"
        f"</td><td>{err:.2f}</td><td>{s:.2f}</td><td>{'yes' if s > flag_mm else ''}</td></tr>"
        for lm, err, s in sorted(zip(schema.landmarks, errors, semi_axes), key=lambda r: -r[2]))
    training = model.training
    validation = model.metrics.get("validation", {})
    sdr = " &middot; ".join(f"{t:g} mm: {summary[f'sdr_{t:g}mm']:.0f}%" for t in SDR_THRESHOLDS_MM)
    text = f"""<!doctype html><html><head><meta charset="utf-8"><title>Landmark detection demo</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}} table{{border-collapse:collapse;font-size:90%}}
td,th{{border:1px solid #ccc;padding:2px 6px}} tr.flag{{background:#fdd}} .note{{background:#ffd;padding:.6em;border:1px solid #cc9}}</style>
</head><body><h1>Landmark detection on an unseen scan of the sample brain</h1>
<p><b>{summary['n']} AFIDs</b> detected in {summary['seconds']:.1f} s ({e(summary['device'])}), with {summary['passes']} noise passes for
uncertainty. Mean radial error <b>{summary['mre_mm']:.2f} &plusmn; {summary['sd_mm']:.2f} mm</b> (median {summary['median_mm']:.2f} mm,
max {summary['max_mm']:.2f} mm). Successful detection rate: {sdr}. {summary['flagged']} landmark(s) flagged as uncertain
(longest 90% ellipsoid semi-axis over {flag_mm:g} mm); 90% ellipsoids holding the truth: {summary['coverage'] * 100:.0f}%.</p>
<p class="note"><b>Read this first.</b> The test scan was made from the same template the bundled model was trained on: a new
random oblique head position, re-acquired with 2.2 mm axial slices, with bias field, ghosting and noise. It shows the tool
working end to end; it does not measure accuracy on anatomy the model never saw (benchmarks/heldout.py does, on two other
brain templates).</p>
<h2>Landmarks</h2>{_img(figure_paths['landmarks'], 'landmark slices')}
<h2>Error and detection rate</h2>{_img(figure_paths['errors'], 'errors')}
<h2>Uncertainty</h2>{_img(figure_paths['uncertainty'], 'uncertainty vs error')}
<h2>Grad-CAM</h2><p>Grad-CAM of the layer named in the figure (for locnet, the coarse stage that finds each landmark's
region before the finer stages refine it). Warm colours mark what raised the landmark's heatmap peak; a model trained on
one template may rely on broad context such as the head outline and skull base rather than the structure itself, and this
is what the figure is for.</p>{_img(figure_paths['gradcam'], 'Grad-CAM')}
<h2>Per landmark (most uncertain first)</h2><table><tr><th>#</th><th>landmark</th><th>sub-anatomy</th><th>error (mm)</th>
<th>longest semi-axis (mm)</th><th>flagged</th></tr>{rows}</table>
<h2>Model</h2><p>{e(model.config.architecture)}, input grid {model.config.geometry.size} at {model.config.geometry.spacing} mm.
Training data: {e(str(training.get('training_data', training.get('dataset', 'unknown'))))}. Intended use:
{e(str(training.get('intended_use', 'research')))}. Validation mean radial error {validation.get('mre_mm', float('nan')):.2f} mm
(epoch {model.metrics.get('best_epoch', '?')}).</p>
<h2>Files</h2><p>{e(', '.join(summary['files']))}</p>
<h2>Data and licences</h2><p>{e(attribution)}</p></body></html>"""
    atomic_write_text(path, text)
