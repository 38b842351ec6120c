"""Detection time and peak memory for one 224x224x101 volume with 88 landmarks (brain-88, the paper's
HighRes3DNet 16/32/64 channels, 3 blocks per stage), and one training step's time. Each measurement
runs in its own process so its peak resident memory is its own. Last line: one JSON object.

    python benchmarks/detect.py [--device cpu] [--train-size 112,112,51]

A full-resolution training step needs far more than this machine's 24 GB on CPU (all activations of a
full-resolution network are kept for the backward pass); --train-size picks the grid it is measured on
and the JSON names it. On a GPU use --train-size 224,224,101.
"""

import argparse
import json
import time

from _common import peak_rss_mb, run_child


def measure(kind: str, size, device: str, threads: int) -> dict:
    import torch

    from LandmarkDetectionLib.detect import predict
    from LandmarkDetectionLib.heatmaps import soft_argmax, spatial_softmax
    from LandmarkDetectionLib.losses import landmark_loss
    from LandmarkDetectionLib.modelfile import LandmarkModel, ModelConfig
    from LandmarkDetectionLib.preprocess import InputGeometry
    from LandmarkDetectionLib.schema import load_schema

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = ModelConfig("highres3dnet", {"channels": [16, 32, 64], "blocks_per_stage": 3},
                         InputGeometry(tuple(size), (1.0, 1.0, 2.2)))
    model = LandmarkModel.create(config, load_schema("brain-88"))
    network = model.network.to(device)
    x = torch.randn(1, 1, *reversed(size), device=device)
    baseline = peak_rss_mb()
    if kind == "detect":
        network.eval()
        start = time.perf_counter()
        with torch.inference_mode():
            predict(model, x, device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    else:
        network.train()
        optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
        target = torch.rand(1, 88, 3, device=device) * torch.tensor(size, device=device, dtype=torch.float32)
        mask = torch.ones(1, 88, dtype=torch.bool, device=device)
        start = time.perf_counter()
        probs = spatial_softmax(network(x))
        loss = landmark_loss("mixed", probs, soft_argmax(probs), target, mask, (1.0, 1.0, 2.2), 3.0)
        loss.backward()
        optimizer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    gpu_peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device.startswith("cuda") else None
    return {"seconds": seconds, "peak_mb": peak, "baseline_mb": baseline, "gpu_peak_mb": gpu_peak}


def child(kind, size, device, threads) -> dict:
    return run_child(__file__, kind, "--size", ",".join(map(str, size)), "--device", device, "--threads", str(threads))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", default="224,224,101")
    parser.add_argument("--train-size", default="112,112,51")
    parser.add_argument("--child", action="store_true", help="internal: run one measurement")
    parser.add_argument("kind", nargs="?", choices=("detect", "train"))
    args = parser.parse_args()
    size = [int(v) for v in args.size.split(",")]
    if args.child:
        print(json.dumps(measure(args.kind, size, args.device, args.threads)))
        return
    train_size = [int(v) for v in args.train_size.split(",")]
    detect = child("detect", size, args.device, args.threads)
    print(f"detect {size} on {args.device}: {detect}", flush=True)
    train = child("train", train_size, args.device, args.threads)
    print(f"train step {train_size} on {args.device}: {train}", flush=True)
    print(json.dumps({"device": args.device, "threads": args.threads, "landmarks": 88, "detect_size": size,
                      "detect_s": detect.get("seconds"), "peak_mb": detect.get("peak_mb"),
                      "gpu_peak_mb": detect.get("gpu_peak_mb"), "train_step_size": train_size,
                      "train_step_s": train.get("seconds"), "train_peak_mb": train.get("peak_mb"),
                      "errors": {k: v["error"] for k, v in (("detect", detect), ("train", train)) if "error" in v}}))


if __name__ == "__main__":
    main()
