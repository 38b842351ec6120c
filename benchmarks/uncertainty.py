"""locnet vs highres3dnet on a 224x224x101 volume with 88 landmarks: detection time and peak memory;
50 batched uncertainty passes vs 50 sequential full passes; the bundled AFIDs-32 model end to end (32
landmarks, 50-pass uncertainty, alignment included, on the demo's test scan); and the accuracy of both
architectures on the AFIDs development data (small models trained on moved copies of the sample
template, tested on held-out moved copies). Last line: one JSON object.

    python benchmarks/uncertainty.py [--device cpu] [--skip-accuracy]
"""

import argparse
import json
import time

from _common import peak_rss_mb, run_child

SIZE, SPACING = (224, 224, 101), (1.0, 1.0, 2.2)
KINDS = ("locnet-detect", "highres-detect", "locnet-uncertainty50", "locnet-sequential50", "bundled-uncertainty50")
NETWORKS = {"locnet": {"channels": [16, 16, 8], "scales_mm": [4.0, 2.0, 1.0], "patch_sizes": [24, 16]},
            "highres3dnet": {"channels": [16, 32, 64], "blocks_per_stage": 3, "dropout": 0.1}}


def measure_bundled(device: str, threads: int) -> dict:
    """The bundled model as a user runs it: alignment, input resampling and 50 noise passes."""
    import torch

    from LandmarkDetectionLib.detect import UncertaintyOptions, detect_volume
    from LandmarkDetectionLib.modelfile import load_model
    from LandmarkDetectionLib.resources import bundled_model_path
    from LandmarkDetectionLib.testscans import make_test_scan, sample_case

    torch.set_num_threads(threads)
    image, landmarks, _, _ = sample_case()
    scan, _, _ = make_test_scan(image, landmarks)
    model = load_model(bundled_model_path(), device)
    start = time.perf_counter()
    detection = detect_volume(model, scan, device, "scan", UncertaintyOptions(passes=50))
    seconds = time.perf_counter() - start
    gpu = torch.cuda.max_memory_allocated() / 2 ** 20 if device.startswith("cuda") else None
    return {"seconds": seconds, "peak_mb": peak_rss_mb(), "gpu_peak_mb": gpu,
            "landmarks": len(detection.landmarks_ras), "aligned": detection.alignment is not None}


def measure(kind: str, device: str, threads: int) -> dict:
    import torch

    if kind == "bundled-uncertainty50":
        return measure_bundled(device, threads)
    from LandmarkDetectionLib.detect import predict
    from LandmarkDetectionLib.modelfile import LandmarkModel, ModelConfig
    from LandmarkDetectionLib.preprocess import InputGeometry
    from LandmarkDetectionLib.schema import load_schema

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    architecture = "highres3dnet" if kind.startswith("highres") else "locnet"
    model = LandmarkModel.create(ModelConfig(architecture, NETWORKS[architecture], InputGeometry(SIZE, SPACING)),
                                 load_schema("brain-88"))
    network = model.network.to(device).eval()
    x = torch.randn(1, 1, *reversed(SIZE), device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        predict(model, x[..., :32, :32, :32] if architecture == "highres3dnet" else x, device)  # warm-up
        sync()
        start = time.perf_counter()
        if kind.endswith("detect"):
            predict(model, x, device)
        elif kind == "locnet-uncertainty50":
            network.sample_indices(x, 50, torch.Generator().manual_seed(0), 5.0)
        elif kind == "locnet-sequential50":
            for _ in range(50):
                predict(model, x, device)
        sync()
        seconds = time.perf_counter() - start
    gpu = torch.cuda.max_memory_allocated() / 2 ** 20 if device.startswith("cuda") else None
    return {"seconds": seconds, "peak_mb": peak_rss_mb(), "gpu_peak_mb": gpu}


def accuracy(architecture: str, work) -> float:
    """MRE (mm) on 4 held-out moved copies of the sample template after a short CPU training."""
    import numpy as np

    from LandmarkDetectionLib.testscans import random_head_position, sample_case
    from LandmarkDetectionLib.detect import detect_image
    from LandmarkDetectionLib.geometry import apply_matrix, move_image
    from LandmarkDetectionLib.fileio import write_markups_json, write_volume
    from LandmarkDetectionLib.metrics import radial_errors
    from LandmarkDetectionLib.modelfile import load_model
    from LandmarkDetectionLib.preprocess import resample_isotropic
    from LandmarkDetectionLib.train import TrainOptions, train

    image, landmarks, schema, _ = sample_case()
    image = resample_isotropic(image, 2.0)
    rng = np.random.default_rng(5)
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    for n in range(20):
        motion = random_head_position(image, rng)
        write_volume(move_image(image, motion), data / f"c{n:02d}.nii.gz")
        write_markups_json(data / f"c{n:02d}.mrk.json", schema, apply_matrix(motion, landmarks))
    common = dict(schema="afids-32", size=(64, 76, 64), spacing=(3.0, 3.0, 3.0), epochs=15, lr=3e-3, sigma_mm=3.0,
                  val_fraction=0.15, patience=15, progress="none")
    if architecture == "locnet":
        options = dict(architecture="locnet", channels=(12, 12, 8), scales_mm=(6.0, 3.0, 1.5), patch_sizes=(16, 12))
    else:
        options = dict(architecture="highres3dnet", channels=(12, 16, 24), blocks_per_stage=1, dropout=0.1,
                       size=(40, 48, 40), spacing=(4.5, 4.5, 4.5), sigma_mm=6.0)
    model_path = train(TrainOptions(dataset=str(data), output=str(work / architecture), **{**common, **options}))
    model = load_model(model_path)
    errors = []
    for n in range(4):  # held-out motions
        motion = random_head_position(image, np.random.default_rng([99, n]))
        predicted = detect_image(model, move_image(image, motion), "cpu")
        errors.append(radial_errors(predicted, apply_matrix(motion, landmarks)))
    return float(np.mean(errors))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--kinds", default="locnet-detect,highres-detect,locnet-uncertainty50,locnet-sequential50,"
                                           "bundled-uncertainty50", help="comma-separated measurements to run")
    parser.add_argument("--child", action="store_true", help="internal: run one measurement")
    parser.add_argument("kind", nargs="?")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.kind, args.device, args.threads)))
        return
    results = {}
    for kind in KINDS:
        if kind not in args.kinds.split(","):
            results[kind] = {}
            continue
        results[kind] = run_child(__file__, kind, "--device", args.device, "--threads", str(args.threads))
        print(f"{kind}: {results[kind]}", flush=True)
    mre = {}
    if not args.skip_accuracy:
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as work:
            for architecture in ("locnet", "highres3dnet"):
                mre[architecture] = accuracy(architecture, Path(work))
                print(f"{architecture} MRE on held-out head positions: {mre[architecture]:.2f} mm", flush=True)
    get = lambda kind, key="seconds": results[kind].get(key)  # noqa: E731
    summary = {"device": args.device, "threads": args.threads, "size": list(SIZE), "landmarks": 88,
               "locnet_detect_s": get("locnet-detect"), "highres_detect_s": get("highres-detect"),
               "locnet_peak_mb": get("locnet-detect", "peak_mb"), "highres_peak_mb": get("highres-detect", "peak_mb"),
               "uncertainty50_s": get("locnet-uncertainty50"), "uncertainty50_peak_mb": get("locnet-uncertainty50", "peak_mb"),
               "sequential50_s": get("locnet-sequential50"),
               "bundled_uncertainty50_s": get("bundled-uncertainty50"),
               "bundled_uncertainty50_peak_mb": get("bundled-uncertainty50", "peak_mb"),
               "mre_locnet_mm": mre.get("locnet"), "mre_highres_mm": mre.get("highres3dnet"),
               "errors": {k: v["error"] for k, v in results.items() if "error" in v}}
    if summary["locnet_detect_s"] and summary["highres_detect_s"]:
        summary["highres_over_locnet_time"] = summary["highres_detect_s"] / summary["locnet_detect_s"]
        summary["highres_over_locnet_memory"] = summary["highres_peak_mb"] / summary["locnet_peak_mb"]
    if summary["uncertainty50_s"] and summary["sequential50_s"]:
        summary["sequential_over_batched"] = summary["sequential50_s"] / summary["uncertainty50_s"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
