"""qrobust.testing: the checkers users run on their own perturbations and qparams catch broken ones."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qrobust.data import PERTURBATIONS, register_perturbation
from qrobust.quant.quantizer import QParams, qparams_for
from qrobust.testing import check_perturbation, check_qparams, pixel_batches


@pytest.mark.parametrize("name", [n for n in PERTURBATIONS if not PERTURBATIONS.get(n).needs_model])
def test_every_built_in_perturbation_keeps_the_contract(name):
    check_perturbation(name)


def _register_broken():
    if "broken-inplace" in PERTURBATIONS:
        return

    @register_perturbation("broken-inplace", unit="-", levels=(0, 0.1), tags=("test",))
    def broken_inplace(images, level, ctx):
        return images.add_(level).clamp_(0, 1)  # modifies the caller's tensor

    @register_perturbation("broken-batch", unit="-", levels=(0, 0.1), tags=("test",))
    def broken_batch(images, level, ctx):
        return (images + level * torch.rand(images.shape)).clamp(0, 1)  # global RNG: depends on batch mates


def test_broken_perturbations_are_caught_with_one_line():
    _register_broken()
    with pytest.raises(AssertionError, match="broken-inplace: modified its input in place"):
        check_perturbation("broken-inplace")
    with pytest.raises(AssertionError, match="depend on the batch order|depend on its batch mates"):
        check_perturbation("broken-batch")


@given(pixel_batches(), st.integers(2, 8), st.booleans(), st.booleans())
def test_minmax_qparams_keep_the_quantizer_properties(images, bits, symmetric, per_channel):
    qp = qparams_for(images, bits=bits, symmetric=symmetric, signed=symmetric, axis=1 if per_channel else None)
    check_qparams(qp, images)


def test_broken_qparams_are_caught():
    good = qparams_for(torch.linspace(-1, 1, 50), bits=8, signed=False)
    check_qparams(good, torch.linspace(-2, 2, 101))
    with pytest.raises(AssertionError, match="scale: not finite and > 0"):
        check_qparams(QParams(torch.tensor(0.0), good.zero_point, good.q_min, good.q_max))
    with pytest.raises(AssertionError, match="outside the grid"):
        check_qparams(QParams(good.scale, torch.tensor(300), good.q_min, good.q_max))
