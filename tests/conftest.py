"""Shared fixtures: a tiny ResNet trained on scikit-learn's digits (a couple of seconds); torch on one thread."""

import pytest
import torch
from torch.utils.data import DataLoader

from hawqc import data, models


@pytest.fixture(scope="session")
def digits_loaders() -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(0)
    train = DataLoader(data.digits("train"), batch_size=64, shuffle=True, generator=generator)
    return train, DataLoader(data.digits("test"), batch_size=512)


@pytest.fixture(scope="session")
def digits_model(digits_loaders: tuple[DataLoader, DataLoader]) -> torch.nn.Module:
    """tiny_resnet trained for 6 epochs on digits (about 98% test accuracy)."""
    torch.manual_seed(0)
    model = models.get("tiny_resnet", num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4, nesterov=True)
    for _ in range(6):
        model.train()
        for x, y in digits_loaders[0]:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="session")
def digits_calibration(digits_loaders: tuple[DataLoader, DataLoader]) -> list[torch.Tensor]:
    return [x for x, _ in list(digits_loaders[0])[:4]]


@pytest.fixture
def one_thread():
    """Small tensors: torch's intra-op threads cost more than they give on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
