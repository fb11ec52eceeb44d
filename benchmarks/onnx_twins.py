"""ONNX Runtime int8 twins against the torch FP32 model, on the built-in ImageNet photos (49 views).

For EfficientNet-Lite0 (its ImageNet weights) and ResNet18 (seeded, BatchNorm statistics re-estimated on
photos: no trained torchvision weights ship offline, see tests/explain/test_twin_layers.py), each ONNX
Runtime preset: top-1 agreement and mean KL of the ORT int8 twin vs the torch FP32 model, EigenCAM
agreement at the CAM layer (RMSE, SIM, CC, KLD), and the latency of ORT int8 vs ORT FP32 (same runtime)
and vs torch FP32, batch 16, interleaved. Also the same Lite0 recipe with full 8-bit weights (no
reduce_range), which saturates on x86 CPUs without VNNI.

Run: .venv/bin/python benchmarks/onnx_twins.py
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from explain.test_twin_layers import realistic  # noqa: E402

from qrobust.data import builtin, load_dataset  # noqa: E402
from qrobust.explain.cam import compute_cams  # noqa: E402
from qrobust.metrics import saliency  # noqa: E402
from qrobust.metrics.classification import kl_per_sample  # noqa: E402
from qrobust.metrics.timing import interleaved_speedup  # noqa: E402
from qrobust.models.zoo import IMAGENET_PREPROCESS, lite0_fp32  # noqa: E402
from qrobust.quant import get_preset, quantize_model  # noqa: E402


def main() -> None:
    x = IMAGENET_PREPROCESS.normalize(load_dataset("imagenet-photos").images)
    calibration = list(IMAGENET_PREPROCESS.normalize(builtin.calibration_photos(224)).split(16))
    ort8 = get_preset("ort-int8")
    recipes = {"efficientnet-lite0": (lite0_fp32(), "_act1", ["ort-int8", "ort-int8-percentile", "8-bit weights"]),
               "resnet18 (seeded, BN re-estimated)": (realistic("resnet18")[0], "layer4", ["ort-int8", "ort-int8-percentile"])}
    print(f"threads {torch.get_num_threads()}, n = {len(x)} views")
    for name, (fp32, layer, presets) in recipes.items():
        with torch.inference_mode():
            reference = fp32(x)
        fp_cams = compute_cams(fp32, x, layer, ["eigencam"])
        for preset in presets:
            config = replace(ort8, name="ort-int8-w8", weight=replace(ort8.weight, bits=8)) if preset == "8-bit weights" \
                else get_preset(preset)
            twin = quantize_model(fp32, config, calibration)
            logits = twin(x)
            q_cams = compute_cams(twin, x, twin.layer_for(layer), ["eigencam"], targets=fp_cams.targets)
            a, b = fp_cams.maps["eigencam"][0], q_cams.maps["eigencam"][0]
            cam = [f(a, b).nanmean().item() for f in (saliency.cam_rmse, saliency.cam_sim, saliency.cam_cc, saliency.cam_kld)]
            same = interleaved_speedup(twin.fp32_reference, twin, x[:16], x[:16], rounds=15)
            torch_fp = interleaved_speedup(fp32, twin, x[:16], x[:16], rounds=15)
            agreement = (logits.argmax(1) == reference.argmax(1)).float().mean().item()
            print(f"{name} {config.name}: agreement {agreement:.3f}, KL {kl_per_sample(reference, logits).mean():.4f}, "
                  "EigenCAM RMSE/SIM/CC/KLD " + "/".join(f"{v:.3f}" for v in cam) +
                  f" | ORT FP32 {same.fp32_ms:.0f} ms vs ORT int8 {same.quantized_ms:.0f} ms: {same.speedup:.2f}x; "
                  f"torch FP32 {torch_fp.fp32_ms:.0f} ms: {torch_fp.speedup:.2f}x", flush=True)


if __name__ == "__main__":
    main()
