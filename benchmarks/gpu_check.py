"""The CUDA paths, checked and timed in one run: the script to hand a lent GPU machine (issue 11, must-show 5).

On a machine without CUDA it prints one line and exits 0 (``--device cpu`` runs the same checks on the CPU, for a
quick rehearsal with ``--smoke``). On CUDA, with real MobileNetV2 (ImageNet weights) and the project's photo crops:

1. **W8A8 sim on CUDA = sim on CPU**: the same calibration on both devices; encodings equal (scale relative
   difference) and the outputs of the CUDA sim against the CPU sim (SQNR, top-1 agreement); a CUDA sim exports to
   ONNX, and ONNX Runtime (CPU) is identical to the CUDA sim's ``integer_exact`` mode.
2. **AdaRound on CUDA** (W4A8, ``--adaround`` it/layer): seconds and held-out fidelity.
3. **QAT on CUDA**: ``prepare_qat`` + ``finetune`` (distillation from FP32 on fresh crops of the calibration photos),
   steps/s at ``--batch``, held-out top-1 agreement / SQNR / KL before and after, and the FP32 model's training
   step in the same process for the ratio (time and peak CUDA memory).

Writes ``gpu_check.json`` and ``gpu_check.md`` to ``--out`` (default ``$OUT`` when set, else ``reports/gpu``) and
exits non-zero when a check fails.

    python benchmarks/gpu_check.py                    # CUDA if present, else skipped
    python benchmarks/gpu_check.py --device cpu --smoke   # rehearsal of every code path on the CPU
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _fid(ref, out) -> dict:
    from edgequant.metrics import fidelity

    f = fidelity(ref.float().cpu(), out.float().cpu())
    return {"top1": f.top1, "sqnr_db": f.sqnr_db, "kl": f.kl}


def _logits(net, x, device, bs=64) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([net(b.to(device)).float().cpu() for b in x.split(bs)])


def check_sim(model, cal, ev, ref, device, out: dict) -> list[str]:
    """W8A8 on ``device`` against the same sim on the CPU; the CUDA sim's ONNX export in ONNX Runtime."""
    import onnxruntime as ort

    import edgequant

    fails = []
    t = time.perf_counter()
    sims = {d: edgequant.quantize(copy.deepcopy(model).to(d), list(cal.split(32)), "w8a8", ptq=["bn_fold"], progress=False).sim
            for d in ("cpu", device)}
    out["sim_build_s"] = time.perf_counter() - t
    a = {n: q.scale.detach().cpu() for n, q in sims["cpu"].quantizers().items()}
    b = {n: q.scale.detach().cpu() for n, q in sims[device].quantizers().items()}
    out["encodings_max_rel_diff"] = max(float(((a[n] - b[n]).abs() / a[n].abs().clamp_min(1e-12)).max()) for n in a)
    cpu_out, dev_out = _logits(sims["cpu"], ev, "cpu"), _logits(sims[device], ev, device)
    out["sim_device_vs_cpu"] = _fid(cpu_out, dev_out)
    out["sim_vs_fp32"] = _fid(ref, dev_out)
    if out["encodings_max_rel_diff"] > 1e-3 or out["sim_device_vs_cpu"]["sqnr_db"] < 30:
        fails.append(f"the {device} sim differs from the CPU sim: {out['encodings_max_rel_diff']:.2e} relative scale "
                     f"difference, {out['sim_device_vs_cpu']['sqnr_db']:.1f} dB")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        edgequant.export_onnx(sims[device], path)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        x = ev[:32]
        got = torch.from_numpy(sess.run(None, {name: x.numpy()})[0])
    out["ort_vs_device_sim"] = _fid(dev_out[:32], got)
    with torch.no_grad(), sims[device].integer_exact():
        exact = sims[device](x.to(device)).float().cpu()
    out["ort_identical_to_integer_exact"] = float((exact == got).float().mean())
    if out["ort_identical_to_integer_exact"] < 0.999:
        fails.append(f"ONNX Runtime is identical to the {device} sim's integer_exact on only "
                     f"{out['ort_identical_to_integer_exact']:.4f} of the outputs")
    return fails


def check_adaround(model, cal, ev, ref, device, iters: int, out: dict):
    from bench_qat import _config

    import edgequant

    _reset_peak(device)
    _sync(device)
    t = time.perf_counter()
    sim = edgequant.quantize(copy.deepcopy(model).to(device), list(cal.split(32)), _config(4, 8), ptq=["bn_fold", "adaround"],
                             adaround_iterations=iters, progress=False).sim
    _sync(device)
    out["adaround"] = {"iterations_per_layer": iters, "seconds": time.perf_counter() - t, "peak_mb": _peak_mb(device),
                       **_fid(ref, _logits(sim, ev, device))}
    return sim


def _step_time(net, x, target, device, steps: int) -> float:
    """Median seconds of a distillation training step (Adam, lr tiny) of ``net`` at ``x``."""
    from edgequant.qat import distillation_loss

    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], 1e-9)
    net.train()
    times = []
    for _ in range(steps + 1):
        _sync(device)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        distillation_loss(net(x), target).backward()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - t)
    net.eval()
    return sorted(times[1:])[len(times[1:]) // 2]


def check_qat(model, sim, ev, ref, device, args, out: dict) -> list[str]:
    from bench_qat import _training_batch

    from edgequant.qat import finetune, prepare_qat

    fails = []
    curve = [dict(step=0, **_fid(ref, _logits(sim, ev, device)))]
    prepare_qat(sim)
    teacher = copy.deepcopy(model).to(device).eval()
    x = _training_batch(argparse.Namespace(batch=args.batch, mosaic=False), 0).to(device)
    with torch.no_grad():
        target = teacher(x)
    _reset_peak(device)
    fp32 = copy.deepcopy(model).to(device)
    t_fp32 = _step_time(fp32, x, target, device, args.timing_steps)
    mem_fp32 = _peak_mb(device)
    del fp32
    _reset_peak(device)
    student = copy.deepcopy(sim)
    t_sim = _step_time(student, x, target, device, args.timing_steps)
    mem_sim = _peak_mb(device)
    del student
    train = [_training_batch(argparse.Namespace(batch=args.batch, mosaic=False), i) for i in range(args.steps)]

    def evaluate(s):
        curve.append(_fid(ref, _logits(s, ev, device)))
        return curve[-1]["top1"]

    rep = finetune(sim, train, steps=args.steps, lr=args.lr, teacher=teacher, eval_fn=evaluate, eval_every=args.eval_every,
                   progress=not args.quiet)
    for c, (step, _) in zip(curve[1:], rep.evals):
        c["step"], c["seconds"] = step, rep.seconds[step - 1]
    out["qat"] = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "steps_per_s": args.steps / rep.seconds[-1],
                  "step_s_fp32": t_fp32, "step_s_sim": t_sim, "step_ratio": t_sim / t_fp32,
                  "peak_mb_fp32": mem_fp32, "peak_mb_sim": mem_sim,
                  "memory_ratio": mem_sim / mem_fp32 if device.type == "cuda" else None, "curve": curve}
    if not all(torch.isfinite(torch.tensor(rep.loss))):
        fails.append("QAT loss not finite")
    return fails


def markdown(out: dict) -> str:
    lines = [f"# CUDA check ({out['device_name']}, torch {out['torch']})", "",
             f"- W8A8 sim on {out['device']} vs CPU: encodings max relative difference {out['encodings_max_rel_diff']:.2e}, "
             f"outputs {out['sim_device_vs_cpu']['sqnr_db']:.1f} dB, top-1 agreement {out['sim_device_vs_cpu']['top1']:.3f}; "
             f"vs FP32 {out['sim_vs_fp32']['sqnr_db']:.2f} dB; ONNX Runtime vs the {out['device']} sim "
             f"{out['ort_vs_device_sim']['sqnr_db']:.1f} dB, identical to its integer_exact on "
             f"{out['ort_identical_to_integer_exact']:.4f} of the outputs"]
    def mb(v):
        return f"{v:.0f} MB" if v == v else "n/a"

    a = out["adaround"]
    lines.append(f"- W4A8 AdaRound {a['iterations_per_layer']} it/layer: {a['seconds']:.1f} s, peak {mb(a['peak_mb'])}; held-out "
                 f"top-1 {a['top1']:.3f}, {a['sqnr_db']:.2f} dB, KL {a['kl']:.3f}")
    q = out["qat"]
    mem = f"{q['memory_ratio']:.2f}x" if q["memory_ratio"] else "n/a"
    lines += [f"- QAT (W4A8 LSQ+, distillation, batch {q['batch']}, lr {q['lr']}): {q['steps_per_s']:.2f} steps/s; one step "
              f"{q['step_s_sim'] * 1e3:.1f} ms vs FP32 {q['step_s_fp32'] * 1e3:.1f} ms ({q['step_ratio']:.2f}x), peak CUDA memory "
              f"{mb(q['peak_mb_sim'])} vs {mb(q['peak_mb_fp32'])} ({mem})", "",
              "| step | seconds | top-1 agreement | SQNR dB | KL |", "|---|---|---|---|---|"]
    lines += [f"| {c['step']} | {c.get('seconds', 0):.1f} | {c['top1']:.3f} | {c['sqnr_db']:.2f} | {c['kl']:.3f} |" for c in q["curve"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the code paths, not the numbers")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--adaround", type=int, default=200, help="AdaRound iterations per layer")
    ap.add_argument("--timing-steps", type=int, default=10)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT") or "reports/gpu")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; skipped (run with --device cpu --smoke to rehearse on the CPU)")
        return 0
    if args.smoke:
        args.steps, args.batch, args.eval_every, args.adaround, args.timing_steps = 2, 4, 1, 2, 1
    device = torch.device(args.device)
    torch.manual_seed(0)
    from edgequant.data import calibration_crops, evaluation_crops
    from edgequant.models import mobilenet_v2_imagenet

    model = mobilenet_v2_imagenet().eval()
    cal = calibration_crops(8 if args.smoke else 128)
    ev = evaluation_crops(8 if args.smoke else 256, seed=1)
    ref = _logits(model, ev, "cpu")
    out = {"device": str(device), "torch": torch.__version__, "smoke": args.smoke,
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"}
    fails = check_sim(model, cal, ev, ref, device, out)
    sim = check_adaround(model, cal, ev, ref, device, args.adaround, out)
    fails += check_qat(model, sim, ev, ref, device, args, out)
    out["failures"] = fails
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gpu_check.json").write_text(json.dumps(out, indent=1))
    (folder / "gpu_check.md").write_text(markdown(out))
    print(markdown(out))
    for f in fails:
        print("FAILED:", f)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
