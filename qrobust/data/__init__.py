"""Data: datasets (built-in, image folders, user builders) and the perturbations applied to them."""
from qrobust.data import builtin  # noqa: F401  (registers the built-in datasets)
from qrobust.data.datasets import DATASETS, Batch, ImageSet, StreamingSet, load_dataset
from qrobust.data.perturbations import PERTURBATIONS, Perturbation, perturb
from qrobust.data.perturbations import register as register_perturbation

__all__ = ["DATASETS", "PERTURBATIONS", "Batch", "ImageSet", "Perturbation", "StreamingSet", "load_dataset",
           "perturb", "register_perturbation"]
