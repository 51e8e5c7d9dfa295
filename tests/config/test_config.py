import json
from dataclasses import replace

import pytest

from edgequant import Override, PerBlock, PerChannel, PerTensor, QuantConfig, QuantSpec
from edgequant.config import PRESETS


def test_presets_exist_and_roundtrip():
    for name in ("w8a8", "w4a8", "w8a16", "w4a16", "w8a8_per_tensor", "w4a8_per_tensor"):
        cfg = QuantConfig.preset(name)
        assert QuantConfig.from_json(cfg.to_json()) == cfg
        assert cfg.weight.symmetric and cfg.weight.signed
    assert isinstance(PRESETS["w8a8"].weight.granularity, PerChannel)
    assert isinstance(PRESETS["w8a8_per_tensor"].weight.granularity, PerTensor)
    assert PRESETS["w4a16"].weight.bits == 4 and PRESETS["w4a16"].activation.bits == 16
    with pytest.raises(ValueError, match="unknown preset"):
        QuantConfig.preset("w3a3")


def test_validation_errors_say_what_to_do():
    with pytest.raises(ValueError, match="2 to 16"):
        QuantSpec(bits=1)
    with pytest.raises(TypeError, match=r"use PerChannel\(\) instead"):
        QuantSpec(granularity=PerChannel)
    with pytest.raises(ValueError, match="range_method"):
        QuantSpec(range_method="magic")
    with pytest.raises(TypeError, match="bool"):
        QuantSpec(symmetric="True")
    with pytest.raises(ValueError, match="narrow_range needs a signed"):
        QuantSpec(signed=False, narrow_range=True)
    with pytest.raises(TypeError, match="instead of Linear"):
        import torch

        QuantConfig(module_types={torch.nn.Linear: Override(weight=None)})
    with pytest.raises(ValueError, match="schema_version"):
        QuantConfig.from_dict({"schema_version": 99})
    with pytest.raises(ValueError, match="unknown QuantSpec field"):
        QuantSpec.from_dict({"bitz": 8})


def test_overrides_precedence():
    w4 = QuantSpec(bits=4, symmetric=True, granularity=PerBlock(16))
    cfg = QuantConfig(module_types={"Linear": Override(weight=w4), "add": Override(activation=None)},
                      module_names={"head.*": Override(weight=None), "head.keep": Override(weight=QuantSpec(bits=6, symmetric=True))})
    assert cfg.spec_for("weight", "body.fc", ("Linear",)).bits == 4
    assert cfg.spec_for("weight", "body.fc", ("MyLinear", "Linear")).bits == 4  # subclasses match
    assert cfg.spec_for("weight", "body.conv", ("Conv2d",)).bits == 8
    assert cfg.spec_for("weight", "head.fc", ("Linear",)) is None
    assert cfg.spec_for("weight", "head.keep", ("Linear",)).bits == 6  # later pattern wins
    assert cfg.spec_for("activation", "layer1.add", ("add",)) is None
    back = QuantConfig.from_json(cfg.to_json())
    assert back == cfg
    assert json.loads(cfg.to_json())["schema_version"] == 2


def test_coerce():
    assert QuantConfig.coerce("w4a8") == PRESETS["w4a8"]
    assert QuantConfig.coerce(PRESETS["w8a8"].to_json()) == PRESETS["w8a8"]
    with pytest.raises(TypeError):
        QuantConfig.coerce(42)


def test_presets_are_handed_out_as_copies():
    """Editing a preset's overrides used to edit it for every later user of the preset."""
    cfg = QuantConfig.preset("w8a8")
    assert cfg == QuantConfig.preset("w8a8") and cfg is not QuantConfig.preset("w8a8")
    with pytest.raises(TypeError, match="immutable"):
        cfg.module_names["fc"] = Override(weight=None)
    with pytest.raises(TypeError, match="immutable"):
        QuantConfig.coerce("w4a8").module_types.update({"Linear": Override(weight=None)})
    assert QuantConfig.preset("w8a8").module_names == {} and QuantConfig.preset("w4a8").module_types == {}
    import copy
    import pickle
    assert pickle.loads(pickle.dumps(cfg)) == cfg and copy.deepcopy(cfg) == cfg


def test_override_activation_reads_the_old_output_key():
    cfg = QuantConfig(module_types={"add": Override(activation=None)})
    assert cfg.spec_for("activation", "x.add", ("add",)) is None
    old = {"schema_version": 1, "module_types": {"add": {"output": None}}}
    assert QuantConfig.from_dict(old).module_types["add"] == Override(activation=None)
    with pytest.raises(ValueError, match="role"):
        cfg.spec_for("output", "x.add", ("add",))


def test_model_inputs_take_an_asymmetric_min_max_grid_unless_told_otherwise():
    cfg = QuantConfig.preset("w8a8")
    assert cfg.activation.symmetric and cfg.activation.range_method == "mean_minmax"
    spec = cfg.input_spec("x")
    assert spec.range_method == "minmax" and not spec.symmetric and spec.bits == 8
    assert replace(cfg, input_range_method=None).input_spec("x") == cfg.activation
    named = QuantSpec(bits=8, symmetric=True, range_method="percentile")
    assert replace(cfg, module_names={"x": Override(activation=named)}).input_spec("x") == named
    assert replace(cfg, quantize_inputs=False).input_spec("x") is None
    with pytest.raises(ValueError, match="input_range_method"):
        replace(cfg, input_range_method="magic")
    # a config written before the field existed keeps its inputs on the activation spec (a saved sim's grids)
    old = json.loads(cfg.to_json())
    old["schema_version"] = 1
    del old["input_range_method"]
    assert QuantConfig.from_dict(old).input_spec("x") == cfg.activation
    assert QuantConfig.from_json(cfg.to_json()) == cfg
