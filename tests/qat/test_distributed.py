"""Two CPU processes (gloo): distributed calibration gives every rank the encodings of one process that saw
all the shards, and DDP QAT keeps the ranks identical and equal to one process on the global batches."""
import datetime
import json
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from edgequant import QuantSim
from edgequant.qat import finetune, prepare_qat
from tests.ptq.conftest import TinyNet, _digits


def _setup():
    torch.manual_seed(0)
    x, _ = _digits()
    net = TinyNet().train()
    with torch.no_grad():  # real BN statistics
        for i in range(0, 256, 64):
            net(x[i:i + 64])
    return net.eval(), [x[i:i + 32] for i in range(0, 256, 32)], [x[400 + i:400 + i + 16] for i in range(0, 96, 16)]


def _worker(rank, world, init, out):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        net, cal, train = _setup()
        sim = QuantSim(net, cal[0][:1], "w4a8")
        sim.calibrate(cal[rank::world], progress=False)  # this rank's shard
        sim.save_encodings(f"{out}/enc{rank}.json")
        prepare_qat(sim)
        finetune(DistributedDataParallel(sim), train[rank::world], steps=3, lr=1e-3, teacher=net, progress=False,
                 schedule="constant")
        torch.save(sim.state_dict(), f"{out}/state{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_agree_with_each_other_and_with_one(tmp_path):
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.spawn(_worker, args=(2, f"tcp://127.0.0.1:{port}", str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):  # never hang the suite: fail after 4 minutes
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            raise AssertionError("the two processes did not finish in 240 s")
    e0, e1 = (json.loads((tmp_path / f"enc{r}.json").read_text()) for r in (0, 1))
    assert e0 == e1  # identical encodings on both ranks
    net, cal, train = _setup()
    one = QuantSim(net, cal[0][:1], "w4a8")
    one.calibrate(cal, progress=False)  # one process, all the batches
    one.save_encodings(tmp_path / "one.json")
    e = json.loads((tmp_path / "one.json").read_text())
    for kind in ("activations", "params"):
        assert e[kind].keys() == e0[kind].keys()
        for name in e[kind]:
            a, b = e[kind][name], e0[kind][name]
            assert a["zero_point"] == b["zero_point"], name
            assert torch.allclose(torch.tensor(a["scale"]), torch.tensor(b["scale"]), rtol=1e-6), name
    s0, s1 = (torch.load(tmp_path / f"state{r}.pt") for r in (0, 1))
    assert all(torch.equal(s0[k], s1[k]) for k in s0)  # DDP kept the ranks identical
    prepare_qat(one)  # one process on the global batches (rank 0's and rank 1's together) learns the same
    glob = [torch.cat([a, b]) for a, b in zip(train[0::2], train[1::2])]
    finetune(one, glob, steps=3, lr=1e-3, teacher=net, progress=False, schedule="constant")
    mine = one.state_dict()
    learned = [k for k in s0 if k.endswith((".scale", ".offset", "weight", "bias"))]
    # within a tenth of one Adam step (lr 1e-3, and Adam's first steps move every weight by about lr): the sums in
    # another order can flip a rounding at a grid's edge (3 of 512 weights of one layer moved 4e-5 once the model
    # input took a min-max grid), while gradients that were not averaged would move weights by whole steps
    assert learned and all(torch.allclose(mine[k], s0[k], atol=1e-4, rtol=1e-4) for k in learned)


def test_distributed_true_without_a_process_group_says_what_to_do():
    import pytest
    net, cal, _ = _setup()
    sim = QuantSim(net, cal[0][:1], "w8a8")
    with pytest.raises(RuntimeError, match="init_process_group"):
        sim.calibrate(cal[:1], progress=False, distributed=True)
