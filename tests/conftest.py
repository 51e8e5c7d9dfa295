"""Shared test set-up: every test starts from the same global random state, so a result never depends
on which xdist worker ran which tests before it."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def folded():
    """The digit CNN of tests/ptq (BN statistics from real digits), batch norms folded, and the digits."""
    from edgequant.ptq import fold_batch_norms
    from tests.ptq.conftest import TinyNet, _digits

    torch.manual_seed(0)
    x, _ = _digits()
    net = TinyNet()
    net.train()
    with torch.no_grad():  # real BN statistics on real digits
        for i in range(0, 512, 64):
            net(x[i:i + 64])
    net.eval()
    return fold_batch_norms(net)[0], x
