"""The built-in LeNet-5/digits pairs: a real trained model, real int8 kernels, seed 003's bit sweep."""
import pytest
import torch

from qrobust import zoo
from qrobust.data import load_dataset
from qrobust.pairs import load_pair, pair_names
from qrobust.quantize import quantized_module_names


@pytest.fixture(scope="module")
def test_set():
    data = load_dataset("digits-test")
    return zoo.DIGITS_PREPROCESS.normalize(data.images), data.labels


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
    assert accuracy(zoo.lenet5_digits(), test_set) >= 0.95


def test_int8_pair_runs_int8_kernels_and_agrees_with_fp32(test_set):
    pair = load_pair("lenet5-digits-int8-x86")
    assert pair.kind == "int8" and pair.metadata["engine"] == "x86"
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
    fp32 = accuracy(zoo.lenet5_digits(), test_set)
    acc = {b: accuracy(load_pair(f"lenet5-digits-asym{b}").quantized, test_set) for b in range(1, 9)}
    assert acc[1] <= 0.2  # near chance (10 classes)
    assert acc[2] < acc[4]
    for b in range(5, 9):
        assert acc[b] >= fp32 - 0.01


def test_weights_are_cached_under_a_hash_of_code_and_settings(monkeypatch):
    path = zoo.lenet5_weights_path()
    assert path.exists() and zoo._training_key() in path.name
    monkeypatch.setitem(zoo.LENET_TRAINING, "epochs", 31)
    assert zoo._training_key() not in path.name


def test_registry_lists_builtin_pairs_by_tag():
    assert "lenet5-digits-int8-x86" in pair_names("int8")
    assert pair_names("sweep") == [f"lenet5-digits-asym{b}" for b in range(1, 9)]
