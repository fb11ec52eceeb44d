"""A JSON Schema (draft 2020-12) of thresholds files, for editors and for CI checks that do not import torch.

Built from the same key lists, metric catalogue and registries the validator in ``qrobust.gate.config``
reads, so the two cannot drift; ``qrobust schema`` prints it, and the package ships it as
``thresholds.schema.json`` (a test checks the shipped file equals this). The schema checks structure,
names and number ranges; what needs models or files (a builder that imports, a dataset's class count, a
level within a family's range) is left to ``qrobust run``, which reports it in one line.
"""
from __future__ import annotations

from qrobust._options import SEED_MAX
from qrobust.gate import config as C
from qrobust.gate.modes import DECISIONS
from qrobust.metrics.catalog import CASE_METRICS, EXPLANATION_METRICS, LATENCY_METRICS, METRICS

SCHEMA_ID = "https://qrobust.dev/schemas/thresholds.schema.json"


def _closed(properties: dict, **extra) -> dict:
    return {"type": "object", "properties": properties, "additionalProperties": False, **extra}


def _tolerances(metrics) -> dict:
    return _closed({m: {"$ref": "#/$defs/tolerance", "description": METRICS[m].description, **_range(m)}
                    for m in metrics})


def _range(metric: str) -> dict:
    """The tolerances the metric can meet and miss (Metric.tolerance_problem): a minimum above its lowest
    value and at most its highest, a maximum below its highest."""
    low, high = METRICS[metric].values
    bounds = {}
    if METRICS[metric].higher_is_better:
        if low >= 0:
            bounds["exclusiveMinimum"] = low
        if high != float("inf"):
            bounds["maximum"] = high
    elif high != float("inf"):
        bounds["exclusiveMaximum"] = high
    return bounds


def _pairs_list() -> dict:
    return {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}


def schema_text() -> str:
    """The schema as the shipped file holds it (sorted keys, two-space indent, final newline)."""
    import json

    return json.dumps(thresholds_schema(), indent=2, sort_keys=True) + "\n"


def thresholds_schema() -> dict:
    from qrobust.data.perturbations import IMAGENET_C, PERTURBATIONS
    from qrobust.explain.cam import CAM_METHODS
    from qrobust.quant import PRESETS

    whole = {"type": "integer", "minimum": 0}
    positive = {"type": "integer", "minimum": 1}
    level = {"type": "number", "minimum": 0}
    case_tolerances = _tolerances(CASE_METRICS)
    sweep_entry = _closed({
        "levels": {"oneOf": [{"type": "array", "items": level, "minItems": 1, "uniqueItems": True},
                             {"const": "imagenet-c", "description": "level 0 and ImageNet-C's severities 1-5 "
                                                                    f"({', '.join(IMAGENET_C)})"}]},
        "tolerances": case_tolerances,
        "at": {"type": "object", "additionalProperties": case_tolerances,
               "description": "tolerances of one level, keyed by the level"},
    })
    perturbations = _closed({name: {"$ref": "#/$defs/sweep_entry", "description": PERTURBATIONS.get(name).unit}
                             for name in PERTURBATIONS.names()})
    gate_entry = _closed({
        "tolerances": _tolerances(C.PAIR_TOLERANCES),  # as the loader: a pair's cases and its coverage
        "perturbations": {**perturbations, "minProperties": 1},
        "metrics": {"type": "array", "items": {"enum": list(CASE_METRICS)}, "minItems": 1},
        "xfail": {"type": "string", "minLength": 1, "description": "why this pair is known to fail (strict xfail)"},
        "operating_point": {"$ref": "#/$defs/operating_point"},
    })
    margin = {"oneOf": [{"$ref": "#/$defs/tolerance"},
                        _closed({k: {"$ref": "#/$defs/tolerance"} for k in C.MARGIN_KEYS}, minProperties=1)]}
    triplet = {"type": "array", "items": {"type": "number"}, "minItems": 1}
    pair = _closed({
        "arch": {"type": "string"}, "builder": {"type": "string", "pattern": "^[^:]+:[^:]+$"},
        "fp32": {"type": "string", "pattern": r"\.onnx$"}, "quantized": {"type": "string", "pattern": r"\.onnx$"},
        "outputs": {"type": "string", "minLength": 1}, "reference_outputs": {"type": "string", "minLength": 1},
        "providers": {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
        "weights": {"type": "string"}, "trust": {"type": "boolean"}, "num_classes": positive,
        "preset": {"enum": PRESETS.names()},
        "preprocess": _closed({"resolution": {"$ref": "#/$defs/resolution"}, "mean": triplet,
                               "std": {**triplet, "items": {"type": "number", "exclusiveMinimum": 0}}},
                              required=["resolution", "mean", "std"]),
        "dataset": {"type": "string"}, "calibration": _closed({"dataset": {"type": "string"}, "samples": positive},
                                                              required=["dataset"]),
        "target_layer": {"type": "string"}, "quantized_target_layer": {"type": "string"},
    }, required=["num_classes", "preprocess", "dataset"],
        oneOf=[{"required": [source]} for source in ("arch", "builder", "fp32", "reference_outputs")])
    dataset = _closed({
        "folder": {"type": "string"}, "builder": {"type": "string", "pattern": "^[^:]+:[^:]+$"},
        "resolution": {"$ref": "#/$defs/resolution"}, "resize": {"oneOf": [positive, {"const": "stretch"}]},
        "channels": {"enum": [1, 3]}, "boxes": {"type": "string"}, "saliency": {"type": "string"},
        "num_classes": positive, "max_samples": positive, "workers": whole,
    }, oneOf=[{"required": ["folder", "resolution"]}, {"required": ["builder", "num_classes"]}])
    top = {
        "decision": {"enum": list(DECISIONS)}, "seed": {**whole, "maximum": SEED_MAX},
        "batch_size": {**positive, "maximum": C.MAX_BATCH},
        "max_samples": {"oneOf": [{**positive, "maximum": C.MAX_SAMPLES}, {"type": "null"}]},
        "replicates": {"type": "integer", "minimum": 10, "maximum": C.MAX_REPLICATES},
        "f1_average": {"enum": list(C.F1_AVERAGES)},
        "operating_point": {"oneOf": [{"$ref": "#/$defs/operating_point"}, {"type": "null"}]},
        "defaults": _tolerances(C.PAIR_TOLERANCES),
        "baseline": _closed({m: margin for m in METRICS}),
        "perturbations": {**perturbations, "minProperties": 1},
        "gate": {"type": "object", "additionalProperties": gate_entry},
        "cam": _closed({"method": {"enum": ["auto", *CAM_METHODS.names()]}}),
        "bitwidth": _closed({"pairs": _pairs_list(), "min_bits": positive, "perturbation": {"enum": PERTURBATIONS.names()},
                             "level": level, "tolerances": case_tolerances}),
        "latency": _closed({"pairs": _pairs_list(), "batch": {**positive, "maximum": C.MAX_BATCH},
                            "rounds": {"type": "integer", "minimum": 3, "maximum": C.MAX_ROUNDS},
                            **_tolerances(LATENCY_METRICS)["properties"]}),
        "explanations": _closed({"pairs": _pairs_list(), "samples": {**positive, "maximum": C.MAX_SAMPLES},
                                 "steps": {**positive, "maximum": C.MAX_STEPS},
                                 "tolerances": _tolerances(EXPLANATION_METRICS)}),
        "pairs": {"type": "object", "additionalProperties": pair},
        "datasets": {"type": "object", "additionalProperties": dataset},
    }
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID,
            "title": "qrobust thresholds file", "type": "object", "properties": top, "additionalProperties": False,
            "$defs": {"tolerance": {"type": "number", "minimum": 0},
                      "resolution": {"type": "array", "items": positive, "minItems": 2, "maxItems": 2},
                      "operating_point": {"type": "number", "exclusiveMinimum": 0, "maximum": 1,
                                          "description": "deployment threshold tau on top-1 confidence "
                                                         "(operating_point_flips)"},
                      "sweep_entry": sweep_entry}}
