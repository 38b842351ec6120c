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


MARKERS = {  # the overlays of the slice figures, as drawn and as the legends name them
    "prediction": {"marker": "+", "c": "red", "s": 26, "linewidths": 1.0},
    "truth": {"marker": "x", "c": "lime", "s": 18, "linewidths": 1.0},
    "detected": {"marker": "+", "c": "cyan", "s": 40, "linewidths": 1.2},
}
ELLIPSE_COLOR = "yellow"
CAM_FLOOR = 0.2  # Grad-CAM below this fraction of its maximum is not drawn


def _marker_handle(key: str, label: str):
    style = MARKERS[key]
    return figures.plt.Line2D([], [], ls="none", marker=style["marker"], color=style["c"], markersize=7,
                              markeredgewidth=1.5, label=label)


def landmark_panels(image, schema, predicted, truth, uncertainty, path, zoom_mm=30.0, per_row=4):
    """Three orthogonal slices through each predicted landmark: prediction (red +), truth (green x),
    ellipsoid shadow (yellow); one intensity window for the whole scan, with its colour bar."""
    k = len(schema)
    rows = int(np.ceil(k / per_row))
    figure, axes = figures.plt.subplots(rows, 3 * per_row, figsize=(1.3 * 3 * per_row, 1.5 * rows + 0.6),
                                        layout="constrained")
    axes = np.atleast_2d(axes)
    for ax in axes.ravel():
        ax.axis("off")
    low, high = figures.intensity_window(image)
    width = 2 * zoom_mm
    for i, landmark in enumerate(schema.landmarks):
        row, col = divmod(i, per_row)
        for v, view in enumerate(figures.VIEWS):
            ax = axes[row, 3 * col + v]
            picture, frame = figures.ras_slab(image, predicted[i], view, zoom_mm, pixel_mm=0.5)
            shown = ax.imshow(picture, cmap="gray", vmin=low, vmax=high, extent=(0, width, width, 0))
            if uncertainty is not None:
                x, y = _ellipse_outline(uncertainty.covariance[i], frame, uncertainty.mean[i], uncertainty.level)
                ax.plot(x, y, color=ELLIPSE_COLOR, lw=0.8)
            tx, ty, _ = figures.project(truth[i][None], frame)
            ax.scatter(tx, ty, **MARKERS["truth"])
            px, py, _ = figures.project(predicted[i][None], frame)
            ax.scatter(px, py, **MARKERS["prediction"])
            ax.set_xlim(0, width)
            ax.set_ylim(width, 0)
            figures.orientation_labels(ax, view, width, fontsize=6)
            if v == 1:
                ax.set_title(figures.full_name(landmark), fontsize=6.5)
    level = f"{uncertainty.level * 100:.0f}% " if uncertainty is not None else ""
    handles = [_marker_handle("prediction", "prediction"), _marker_handle("truth", "truth"),
               figures.plt.Line2D([], [], color=ELLIPSE_COLOR, lw=1.5,
                                  label=f"{level}confidence ellipsoid (its shadow)")]
    figure.suptitle(f"Each landmark in axial, coronal and sagittal slices ({width:g} mm wide); {figures.CONVENTION}",
                    fontsize=9)
    figure.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    colorbar = figure.colorbar(shown, ax=axes, fraction=0.012, pad=0.01)
    colorbar.set_label("MR intensity (scan window: 1st-99.5th percentile)", fontsize=8)
    figures.save(figure, path)
    return figure


def error_figure(schema, errors, path):
    """Error per landmark (full names; colour: sub-anatomy, with its legend) and the detection rate."""
    figure, (left, right) = figures.plt.subplots(1, 2, figsize=(12, 5.6), gridspec_kw={"width_ratios": [3, 1]},
                                                 layout="constrained")
    colors = [schema.sub_anatomy(lm.sub_anatomy).color for lm in schema.landmarks]
    left.bar(range(len(errors)), errors, color=colors)
    left.set_xticks(range(len(errors)), [figures.full_name(lm) for lm in schema.landmarks], rotation=90, fontsize=7)
    left.set_ylabel("radial error (mm)")
    left.set_title("Error per landmark", fontsize=9)
    used = dict.fromkeys(lm.sub_anatomy for lm in schema.landmarks)
    left.legend(handles=[figures.plt.Rectangle((0, 0), 1, 1, color=schema.sub_anatomy(name).color, label=name)
                         for name in used], title="sub-anatomy", fontsize=7, title_fontsize=7, ncol=2)
    sdr = [100 * np.mean(errors <= t) for t in SDR_THRESHOLDS_MM]
    right.bar([f"{t:g}" for t in SDR_THRESHOLDS_MM], sdr, color="#4363d8")
    right.set_xlabel("threshold (mm)")
    right.set_ylabel("landmarks within (%)")
    right.set_ylim(0, 112)
    right.set_title("Successful detection rate", fontsize=9)
    for x, value in enumerate(sdr):
        right.text(x, value + 2, f"{value:.0f}", ha="center", fontsize=8)
    figures.save(figure, path)
    return figure


def _cam_half_width(cam: sitk.Image, center_ras, floor: float) -> float:
    """Half the panel width that shows the drawn part of a CAM around the landmark, with some context."""
    from .geometry import Grid

    array = sitk.GetArrayViewFromImage(cam)
    k, j, i = np.nonzero(array >= floor * max(float(array.max()), 1e-30))
    if not len(i):
        return 30.0
    reach = np.abs(Grid.of(cam).to_ras(np.stack([i, j, k], -1)) - np.asarray(center_ras)).max()
    return float(np.clip(1.3 * reach, 30.0, 90.0))


def gradcam_figure(image, schema, cams: dict, predicted, path, layer: str, zoom_mm=None):
    """For a few landmarks: Grad-CAM (hot colours, from ``CAM_FLOOR`` of its maximum) over three slices
    through the detected landmark; one colour bar, a legend, orientation letters on every slice.
    ``zoom_mm`` (half the panel width) defaults to one that shows each map whole."""
    figure, axes = figures.plt.subplots(len(cams), 3, figsize=(8.4, 2.9 * len(cams) + 0.7), layout="constrained")
    axes = np.atleast_2d(axes)
    low, high = figures.intensity_window(image)
    for row, (index, cam) in enumerate(cams.items()):
        top = float(sitk.GetArrayViewFromImage(cam).max()) or 1.0
        half = zoom_mm or _cam_half_width(cam, predicted[index], CAM_FLOOR)
        extent = (0, 2 * half, 2 * half, 0)
        for ax, view in zip(axes[row], figures.VIEWS):
            picture, frame = figures.ras_slab(image, predicted[index], view, half, pixel_mm=0.5)
            heat, _ = figures.ras_slab(cam, predicted[index], view, half, pixel_mm=0.5)
            ax.imshow(picture, cmap="gray", vmin=low, vmax=high, extent=extent)
            shown = ax.imshow(np.ma.masked_less(heat / top, CAM_FLOOR), cmap="hot", vmin=CAM_FLOOR, vmax=1,
                              alpha=0.6, extent=extent)
            x, y, _ = figures.project(predicted[index][None], frame)
            ax.scatter(x, y, **MARKERS["detected"])
            ax.set_xticks([])
            ax.set_yticks([])
            figures.orientation_labels(ax, view, 2 * half)
            ax.set_xlabel(f"{view}, {2 * half:.0f} mm wide", fontsize=7)
        axes[row, 1].set_title(figures.full_name(schema.landmarks[index]), fontsize=9, fontweight="bold")
    figure.suptitle(f"Grad-CAM at layer {layer}: where the network looked for each landmark\n{figures.CONVENTION}",
                    fontsize=9)
    figure.legend(handles=[_marker_handle("detected", "detected landmark")], loc="outside lower center", fontsize=8,
                  frameon=False)
    colorbar = figure.colorbar(shown, ax=axes, fraction=0.03, pad=0.02)
    colorbar.set_label(f"Grad-CAM, fraction of the landmark's own maximum (under {CAM_FLOOR:g} not drawn)", fontsize=8)
    figures.save(figure, path)
    return figure


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}" style="max-width:100%">'


def legend_html(schema, flag_mm: float) -> str:
    """The report's legend: how the figures are oriented, what each colour and marker means."""
    e = html.escape

    def swatch(color, text):
        return f'<span style="color:{color};font-weight:bold">{e(text)}</span>'

    subs = ", ".join(f"{swatch(s.color, chr(0x25A0))} {e(s.name)}" for s in schema.sub_anatomies
                     if schema.indices_of(s.name))
    return f"""<h2>Legend</h2><ul class="legend">
<li><b>Orientation</b>: {e(figures.CONVENTION)}. The letters at the edges of every slice name the patient direction
there: R/L right/left, A/P anterior/posterior, S/I superior/inferior.</li>
<li><b>Landmark slices</b>: {swatch(MARKERS['prediction']['c'], '+')} prediction, {swatch('green', chr(0xD7))} truth
(the known position), {swatch('#b8a000', 'yellow outline')} the shadow of the confidence ellipsoid (flagged when its
longest semi-axis exceeds {flag_mm:g} mm); grey levels: the scan's intensity, colour bar beside the figure.</li>
<li><b>Grad-CAM</b>: hot colours from dark red ({CAM_FLOOR:g} of the landmark's own maximum; weaker is not drawn)
through yellow to white (the maximum), colour bar beside the figure;
{swatch('#00a0a0', '+')} the detected landmark.</li>
<li><b>Error bars</b>: colour is the sub-anatomy: {subs}.</li>
<li><b>Uncertainty vs error</b>: one dot per landmark, labelled with its short name where there is room, the largest errors
first (every landmark, with its full name, is in the table below);
grey dashes: error equal to the semi-axis; red dashes: the flag threshold.</li>
<li><b>Names</b>: figures and tables give each landmark's full name with its short name in brackets.</li></ul>"""


def write_html(path, summary: dict, model, schema, errors, semi_axes, flag_mm, figure_paths: dict, attribution: str):
    e = html.escape
    rows = "".join(
        f"<tr{' class=flag' if s > flag_mm else ''}><td>{lm.number}</td><td>{e(figures.full_name(lm))}</td>"
        f"<td>{e(lm.sub_anatomy)}</td><td>{err:.2f}</td><td>{s:.2f}</td><td>{'yes' if s > flag_mm else ''}</td></tr>"
        for lm, err, s in sorted(zip(schema.landmarks, errors, semi_axes), key=lambda r: -r[2]))
    training = model.training
    validation = model.metrics.get("validation", {})
    sdr = " &middot; ".join(f"{t:g} mm: {summary[f'sdr_{t:g}mm']:.0f}%" for t in SDR_THRESHOLDS_MM)
    text = f"""<!doctype html><html><head><meta charset="utf-8"><title>Landmark detection demo</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}} table{{border-collapse:collapse;font-size:90%}}
td,th{{border:1px solid #ccc;padding:2px 6px}} tr.flag{{background:#fdd}} .note{{background:#ffd;padding:.6em;border:1px solid #cc9}}</style>
</head><body><h1>Landmark detection on an unseen scan of the sample brain</h1>
<p><b>{summary['n']} landmarks of schema {e(schema.name)}</b> detected in {summary['seconds']:.1f} s ({e(summary['device'])}), with {summary['passes']} noise passes for
uncertainty. Mean radial error <b>{summary['mre_mm']:.2f} &plusmn; {summary['sd_mm']:.2f} mm</b> (median {summary['median_mm']:.2f} mm,
max {summary['max_mm']:.2f} mm). Successful detection rate: {sdr}. {summary['flagged']} landmark(s) flagged as uncertain
(longest 90% ellipsoid semi-axis over {flag_mm:g} mm); 90% ellipsoids holding the truth: {summary['coverage'] * 100:.0f}%.</p>
<p class="note"><b>Read this first.</b> The test scan was made from the same template the bundled model was trained on: a new
random oblique head position, re-acquired with 2.2 mm axial slices (224x224x101 voxels), with bias field, ghosting and noise. It shows the tool
working end to end; it does not measure accuracy on anatomy the model never saw (benchmarks/heldout.py does, on two other
brain templates).</p>
{legend_html(schema, flag_mm)}
<h2>Landmarks</h2>{_img(figure_paths['landmarks'], 'landmark slices')}
<h2>Error and detection rate</h2>{_img(figure_paths['errors'], 'errors')}
<h2>Uncertainty</h2>{_img(figure_paths['uncertainty'], 'uncertainty vs error')}
<h2>Grad-CAM</h2><p>Grad-CAM of layer <code>{e(model.network.gradcam_layer)}</code>, the default: the network's finest stage.
Warm colours mark what raised the landmark's heatmap peak. A stage that works on patches (locnet's refining stages) sees
only a small cube around the previous stage's estimate, so its map is zero outside that cube. Coarser stages' layers
(<code>landmark-detection gradcam --layer</code>) show the broad context a model may rely on instead.</p>{_img(figure_paths['gradcam'], 'Grad-CAM')}
<h2>Per landmark (most uncertain first)</h2><table><tr><th>#</th><th>landmark (short name)</th><th>sub-anatomy</th><th>error (mm)</th>
<th>longest semi-axis (mm)</th><th>flagged</th></tr>{rows}</table>
<h2>Model</h2><p>{e(model.config.architecture)}, input grid {model.config.geometry.size} at {model.config.geometry.spacing} mm.
Training data: {e(str(training.get('training_data', training.get('dataset', 'unknown'))))}. Intended use:
{e(str(training.get('intended_use', 'research')))}. Validation mean radial error {validation.get('mre_mm', float('nan')):.2f} mm
(epoch {model.metrics.get('best_epoch', '?')}).</p>
<h2>Files</h2><p>{e(', '.join(summary['files']))}</p>
<h2>Data and licences</h2><p>{e(attribution)}</p></body></html>"""
    atomic_write_text(path, text)
