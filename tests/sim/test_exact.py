"""The sim's integer-exact mode against ONNX Runtime's integer kernels and the integer engine."""
import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgequant import NotCalibratedError, QuantSim, export_onnx
from edgequant.core import requant as rq
from edgequant.export.integer import IntegerEngine
from edgequant.ptq import cross_layer_equalization


def _sim(model, x, cfg):
    sim = QuantSim(model, x[:1], cfg)
    sim.calibrate([x[i:i + 64] for i in range(0, 256, 64)], progress=False)
    return sim


@pytest.mark.parametrize("cfg,cle", [("w8a8", False), ("w7a8", False), ("w8a8_per_tensor", False), ("w8a8_per_tensor", True)])
def test_integer_exact_sim_is_bit_exact_with_onnx_runtime_and_the_engine(folded, tmp_path, cfg, cle):
    model, x = folded
    if cle:
        model, _ = cross_layer_equalization(model, fold=False)
    sim = _sim(model, x, cfg)
    xe = x[1000:1400]
    info = export_onnx(sim, tmp_path / "m.onnx")
    # 7-bit weights go in int8 (ORT's u8s8 kernels cannot saturate on them), 8-bit ones in uint8
    assert info["weight_dtype"] == ("int8" if cfg == "w7a8" else "uint8")
    path = info["onnx"]
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    ort_out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: xe.numpy()})[0])
    with sim.integer_exact("float32"):
        exact32 = sim(xe)
    with sim.integer_exact("fixed_point"):
        exact_fp = sim(xe)
    assert torch.equal(exact32, ort_out)  # every logit, bit for bit
    assert torch.equal(exact32, IntegerEngine(sim, requant="float32")(xe))
    assert torch.equal(exact_fp, IntegerEngine(sim, requant="fixed_point")(xe))
    # outside the context the sim is the plain float sim again, within a step of the exact one
    with torch.no_grad():
        plain = sim(xe)
    step = float(sim.quantizers()["fc"].scale)
    assert ((plain - exact32).abs() / step <= 1.001).double().mean() >= 0.99
    assert all(q._exact is None for q in sim.quantizers().values())


def test_integer_exact_needs_a_calibrated_graph_sim_and_a_known_mode(folded):
    model, x = folded
    sim = QuantSim(model, x[:1], "w8a8")
    with pytest.raises(NotCalibratedError), sim.integer_exact():
        pass
    with pytest.raises(ValueError, match="requant must be one of"):
        sim.integer_exact("float16")


def test_float32_add_depends_on_the_stored_zero_points():
    """ORT computes the add with the zero points as stored (uint8, +128 for a signed grid); the
    offsets must be passed or near-ties round differently. Grids of MobileNetV2's features.6.add,
    every pair of int8 inputs."""
    s_a, s_b, s_y = float.fromhex("0x1.97abf8p-6"), float.fromhex("0x1.d98e44p-7"), float.fromhex("0x1.e7c888p-6")
    qa, qb = torch.meshgrid(torch.arange(-128, 128), torch.arange(-128, 128), indexing="ij")
    qa, qb = qa.reshape(-1), qb.reshape(-1)
    args = (qa, s_a, 3, qb, s_b, 4, s_y, 3, -128, 127, "float32")
    shifted = rq.add(*args, offsets=(128, 128, 128))
    plain = rq.add(*args)
    exact = torch.round(((qa - 3) * s_a + (qb - 4) * s_b) / s_y + 3).clamp(-128, 127).long()
    assert (shifted - exact).abs().max() <= 1 and (plain - exact).abs().max() <= 1
    assert 0 < int((shifted != plain).sum()) < 20  # the representation moves float rounding at a few near-ties
    fp = rq.add(*args[:-1], "fixed_point")  # fixed point and float32 agree except near ties
    assert (fp != shifted).double().mean() < 1e-2


def test_requantize_float32_is_float32_arithmetic():
    acc = torch.tensor([[1000, -2047, 123457]])
    got = rq.requantize(acc, 0.02, torch.tensor([0.003]), 0.05, 10, -128, 127, "float32")
    m = np.float32(np.float32(0.02) * np.float32(0.003)) / np.float32(0.05)
    ref = np.clip(np.rint(acc.numpy().astype(np.float32) * np.float32(m)) + 10, -128, 127)
    assert got.tolist() == ref.astype(np.int64).tolist()
