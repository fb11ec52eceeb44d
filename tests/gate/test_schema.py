"""The JSON Schema of thresholds files: generated from the validator's own lists, shipped, and in agreement
with the validator on valid and invalid files (checked with the jsonschema package)."""
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

import qrobust
from qrobust.gate import config as C
from qrobust.gate.declared_config import DATASET_KEYS, PAIR_KEYS
from qrobust.gate.schema import thresholds_schema
from qrobust.suites import BUILTIN_THRESHOLDS

PACKAGE = Path(qrobust.__file__).parent
README = Path(__file__).parents[2] / "README.md"


def as_json(document):
    """What an editor or a CI step sees: YAML read, keys as strings (``at: {0.2: ...}``)."""
    return json.loads(json.dumps(document))


def validate(document):
    jsonschema.Draft202012Validator(thresholds_schema()).validate(as_json(document))


def test_the_shipped_schema_is_the_generated_one_and_is_a_valid_schema():
    """Generated in a fresh interpreter: other tests register their own perturbations and CAM methods."""
    import subprocess
    import sys

    fresh = subprocess.run([sys.executable, "-m", "qrobust", "schema"], capture_output=True, text=True, check=True).stdout
    assert (PACKAGE / "thresholds.schema.json").read_text(encoding="utf-8") == fresh, \
        "regenerate: python -m qrobust schema > qrobust/thresholds.schema.json"
    jsonschema.Draft202012Validator.check_schema(thresholds_schema())


def test_every_section_lists_exactly_the_keys_the_validator_takes():
    schema = thresholds_schema()
    top = schema["properties"]
    assert set(top) == set(C.TOP_KEYS)
    assert set(top["pairs"]["additionalProperties"]["properties"]) == PAIR_KEYS
    assert set(top["datasets"]["additionalProperties"]["properties"]) == DATASET_KEYS
    assert set(top["gate"]["additionalProperties"]["properties"]) == set(C.GATE_KEYS)
    assert set(schema["$defs"]["sweep_entry"]["properties"]) == set(C.SWEEP_KEYS)
    for section, keys in (("bitwidth", C.BITWIDTH_KEYS), ("latency", C.LATENCY_KEYS),
                          ("explanations", C.EXPLANATIONS_KEYS), ("cam", C.CAM_KEYS)):
        assert set(top[section]["properties"]) == set(keys), section


CI_FILES = ("# .github/workflows/", "# .gitlab-ci.yml")


def readme_yaml():
    from helpers import readme_blocks

    return readme_blocks("yaml")


def test_the_built_in_gate_the_starter_and_the_readme_examples_validate(tmp_path):
    from qrobust.starter import write_starter

    validate(yaml.safe_load(BUILTIN_THRESHOLDS.read_text(encoding="utf-8")))
    write_starter(tmp_path / "starter.yaml", force=False)
    validate(yaml.safe_load((tmp_path / "starter.yaml").read_text(encoding="utf-8")))
    for block in readme_yaml():
        if not block.startswith(CI_FILES):  # the CI matrix examples are workflows, not thresholds files
            validate(yaml.safe_load(block))


def test_a_pairs_own_coverage_tolerance_is_valid_for_the_schema_and_the_validator(tmp_path):
    document = {"gate": {"lenet5-digits-int8-x86": {"tolerances": {"quantized_fraction": 0.9}}}}
    validate(document)
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(document))
    C.load_thresholds(path, known_pairs={"lenet5-digits-int8-x86"})


@pytest.mark.parametrize("document, where", [
    ({"gate": {"p": {}}, "decison": "point"}, "decison"),                                   # misspelled top key
    ({"gate": {"p": {"tolerances": {"top1_delat": 0.01}}}}, "top1_delat"),                  # misspelled metric
    ({"gate": {"p": {}}, "decision": "loose"}, "loose"),
    ({"gate": {"p": {}}, "defaults": {"kl_mean": -1}}, "-1"),
    ({"perturbations": {"awgn": {"levels": "all"}}, "gate": {"p": {}}}, "all"),
    ({"perturbations": {"blurr": {"levels": [0]}}, "gate": {"p": {}}}, "blurr"),
    ({"pairs": {"p": {"num_classes": 3, "preprocess": {"resolution": [8, 8], "mean": [0], "std": [1]},
                      "dataset": "d"}}, "gate": {"p": {}}}, "oneOf"),                        # no arch/builder/fp32
    ({"pairs": {"p": {"fp32": "model.pt", "num_classes": 3, "dataset": "d",
                      "preprocess": {"resolution": [8, 8], "mean": [0], "std": [1]}}}}, "model.pt"),
    ({"gate": {"p": {}}, "latency": {"pairs": ["p"], "rounds": 1}}, "1"),
    ({"gate": {"p": {}}, "latency": {"pairs": ["p"], "speedup": 0}}, "minimum of 0"),      # no speedup can miss 0
])
def test_invalid_files_are_rejected_by_the_schema_and_by_the_validator(tmp_path, document, where):
    with pytest.raises(jsonschema.ValidationError) as caught:
        validate(document)
    assert where in str(caught.value)
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(qrobust.ConfigError):
        C.load_thresholds(path, known_pairs={"p"})


def test_the_cli_prints_the_schema(capsys):
    from qrobust.cli import main

    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out)["$id"].endswith("thresholds.schema.json")
