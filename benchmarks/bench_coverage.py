"""Architecture coverage: torchvision's models through the six stages of deployment at W8A8.

Stages per model (random weights, BatchNorm folded first as an integer runtime folds it, one image):
capture (``QuantSim``), calibrate, sim forward, ``export_onnx``, ONNX Runtime runs the export, ORT's
top-1 equals the sim's (and the ORT-vs-sim logit SQNR), and the integer-exact sim is bit-identical to
ORT (where it is not, the fraction of identical outputs, and the same with elementwise ops exported and
simulated as lookup tables and LayerNorm / GroupNorm / softmax in float64: ``export_onnx(tables=True,
float64=True)``, ``sim.integer_exact(tables=True, float64=True)``). Each model runs in its own process with a time
limit; the table lists the first stage that failed
and its error, the ONNX op types that stayed in float (between DequantizeLinear and QuantizeLinear
rather than fused into ORT's integer kernels is not checked here: see ``bench_export.py``), and seconds.

Segmentation and detection models (``DENSE``) follow the classification ones.

``--source timm`` sweeps a sample of timm's image models instead (``TIMM_SAMPLE``: the smallest-named model of each
of timm's model modules plus the layer idioms ported from TensorFlow and JAX -- "same" padding, weight
standardization, normalizer-free nets -- at their configured input size; over 100 M parameters or 448 pixels skipped)
into ``benchmarks/results/coverage_timm.md`` (raw results ``.peers/coverage_timm.jsonl``). timm is a benchmark
dependency only (``pip install timm``); no weights are downloaded.

``--source hf`` sweeps Hugging Face ``transformers`` architectures built from their configs with random weights
(``HF_TEXT``: encoders, decoders and encoder-decoders at 2 layers, hidden size 128, as sentence encoders -- masked mean
of the last hidden state -- on two token sequences, one padded; ``HF_VISION``: image classifiers at their default
configs) into ``benchmarks/results/coverage_hf.md``, all at W8A8 (every activation quantized, the embedding too: the
preset ``w8a8_transformer``'s float residual stream is a choice for accuracy, measured in ``bench_transformers.py``).
For the text models "ORT top-1 = sim" is "the ORT embeddings' cosine to the sim's >= 0.999" (there is no class).

Usage: python benchmarks/bench_coverage.py [--source torchvision|timm|hf] [--models a,b,...] [--size 224]
       [--timeout 600] [--out benchmarks/results/coverage.md]
"""
from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = ("capture", "float = model", "calibrate", "sim forward", "export", "ORT runs", "ORT top-1 = sim", "integer-exact = ORT")
#: models whose input size is fixed by their architecture
SIZES = {"inception_v3": 299, "vit_h_14": 224}
#: segmentation and detection models that fit on the machine (their backbones without weights too)
DENSE = ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "fcn_resnet50", "deeplabv3_resnet50",
         "ssdlite320_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn", "retinanet_resnet50_fpn")
#: detectors (quantized region by region: edgequant.RegionSim) and the score threshold that leaves their random-weight
#: heads some boxes to compare
DETECTION = {"ssdlite320_mobilenet_v3_large": {}, "fasterrcnn_mobilenet_v3_large_320_fpn": {"box_score_thresh": 0.0},
             "retinanet_resnet50_fpn": {"score_thresh": 0.0}}
#: timm models beyond one per module: TensorFlow / JAX ports ("same" padding, StdConv, normalizer-free) and common idioms
TIMM_EXTRA = ("tf_efficientnet_b0", "efficientnet_b0", "tf_mobilenetv3_large_100", "mobilenetv3_large_100",
              "resnetv2_50x1_bit", "nf_resnet26", "eca_nfnet_l0", "regnety_008", "resnet50d", "seresnext26d_32x4d",
              "ecaresnet26t", "mobilevitv2_050", "vit_tiny_patch16_224", "efficientnetv2_rw_t", "tf_efficientnetv2_b0",
              "fbnetc_100", "spnasnet_100", "convnextv2_atto", "poolformer_s12", "coatnet_nano_rw_224",
              "ese_vovnet19b_dw", "cspresnet50", "regnetz_b16", "lambda_resnet26t", "botnet26t_256",
              "ghostnetv2_100", "hrnet_w18_small", "mobileone_s0", "repvgg_a0", "dla46_c")
TIMM_MAX_PARAMS_M, TIMM_MAX_SIZE = 100, 448
#: Hugging Face text architectures (config kind -> its extra config) at 2 layers, hidden 128, 4 heads, vocabulary 1000
HF_TEXT = {"bert": {}, "distilbert": {}, "roberta": {}, "xlm-roberta": {}, "albert": {"embedding_size": 64},
           "electra": {}, "mpnet": {}, "deberta-v2": {"relative_attention": True, "position_buckets": 32,
                                                     "pos_att_type": ["p2c", "c2p"]},
           "mobilebert": {"embedding_size": 64, "intra_bottleneck_size": 64, "true_hidden_size": 64},
           "convbert": {}, "squeezebert": {"embedding_size": 128}, "layoutlm": {}, "nystromformer": {},
           "big_bird": {}, "rembert": {}, "ernie": {}, "megatron-bert": {},
           "t5": {"d_model": 128, "d_ff": 256, "num_layers": 2, "num_heads": 4, "d_kv": 32},
           "gpt2": {}, "llama": {"num_key_value_heads": 2, "head_dim": 32},
           "qwen2": {"num_key_value_heads": 2, "head_dim": 32}, "bart": {}}
#: Hugging Face image classifiers at their default configs
HF_VISION = ("vit", "deit", "beit", "swin", "convnext", "mobilevit", "segformer", "dinov2", "levit", "resnet",
             "regnet", "efficientnet", "poolformer", "mobilenet_v2", "convnextv2", "swinv2", "cvt", "focalnet", "pvt_v2")
HF_SEQ = 32


def _sentence_encoder(model):
    """A transformers model as a sentence encoder: the masked mean of its last hidden state."""
    import torch

    class SentenceEncoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            h = self.m(input_ids=input_ids, attention_mask=attention_mask)[0]
            w = attention_mask.unsqueeze(-1).to(h.dtype)
            return (h * w).sum(1) / w.sum(1).clamp(min=1e-9)

    return SentenceEncoder(model).eval()


def _build_hf(name: str, out: dict):
    """(model, example inputs) of a Hugging Face architecture with random weights (``HF_TEXT`` or ``HF_VISION``)."""
    import os

    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    if name in HF_TEXT:
        small = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                     vocab_size=1000, max_position_embeddings=128)
        cfg = AutoConfig.for_model(name, **small, **HF_TEXT[name])
        if name == "t5":
            from transformers import T5EncoderModel

            model = T5EncoderModel(cfg)
        else:
            model = AutoModel.from_config(cfg, attn_implementation="eager")
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(5, cfg.vocab_size, (2, HF_SEQ), generator=g)
        mask = torch.ones_like(ids)
        mask[1, HF_SEQ // 2:] = 0
        out["parameters_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
        return _sentence_encoder(model.eval()), (ids * mask, mask)
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    cfg = AutoConfig.for_model(name)
    cls = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES[name]  # a name, or a tuple of them (DeiT, LeViT: the first)
    model = getattr(transformers, cls if isinstance(cls, str) else cls[0])(cfg).eval()
    out["parameters_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
    if out["parameters_m"] > TIMM_MAX_PARAMS_M:
        raise _Skip(f"{out['parameters_m']} M parameters")
    size = getattr(cfg, "image_size", 224)
    size = size if isinstance(size, int) else size[0]

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, pixel_values):
            return self.m(pixel_values=pixel_values).logits

    return Logits(model).eval(), torch.randn(1, getattr(cfg, "num_channels", 3), size, size)


def timm_sample() -> list[str]:
    """The smallest-named model of each timm model module (names with tiny/small/nano/... first), then TIMM_EXTRA."""
    import re

    import timm

    small = re.compile(r"(pico|nano|tiny|xxs|xs|small|_s$|_s_|b0|18|mini|_t$|lite0|050|0_5|_1_0|light|micro|atto|femto)")
    names = []
    for module in timm.list_modules():
        found = timm.list_models(module=module)
        if found:
            names.append(sorted([n for n in found if small.search(n)] or found, key=lambda n: (len(n), n))[0])
    return names + [n for n in TIMM_EXTRA if n not in names]


#: ops that ONNX Runtime runs on integers when fed by DequantizeLinear and followed by QuantizeLinear
INTEGER_OPS = {"Conv", "Gemm", "MatMul", "Add", "Mul", "AveragePool", "GlobalAveragePool", "MaxPool", "Concat",
               "Reshape", "Flatten", "Transpose", "Relu", "Clip", "Squeeze", "Unsqueeze", "Resize", "Split",
               "Slice", "Gather", "Identity", "Sigmoid", "LeakyRelu"}


def _build(name: str, size: int, source: str, out: dict):
    """(model, example input) of ``name``; raises ``_Skip`` for a timm model over the sweep's size limits."""
    import torch
    import torchvision

    if source == "hf":
        return _build_hf(name, out)
    if source == "timm":
        import timm

        model = timm.create_model(name, pretrained=False).eval()
        out["parameters_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
        c, h, w = model.pretrained_cfg.get("input_size", (3, size, size))
        if out["parameters_m"] > TIMM_MAX_PARAMS_M or max(h, w) > TIMM_MAX_SIZE:
            raise _Skip(f"{out['parameters_m']} M parameters, {h}x{w} input")
        return model, torch.randn(1, c, h, w)
    dense = name in DENSE
    extra = {"weights_backbone": None} if dense else {}
    extra.update(DETECTION.get(name, {}))
    model = torchvision.models.get_model(name, weights=None, **extra).eval()
    out["parameters_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
    size = SIZES.get(name, size)
    return model, torch.randn(1, 3, size, size)


class _Skip(Exception):
    pass


def run_one(name: str, size: int, out: dict, source: str = "torchvision") -> None:
    import numpy as np
    import onnx
    import torch

    from edgequant import QuantSim, export_onnx
    from edgequant.metrics import sqnr_db

    torch.set_num_threads(int(os.environ.get("EDGEQUANT_BENCH_THREADS", "2")))
    torch.manual_seed(0)
    t0 = time.perf_counter()
    stage = "capture"
    try:
        model, x = _build(name, size, source, out)
        text = isinstance(x, tuple)  # (token ids, attention mask): a sentence encoder
        sim = QuantSim(model, x, "w8a8")  # as built: the sim folds batch norms itself (fold_bn=True)
        out["capture_mode"] = sim.capture_mode
        out["bn_folded"], out["bn_left"] = len(sim.bn_folding.folded), len(sim.bn_folding.skipped)
        stage = "float = model"  # the sim with its quantizers off computes what the user's model computes
        with torch.no_grad(), sim.quantization_disabled():
            yf = _first(_call(sim, x))
        with torch.no_grad():
            y0 = _first(_call(model, x))
        out["float_sqnr_db"] = float(sqnr_db(y0.float(), yf.float()))
        if not out["float_sqnr_db"] > 40:
            # a random-weight net can be chaotic in float32 itself (the BN folding's rounding is then amplified): the
            # sim passes when it is as close to the model as the model's float32 run is to its float64 run
            with torch.no_grad():
                y64 = _first(_call(copy.deepcopy(model).double(), tuple(t.double() if t.is_floating_point() else t
                                                                          for t in x) if isinstance(x, tuple) else x.double()))
            out["model_fp32_vs_fp64_db"] = float(sqnr_db(y64.float(), y0.float()))
            if not out["float_sqnr_db"] > min(40, out["model_fp32_vs_fp64_db"] - 3):
                raise AssertionError(f"the sim with quantizers off is {out['float_sqnr_db']:.1f} dB from the model "
                                     f"(the model in float32 vs float64: {out['model_fp32_vs_fp64_db']:.1f} dB)")
        stage = "calibrate"
        sim.calibrate([x], progress=False)
        stage = "sim forward"
        with torch.no_grad():
            y = _first(_call(sim, x))
        stage = "export"
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.onnx"
            export_onnx(sim, path)
            ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
            out["float_ops"] = sorted(set(ops) - INTEGER_OPS - {"QuantizeLinear", "DequantizeLinear", "Constant"})
            stage = "ORT runs"
            o = _ort_output(path, x)
        stage = "integer-exact = ORT"  # computed first: it tells a top-1 flip of near-tied logits from an export error
        with torch.no_grad(), sim.integer_exact():
            ye = _first(_call(sim, x))
        ye = ye.detach().float().numpy().reshape(o.shape)
        out["identical_fraction"] = float((ye == o).mean())
        exact = f"; integer-exact sim vs ORT: {out['identical_fraction']:.4f} identical"
        stage = "ORT top-1 = sim"
        yy = y.detach().float().numpy().reshape(o.shape)
        out["ort_sqnr_db"] = float(sqnr_db(torch.from_numpy(yy), torch.from_numpy(o)))
        if text:  # sentence embeddings: no class; the direction of each embedding
            out["cosine"] = float(torch.nn.functional.cosine_similarity(torch.from_numpy(yy), torch.from_numpy(o)).min())
            if out["cosine"] < 0.999:
                raise AssertionError(f"ORT vs sim cosine {out['cosine']:.5f} (SQNR {out['ort_sqnr_db']:.1f} dB){exact}")
        elif yy.ndim == 4:  # segmentation: the class of every pixel
            out["pixel_agreement"] = float((yy.argmax(1) == o.argmax(1)).mean())
            if out["pixel_agreement"] < 0.99:
                raise AssertionError(f"{out['pixel_agreement']:.4f} of the pixels get the same class (SQNR {out['ort_sqnr_db']:.1f} dB){exact}")
        elif yy.ndim >= 2 and not np.array_equal(yy.reshape(len(yy), -1).argmax(1), o.reshape(len(o), -1).argmax(1)):
            raise AssertionError(f"top-1 differs (SQNR {out['ort_sqnr_db']:.1f} dB){exact}")
        stage = "integer-exact = ORT"
        if not np.array_equal(ye, o):
            out["identical_exact"] = _with_exact_options(sim, x, o.shape)
            raise AssertionError(f"{out['identical_fraction']:.4f} of the outputs identical "
                                 f"({out['identical_exact']:.4f} with tables=True, float64=True)")
        stage = "done"
    except _Skip as e:
        out["error"], stage = str(e), "skipped"
        out["seconds"] = round(time.perf_counter() - t0, 1)
        out["stage"] = stage
        return
    except Exception as e:  # noqa: BLE001 -- every failure is a row of the table
        out["error"] = f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]
        out["trace"] = traceback.format_exc()[-1500:]
    out["stage"] = stage
    out["seconds"] = round(time.perf_counter() - t0, 1)


def _call(f, x):
    return f(*x) if isinstance(x, tuple) else f(x)


def _ort_output(path, x):
    """The first output of the ONNX model at ``path`` on input ``x`` (a tensor or a tuple of them) in ONNX Runtime
    (2 threads)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    xs = x if isinstance(x, tuple) else (x,)
    return sess.run(None, {i.name: v.numpy() for i, v in zip(sess.get_inputs(), xs)})[0]


def _with_exact_options(sim, x, shape) -> float:
    """The identical fraction of ``export_onnx(tables=True, float64=True)`` in ORT against
    ``sim.integer_exact(tables=True, float64=True)``: elementwise ops (GELU, hard-swish, sigmoid, ...) as lookup tables,
    LayerNorm / GroupNorm / softmax in float64 rounded to float32 once, on both sides."""
    import torch

    from edgequant import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.onnx"
        export_onnx(sim, path, tables=True, float64=True)
        o = _ort_output(path, x)
    with torch.no_grad(), sim.integer_exact(tables=True, float64=True):
        ye = _first(_call(sim, x)).detach().float().numpy().reshape(shape)
    return float((ye == o).mean())


def _first(y):
    """The first tensor of a model's output (a tensor, a dict of them, or a tuple)."""
    while not hasattr(y, "shape"):
        y = next(iter(y.values())) if isinstance(y, dict) else y[0]
    return y


def _child(name, size, source, q):
    out = {"model": name}
    (run_regions if name in DETECTION else run_one)(name, size, out, source)
    q.put(out)


def _detections_equal(a: list, b: list) -> bool:
    """The same detections per image, bit for bit."""
    import torch

    return len(a) == len(b) and all(set(x) == set(y) and all(x[k].shape == y[k].shape and torch.equal(x[k], y[k])
                                                             for k in x) for x, y in zip(a, b))


def _detections_close(a: list, b: list, atol: float = 1e-3) -> bool:
    """As many detections per image, with the same scores within ``atol`` once sorted (the order of near-tied
    boxes may differ: folded batch norms round differently in float)."""
    import torch

    return len(a) == len(b) and all(len(x["scores"]) == len(y["scores"]) and torch.allclose(
        x["scores"].sort().values, y["scores"].sort().values, rtol=0, atol=atol) for x, y in zip(a, b))


def run_regions(name: str, size: int, out: dict, source: str = "torchvision") -> None:
    """A detector through the same stages, as an ``edgequant.RegionSim`` (backbone and heads in graph mode, the
    pre/post-processing in float): the export is one ONNX file per region, "ORT runs" runs the detector with its
    regions in ONNX Runtime, its top detection's label is compared with the sim's, and its boxes, scores and labels
    with the integer-exact sim's."""
    import torch

    from edgequant import RegionSim, export_onnx
    from edgequant.export.regions import deployed

    torch.set_num_threads(int(os.environ.get("EDGEQUANT_BENCH_THREADS", "2")))
    torch.manual_seed(0)
    t0, stage = time.perf_counter(), "capture"
    try:
        model, x = _build(name, size, source, out)
        x = ([x[0].uniform_(0, 1)],)  # a list of images in [0, 1]
        sim = RegionSim(model, x)
        out["capture_mode"] = "regions: " + ", ".join(sorted(sim.regions))
        stage = "float = model"
        with torch.no_grad(), sim.quantization_disabled():
            if not _detections_close(sim(*x), model(*x)):
                raise AssertionError("the sim with quantizers off finds other detections than the model")
        stage = "calibrate"
        sim.calibrate([x], progress=False)
        stage = "sim forward"
        with torch.no_grad():
            y = sim(*x)
        stage = "export"
        with tempfile.TemporaryDirectory() as tmp:
            paths = export_onnx(sim, tmp)
            ops = Counter(n.op_type for p in paths.values() for n in onnx_nodes(p["onnx"]))
            out["float_ops"] = sorted(set(ops) - INTEGER_OPS - {"QuantizeLinear", "DequantizeLinear", "Constant"})
            stage = "ORT runs"
            with torch.no_grad():
                o = deployed(sim, paths)(*x)
        with torch.no_grad(), sim.integer_exact():
            ye = sim(*x)
        out["boxes"] = int(len(o[0]["boxes"]))
        stage = "ORT top-1 = sim"
        if out["boxes"] == 0 or int(o[0]["labels"][0]) != int(y[0]["labels"][0]):
            raise AssertionError(f"top detection's label differs or no boxes ({out['boxes']})")
        stage = "integer-exact = ORT"
        if not _detections_equal(o, ye):
            raise AssertionError("the detections of ORT and the integer-exact sim differ")
        out["identical_fraction"] = 1.0
        stage = "done"
    except Exception as e:  # noqa: BLE001 -- every failure is a row of the table
        out["error"] = f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]
        out["trace"] = traceback.format_exc()[-1500:]
    out["stage"] = stage
    out["seconds"] = round(time.perf_counter() - t0, 1)


def onnx_nodes(path):
    import onnx

    return onnx.load(str(path)).graph.node


def main():
    import torchvision

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", choices=("torchvision", "timm", "hf"), default="torchvision")
    ap.add_argument("--models", default=None, help="comma-separated (default: every classification model, or timm's sample)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument("--out", default=None, help="default benchmarks/results/coverage.md (coverage_timm.md for timm)")
    ap.add_argument("--results", default=None, help="one JSON line per model, resumable (default .peers/coverage[_timm].jsonl)")
    ap.add_argument("--table-only", action="store_true", help="table the results already in --results, run nothing")
    args = ap.parse_args()
    suffix = {"timm": "_timm", "hf": "_hf"}.get(args.source, "")
    args.out = args.out or str(REPO / "benchmarks" / "results" / f"coverage{suffix}.md")
    args.results = args.results or str(REPO / ".peers" / f"coverage{suffix}.jsonl")
    if args.models:
        names = args.models.split(",")
    elif args.source == "timm":
        names = timm_sample()
    elif args.source == "hf":
        names = list(HF_TEXT) + list(HF_VISION)
    else:
        names = torchvision.models.list_models(module=torchvision.models) + list(DENSE)
    done = {}
    res_path = Path(args.results)
    res_path.parent.mkdir(parents=True, exist_ok=True)
    if res_path.exists():
        for line in res_path.read_text().splitlines():
            r = json.loads(line)
            done[r["model"]] = r
    ctx = mp.get_context("spawn")
    for name in names:
        if args.table_only or (name in done and not args.models):
            continue
        q = ctx.Queue()
        p = ctx.Process(target=_child, args=(name, args.size, args.source, q))
        p.start()
        p.join(args.timeout)
        if p.is_alive():
            p.kill()
            r = {"model": name, "stage": "timeout", "error": f"over {args.timeout} s"}
        else:
            r = q.get() if not q.empty() else {"model": name, "stage": "crashed", "error": f"exit code {p.exitcode}"}
        r.pop("trace", None) if r.get("stage") == "done" else None
        done[name] = r
        with open(res_path, "a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"{name:28s} {r['stage']:22s} {r.get('seconds', '')} {r.get('error', '')[:150]}", flush=True)
    skipped = [done[n] for n in names if n in done and done[n]["stage"] == "skipped"]
    rows = [done[n] for n in names if n in done and done[n]["stage"] != "skipped"]
    passed = {s: sum(1 for r in rows if r["stage"] == "done" or (r["stage"] in STAGES and STAGES.index(r["stage"]) > i))
              for i, s in enumerate(STAGES)}  # a timeout or crash passed no stage it is counted for
    if args.source == "hf":
        import transformers

        head = (f"Hugging Face transformers {transformers.__version__} architectures (random weights, from their configs): "
                f"{len(rows)} models, {len(HF_TEXT)} text models (2 layers, hidden 128; "
                f"two sequences of {HF_SEQ} tokens, one half padding; sentence embedding = masked mean; 'ORT top-1 = sim' "
                f"is ORT-vs-sim cosine >= 0.999) and {len(HF_VISION)} image classifiers at their default configs (W8A8, one image); "
                f"skipped (over {TIMM_MAX_PARAMS_M} M parameters): {', '.join(r['model'] for r in skipped) or 'none'}.")
    elif args.source == "timm":
        import timm

        head = (f"timm {timm.__version__} models at W8A8 (random weights, BN folded, one image at the model's configured "
                f"size): {len(rows)} models, the smallest-named model of each timm model module and {len(TIMM_EXTRA)} "
                f"ported-layer idioms (`TIMM_EXTRA`); skipped (over {TIMM_MAX_PARAMS_M} M parameters or "
                f"{TIMM_MAX_SIZE} pixels): {', '.join(r['model'] for r in skipped) or 'none'}.")
    else:
        head = (f"torchvision {torchvision.__version__} models at W8A8 (random weights, BN folded, one "
                f"{args.size}x{args.size} image; inception_v3 at 299): {len(rows)} models, the "
                f"{len(torchvision.models.list_models(module=torchvision.models))} classification models and "
                f"{len(DENSE)} segmentation/detection models (segmentation: 'top-1' is the class of >= 99% of the pixels).")
    lines = [head, "", "| stage | models through it |", "|---|---|"]
    lines += [f"| {s} | {passed[s]} / {len(rows)} |" for s in STAGES]
    exact = sum(1 for r in rows if r["stage"] == "done" or r.get("identical_exact") == 1.0)
    lines += [f"| integer-exact = ORT with `export_onnx(tables=True, float64=True)` | {exact} / {len(rows)} |"]
    lines += ["", "| model | M params | capture | through | ORT vs sim dB | float ops in the export | s | error |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r.get('parameters_m', '')} | {r.get('capture_mode', '')} | {r['stage']} | "
                     f"{'' if r.get('ort_sqnr_db') is None else format(r['ort_sqnr_db'], '.1f')} | "
                     f"{', '.join(r.get('float_ops', []))} | {r.get('seconds', '')} | {r.get('error', '')[:160].replace('|', '/')} |")
    text = "\n".join(lines)
    print("\n" + text)
    from edgequant.io.encodings import atomic_write_text

    atomic_write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
