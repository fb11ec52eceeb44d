"""CAM overlays for the report: per evaluated CAM case, its most different image as thumbnails (the
input, the FP32 map, the quantized map) with both models' top-1 class on it, as predicted in the
evaluation pass (no model runs again, so merged shards draw them too)."""
from __future__ import annotations


def overlay(result) -> dict | None:
    """The overlay of one evaluated case (``CaseResult``); None without CAMs."""
    from qrobust.gate.html_report import thumbnail

    if not (result.cam and result.cam.overlays):
        return None
    o = result.cam.overlays[0]
    top1 = o.get("top1") or [None, None]
    return {"pair": result.pair, "perturbation": result.perturbation, "level": result.level, "id": o["id"],
            "rmse": o["rmse"], "method": result.cam.method, "top1_fp32": top1[0], "top1_quant": top1[1],
            "image": thumbnail(o["pixels"]), "fp32": thumbnail(o["pixels"], o["fp32"]),
            "quantized": thumbnail(o["pixels"], o["quantized"])}


def overlays(results, where: tuple | None = None) -> list[dict]:
    """The overlays of the evaluated ``results`` (only the case ``where``, (pair, perturbation, level), when
    given): every case sends one, the report places them with the failing case they explain (verdicts
    meet only in the controller)."""
    found = [overlay(r) for r in results if where is None or (r.pair, r.perturbation, r.level) == where]
    return [o for o in found if o is not None]
