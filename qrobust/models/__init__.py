"""Models: the pair registry, the built-in pairs (registered on import) and user-declared pairs."""
import qrobust.runtimes  # noqa: F401  (registers the runtimes' quantizers before any pair is built)
from qrobust.models import zoo  # noqa: F401  (registers the built-in pairs: torchvision's models/__init__ pattern)
from qrobust.models.pair import (
    PAIRS, ModelPair, PairFacts, Preprocess, load_pair, pair_entry, pair_names, register_pair,
)

__all__ = ["PAIRS", "ModelPair", "PairFacts", "Preprocess", "load_pair", "pair_entry", "pair_names", "register_pair"]
