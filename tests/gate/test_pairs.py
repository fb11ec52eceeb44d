"""The pair cache: each pair built once per process, a failed build too."""
import pytest

from qrobust.gate.config import load_thresholds
from qrobust.gate.pairs import PairCache, PairUnavailable
from qrobust.models import register_pair
from qrobust.models.pair import PAIRS


def test_a_pair_that_cannot_be_built_is_tried_once(tmp_path):
    """The quantizer suite asks for the built pair directly (a twin too broken for the probe is still read):
    a failed build was repeated on every such request, minutes each for a real model."""
    calls = []

    def unbuildable():
        calls.append(1)
        raise ValueError("checkpoint does not fit resnet18")

    if "tried-once" not in PAIRS:
        register_pair("tried-once", unbuildable)
    (tmp_path / "gate.yaml").write_text("decision: point\ngate: {tried-once: {}}\n")
    cache = PairCache(load_thresholds(tmp_path / "gate.yaml", known_pairs={"tried-once"}), probe=lambda pair: None,
                      datasets=dict)
    for _ in range(3):
        with pytest.raises(ValueError, match="does not fit"):
            cache.built("tried-once")
    with pytest.raises(PairUnavailable, match="pair tried-once cannot be gated: checkpoint does not fit resnet18"):
        cache.pair("tried-once")
    assert len(calls) == 1 and cache.loads["tried-once"] == 1
