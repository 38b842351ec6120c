"""Grad-CAM for all 88 landmarks of a 224x224x101 volume: time and peak memory, one forward pass and
chunked backward passes. Measured for locnet at full size, at its default layer (the finest stage, whose
maps are computed on each landmark's crop and placed back into the volume) and at a coarse-stage layer
(coarse.decode.0.0); and, with --highres-size, for highres3dnet (blocks.2.conv2): one backward pass per
landmark through a full-resolution dilated network is about 1.5 TFLOP even at 112x112x51 (some 20 minutes
for 88 landmarks on 2 CPU cores), so that part is for a GPU. Last line: one JSON object (all88_s,
peak_mb = locnet's default layer; coarse_all88_s, coarse_peak_mb = its coarse layer).

    python benchmarks/gradcam.py [--device cuda] [--highres-size 224,224,101]
"""

import argparse
import json
import time

from _common import peak_rss_mb, run_child

NETWORKS = {"locnet": {"channels": [16, 16, 8], "scales_mm": [4.0, 2.0, 1.0], "patch_sizes": [24, 16]},
            "highres3dnet": {"channels": [16, 32, 64], "blocks_per_stage": 3, "dropout": 0.1}}


def measure(architecture: str, size, device: str, threads: int, layer: str | None) -> dict:
    import numpy as np
    import SimpleITK as sitk
    import torch

    from LandmarkDetectionLib.gradcam import compute_gradcam
    from LandmarkDetectionLib.modelfile import LandmarkModel, ModelConfig
    from LandmarkDetectionLib.preprocess import InputGeometry
    from LandmarkDetectionLib.schema import load_schema

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    spacing = (1.0 * 224 / size[0], 1.0 * 224 / size[1], 2.2 * 101 / size[2])
    model = LandmarkModel.create(ModelConfig(architecture, NETWORKS[architecture], InputGeometry(tuple(size), spacing)),
                                 load_schema("brain-88"))
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(100, 20, tuple(reversed(size))).astype(np.float32))
    image.SetSpacing(spacing)
    start = time.perf_counter()
    result = compute_gradcam(model, image, layer=layer, device=device, chunk=8)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mb": peak_rss_mb(), "landmarks": len(result.landmarks), "layer": result.layer,
            "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2 ** 20 if device.startswith("cuda") else None}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--highres-size", default=None, help="also measure highres3dnet at this size (GPU)")
    parser.add_argument("--child", action="store_true", help="internal: run one measurement")
    parser.add_argument("--layer", default=None, help="internal: the layer of one measurement")
    parser.add_argument("architecture", nargs="?")
    parser.add_argument("--size", default="224,224,101")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.architecture, [int(v) for v in args.size.split(",")], args.device, args.threads,
                                 args.layer)))
        return
    common = ("--device", args.device, "--threads", str(args.threads))
    locnet = run_child(__file__, "locnet", "--size", "224,224,101", *common)
    print(f"locnet 224x224x101, 88 landmarks, default layer: {locnet}", flush=True)
    coarse = run_child(__file__, "locnet", "--size", "224,224,101", "--layer", "coarse.decode.0.0", *common)
    print(f"locnet 224x224x101, 88 landmarks, coarse layer: {coarse}", flush=True)
    highres = {}
    if args.highres_size:
        highres = run_child(__file__, "highres3dnet", "--size", args.highres_size, *common)
        print(f"highres3dnet {args.highres_size}, 88 landmarks: {highres}", flush=True)
    runs = (("locnet", locnet), ("coarse", coarse), ("highres", highres))
    print(json.dumps({"device": args.device, "threads": args.threads, "all88_s": locnet.get("seconds"),
                      "peak_mb": locnet.get("peak_mb"), "layer": locnet.get("layer"), "architecture": "locnet",
                      "size": [224, 224, 101], "coarse_all88_s": coarse.get("seconds"),
                      "coarse_peak_mb": coarse.get("peak_mb"),
                      "highres_all88_s": highres.get("seconds"), "highres_peak_mb": highres.get("peak_mb"),
                      "highres_size": [int(v) for v in args.highres_size.split(",")] if args.highres_size else None,
                      "errors": {k: v["error"] for k, v in runs if "error" in v}}))


if __name__ == "__main__":
    main()
