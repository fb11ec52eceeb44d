"""The built-in LeNet-5/digits pairs: shipped trained weights, real int8 kernels, seed 003's bit sweep."""
import importlib.util
from pathlib import Path

import pytest
import torch

from qrobust.data import load_dataset
from qrobust.models import lenet, load_pair, pair_names
from qrobust.models.checkpoints import tensor_fingerprint
from qrobust.quant import quantized_module_names

SHIPPED_TOP1 = 0.9756  # the shipped weights' test accuracy (tools/train_lenet5.py prints it)


@pytest.fixture(scope="module")
def test_set():
    data = load_dataset("digits-test")
    return lenet.DIGITS_PREPROCESS.normalize(data.images), data.labels


def accuracy(model, test_set):
    x, y = test_set
    with torch.inference_mode():
        return (model(x).argmax(1) == y).float().mean().item()


def test_digits_split_is_real_and_fixed():
    train, test = load_dataset("digits-train"), load_dataset("digits-test")
    assert len(train) + len(test) == 1797 and len(test) == 450
    assert set(train.ids.tolist()).isdisjoint(test.ids.tolist())
    assert train.images.shape[1:] == (1, 32, 32)
    assert test.labels.bincount().min() >= 40  # stratified: every class present


def test_fp32_lenet_beats_the_accuracy_floor(test_set):
    assert accuracy(lenet.lenet5_digits(), test_set) >= 0.95


def test_int8_pair_runs_int8_kernels_and_agrees_with_fp32(test_set):
    pair = load_pair("lenet5-digits-int8-x86")
    assert pair.kind == "int8" and pair.config.engine == "x86"
    assert {"graph.features.0", "graph.features.3", "graph.classifier.5"} <= set(quantized_module_names(pair.quantized))
    # the CAM layer (ReLU features.4) resolves to the conv it was fused into; fake twins keep the name
    assert pair.quantized_target_layer == "features.3"
    assert load_pair("lenet5-digits-w8a8").quantized_target_layer == "features.4"
    x, _ = test_set
    with torch.inference_mode():
        agree = (pair.fp32(x).argmax(1) == pair.quantized(x).argmax(1)).float().mean().item()
    assert agree >= 0.98


def test_pairs_share_one_fp32_model():
    assert load_pair("lenet5-digits-w8a8").fp32 is load_pair("lenet5-digits-int8-x86").fp32


def test_bit_sweep_reproduces_seed_003_shape(test_set):
    fp32 = accuracy(lenet.lenet5_digits(), test_set)
    acc = {b: accuracy(load_pair(f"lenet5-digits-asym{b}").quantized, test_set) for b in range(1, 9)}
    assert acc[1] <= 0.2  # near chance (10 classes)
    assert acc[2] < acc[4]
    for b in range(5, 9):
        assert acc[b] >= fp32 - 0.01


def test_weights_ship_with_the_package_and_are_fingerprinted_by_their_tensors(test_set, tmp_path):
    assert lenet.LENET5_WEIGHTS.is_file() and lenet.LENET5_WEIGHTS.parent.name == "weights"
    assert accuracy(lenet.lenet5_digits(), test_set) == pytest.approx(SHIPPED_TOP1, abs=1e-4)
    pair = load_pair("lenet5-digits-int8-x86")
    state = lenet.lenet5_digits().state_dict()
    assert pair.metadata["weights_fingerprint"] == tensor_fingerprint(state)
    # the same tensors saved twice (torch.save writes a random record name) keep one fingerprint
    for name in ("a.pt", "b.pt"):
        torch.save(state, tmp_path / name)
    loaded = [torch.load(tmp_path / n, weights_only=True) for n in ("a.pt", "b.pt")]
    assert tensor_fingerprint(loaded[0]) == tensor_fingerprint(loaded[1]) == tensor_fingerprint(state)
    changed = dict(state, **{"classifier.5.bias": state["classifier.5.bias"] + 1e-6})
    assert tensor_fingerprint(changed) != tensor_fingerprint(state)


@pytest.mark.slow
def test_retraining_reproduces_the_shipped_accuracy(test_set):
    """tools/train_lenet5.py's recipe gives the shipped accuracy again (bit-identical weights only on the
    machine that trained them: float reductions differ between CPUs)."""
    spec = importlib.util.spec_from_file_location("train_lenet5", Path(__file__).parents[2] / "tools" / "train_lenet5.py")
    trainer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trainer)
    assert trainer.test_accuracy(trainer.train()) == pytest.approx(SHIPPED_TOP1, abs=0.01)


def test_registry_lists_builtin_pairs_by_tag():
    assert "lenet5-digits-int8-x86" in pair_names("int8")
    assert pair_names("sweep") == [f"lenet5-digits-asym{b}" for b in range(1, 9)]
