"""Quantization-aware training on several processes: ``torchrun --nproc_per_node=2 examples/qat_ddp.py``.

Each process trains the project's MNIST-5k network the same way (fixed seed), calibrates a W4A8 sim on its
own shard of the calibration images (the statistics are merged: every rank gets the same encodings),
then fine-tunes the sim wrapped in DistributedDataParallel by distillation from the float model on its
shard of the training images (gloo on CPU, NCCL on GPUs). Rank 0 evaluates, exports and saves.
"""
from __future__ import annotations

import argparse
import os
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import edgequant
from edgequant import QuantSim
from edgequant.data.mnist import mnist_5k
from edgequant.models.mnist_net import train_mnist_net
from edgequant.qat import finetune, prepare_qat


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--recipe", default="w4a8")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--out", default="reports/qat_ddp")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    try:
        xtr, ytr, xte, yte = mnist_5k()
        net = train_mnist_net(xtr, ytr, epochs=2).to(device)  # the same on every rank (fixed seed)
        sim = QuantSim(net, xtr[:1].to(device), args.recipe)
        shard = xtr[rank::world]
        report = sim.calibrate(list(shard[:512 // world].split(64)), progress=rank == 0)  # merged across ranks
        prepare_qat(sim)
        ddp = DistributedDataParallel(sim, device_ids=[device.index] if cuda else None)
        qat = finetune(ddp, list(shard.split(64)), epochs=args.epochs, lr=1e-3, teacher=net, report_dir=args.out)
        if rank == 0:
            with torch.no_grad():
                acc = lambda m: float((torch.cat([m(b.to(device)).argmax(1).cpu() for b in xte.split(256)]) == yte).float().mean())  # noqa: E731
                print(f"{world} processes; calibration batches over all ranks: {report.batches}; {qat}")
                print(f"held-out accuracy: FP32 {acc(net):.4f}, {args.recipe} after QAT {acc(sim):.4f}")
            edgequant.export_onnx(sim, os.path.join(args.out, "model.onnx"))
            sim.save(os.path.join(args.out, "sim"))
            print(f"wrote {args.out}/: model.onnx, model.encodings.json, sim/, report.json, qat.png")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
