"""The one data path (edgequant.batches) and the error family."""
import pytest
import torch

import edgequant
from edgequant import errors
from edgequant.batches import check_finite, iterate, model_input, run_batch, to_device


def test_iterate_checks_limits_and_moves():
    data = [torch.ones(2, 3), (torch.zeros(2, 3), torch.tensor([1, 2])), {"x": torch.ones(1)}]
    got = list(iterate(data, num_batches=2, device="cpu", progress=False))
    assert [i for i, _ in got] == [0, 1] and torch.equal(model_input(got[1][1]), torch.zeros(2, 3))
    with pytest.raises(errors.DataError, match="no batches"):
        list(iterate([], progress=False))
    with pytest.raises(errors.DataError, match=r"batch 1\[0\] contains 1 NaN"):
        list(iterate([torch.ones(1), (torch.tensor([float("nan")]),)], progress=False))
    assert run_batch(lambda **kw: kw["x"] * 2, data[2]).item() == 2.0
    assert run_batch(lambda a: a + 1, data[1]).sum().item() == 6.0  # labels are not passed
    assert to_device({"a": (torch.ones(1),)}, "cpu")["a"][0].device.type == "cpu"
    check_finite({"a": [torch.ones(2)]}, "ok")


def test_every_error_is_an_edgequant_error():
    for name in ("NotCalibratedError", "DataError", "GraphCaptureError", "ExportError", "IntegerEngineError",
                 "RequantError", "PlanError"):
        cls = getattr(errors, name)
        assert issubclass(cls, errors.EdgequantError), name
    # one "not calibrated" type everywhere: the sim, the export, the engine, the PTQ passes
    assert edgequant.NotCalibratedError is errors.NotCalibratedError
    from edgequant.nn import NotCalibratedError as a
    from edgequant.export.integer import IntegerEngineError as b
    assert a is errors.NotCalibratedError and b is errors.IntegerEngineError


def test_save_encodings_before_calibration_is_not_calibrated(tmp_path):
    sim = edgequant.QuantSim(torch.nn.Sequential(torch.nn.Linear(3, 2)), torch.randn(1, 3))
    with pytest.raises(errors.NotCalibratedError, match="calibrate"):
        sim.save_encodings(tmp_path / "e.json")
