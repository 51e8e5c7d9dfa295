"""Shared test set-up: every test starts from the same global random state, so a result never depends
on which xdist worker ran which tests before it."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
