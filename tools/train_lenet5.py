"""Train the built-in LeNet-5 on scikit-learn's digits and write qrobust/models/weights/lenet5-digits.safetensors.

Run: .venv/bin/python tools/train_lenet5.py [OUTPUT]   (about 15 s on 2 cores)

Deterministic on one machine (fixed split, seed, one thread); another CPU gives slightly different weights
(float reductions differ), which is why the gate ships the weights instead of training them.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from qrobust.data import load_dataset
from qrobust.models.lenet import DIGITS_PREPROCESS, LENET5_RECIPE, LENET5_WEIGHTS, LeNet5


def augment(images: torch.Tensor, generator: torch.Generator, recipe: dict = LENET5_RECIPE) -> torch.Tensor:
    """Random brightness offset, contrast reduction and Gaussian noise per image, clipped to [0, 1]."""
    n = len(images)

    def uniform(low_high):
        low, high = low_high
        return low + (high - low) * torch.rand(n, 1, 1, 1, generator=generator)

    brightness, reduction = uniform(recipe["brightness"]), uniform(recipe["contrast_reduction"])
    mean = images.mean(dim=(-2, -1), keepdim=True)
    x = (mean + (1 - reduction) * (images - mean) + brightness).clamp(0, 1)
    noise = torch.randn(x.shape, generator=generator) * uniform(recipe["noise_sigma"])
    return (x + noise).clamp(0, 1)


def train(recipe: dict = LENET5_RECIPE) -> LeNet5:
    train_set = load_dataset("digits-train")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise-reproducible reductions on one machine
    try:
        torch.manual_seed(recipe["seed"])
        model = LeNet5()
        optimizer = torch.optim.Adam(model.parameters(), lr=recipe["lr"])
        generator = torch.Generator().manual_seed(recipe["seed"])
        model.train()
        for _ in range(recipe["epochs"]):
            for idx in torch.randperm(len(train_set), generator=generator).split(recipe["batch_size"]):
                x = DIGITS_PREPROCESS.normalize(augment(train_set.images[idx], generator, recipe))
                optimizer.zero_grad()
                F.cross_entropy(model(x), train_set.labels[idx]).backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def test_accuracy(model: LeNet5) -> float:
    test_set = load_dataset("digits-test")
    with torch.inference_mode():
        predictions = model(DIGITS_PREPROCESS.normalize(test_set.images)).argmax(1)
    return float((predictions == test_set.labels).float().mean())


def main(output: str = str(LENET5_WEIGHTS)) -> None:
    from safetensors.torch import save_file

    model = train()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), output, metadata={"recipe": repr(LENET5_RECIPE), "torch": torch.__version__})
    print(f"{output}: test top-1 {test_accuracy(model):.4f} on {len(load_dataset('digits-test'))} digits")


if __name__ == "__main__":
    main(*sys.argv[1:2])
