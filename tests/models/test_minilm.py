"""Real all-MiniLM-L6-v2 on real sentences: graph capture, the transformer preset, ONNX Runtime agreement."""
import onnxruntime as ort
import pytest
import torch

from edgequant import QuantSim, export_onnx
from edgequant.data import sentence_split
from edgequant.models import minilm_l6_v2, tokenize

pytestmark = pytest.mark.slow


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a, b).mean().item()


def test_sentence_split_is_disjoint_and_seeded():
    cal, ev = sentence_split(64, 64, seed=0)
    assert not set(cal) & set(ev) and len(set(cal)) == 64
    assert sentence_split(64, 64, seed=0) == (cal, ev) and sentence_split(64, 64, seed=1)[0] != cal


def test_minilm_w8a8_transformer_keeps_embeddings_and_runs_in_ort(tmp_path):
    enc, tok = minilm_l6_v2()
    cal_s, ev_s = sentence_split(48, 32, seed=0)
    ids, mask = tokenize(tok, cal_s, 32)
    cal = [(ids[i:i + 16], mask[i:i + 16]) for i in range(0, 48, 16)]
    ev = tokenize(tok, ev_s, 32)
    sim = QuantSim(enc, cal[0], "w8a8_transformer")
    assert sim.capture_mode == "graph"
    assert {u.split(" ")[0] for u in sim.unsupported} <= {"linalg_vector_norm.default", "clamp_min.default"}  # F.normalize
    qs = sim.quantizers()
    assert "bert.embeddings.word_embeddings.weight" in qs  # embeddings quantized (per row)
    assert sum(1 for n in qs if n.endswith("softmax")) == 6  # the probabilities, read by probs @ v
    # quantized where a product reads them: the contexts (not the scores, which softmax reads), no residual sum
    assert sum(1 for n in qs if "matmul" in n) == 6 and not any(n.startswith("add") for n in qs)
    sim.calibrate(cal, progress=False)
    with torch.no_grad():
        ref, got = enc(*ev), sim(*ev)
    assert _cos(ref, got) >= 0.99
    plain = QuantSim(enc, cal[0], "w8a8")  # the CNN preset clips the residual stream's outliers
    plain.calibrate(cal, progress=False)
    with torch.no_grad():
        assert _cos(ref, plain(*ev)) < 0.9
    path = export_onnx(sim, tmp_path / "minilm.onnx", dynamic_batch=False, example_inputs=ev)["onnx"]
    out = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": ev[0].numpy(), "attention_mask": ev[1].numpy()})[0]
    assert _cos(ref, torch.from_numpy(out)) >= 0.99
