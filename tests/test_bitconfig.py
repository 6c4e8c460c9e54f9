"""BitConfig: presets, JSON, validation against models, HAWQ's preset format."""

import json
from pathlib import Path

import pytest

from hawqc import models
from hawqc.bitconfig import SCHEMA_VERSION, BitConfig, LayerBits

RESNET18_LAYERS = models.quantizable_layers(models.get("resnet18"))
RESNET50_LAYERS = models.quantizable_layers(models.get("resnet50"))


def hawq_resnet_preset(units: list[int], convs_per_unit: int, bits: int) -> dict[str, object]:
    """A preset in HAWQ's bit_config.py naming (as its uniform presets are written)."""
    preset: dict[str, object] = {"quant_input": 8, "quant_init_block_convbn": 8, "quant_act_int32": 16}
    for stage, n_units in enumerate(units, start=1):
        for unit in range(1, n_units + 1):
            prefix = f"stage{stage}.unit{unit}."
            preset[prefix + "quant_act"] = bits
            for k in range(1, convs_per_unit + 1):
                if k > 1:
                    preset[prefix + f"quant_act{k - 1}"] = bits
                preset[prefix + f"quant_convbn{k}"] = bits
            if unit == 1 and (stage > 1 or convs_per_unit == 3):
                preset[prefix + "quant_identity_convbn"] = bits
            preset[prefix + "quant_act_int32"] = 16
    preset.update({"quant_act_output": 8, "quant_output": 8})
    return preset


def test_uniform_presets_keep_first_and_last_layer_at_8_bits() -> None:
    bits = BitConfig.preset("uniform4").resolve(RESNET18_LAYERS)
    assert list(bits) == RESNET18_LAYERS
    assert bits["conv1"] == bits["fc"] == LayerBits(8, 8)
    assert {bits[n] for n in RESNET18_LAYERS[1:-1]} == {LayerBits(4, 4)}
    assert set(BitConfig.preset("uniform8").resolve(RESNET18_LAYERS).values()) == {LayerBits(8, 8)}


def test_explicit_layers_override_defaults_and_ends() -> None:
    config = BitConfig(layers={"fc": (4, 8), "layer4.1.conv2": 8}, default=LayerBits(4, 4), first_last=(8, 8))
    bits = config.resolve(RESNET18_LAYERS)
    assert bits["fc"] == LayerBits(4, 8)
    assert bits["layer4.1.conv2"] == LayerBits(8, 8)
    assert bits["conv1"] == LayerBits(8, 8)
    assert bits["layer1.0.conv1"] == LayerBits(4, 4)


def test_resolve_reports_unknown_and_missing_layers_in_one_error() -> None:
    config = BitConfig(layers={"conv1": (8, 8), "layer9.conv": (4, 4), "head": (8, 8)})
    with pytest.raises(ValueError) as err:
        config.resolve(models.get("tiny_resnet"))
    message = str(err.value)
    assert "\n" not in message
    assert "unknown layers (2): head, layer9.conv" in message
    assert "layers without bits (9): layer1.0.conv1" in message


@pytest.mark.parametrize("bad", [3, 16, 0, True, "4", 4.0])
def test_layer_bits_accept_only_supported_widths(bad: object) -> None:
    with pytest.raises(ValueError, match=r"must be one of \(4, 8\)"):
        LayerBits(bad, 8)  # type: ignore[arg-type]


def test_json_round_trip_is_atomic_and_versioned(tmp_path: Path) -> None:
    config = BitConfig(layers={"fc": (8, 8)}, default=(4, 4), first_last=(8, 8))
    path = tmp_path / "out" / "bits.json"
    config.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["bits.json"]  # no temporary left behind
    data = json.loads(path.read_text())
    assert data["schema_version"] == SCHEMA_VERSION
    assert BitConfig.load(path) == config
    assert BitConfig.from_any(str(path)) == config


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"layers": {}}', "schema_version None is not supported"),
        ('{"schema_version": 99, "layers": {}}', "schema_version 99 is not supported"),
        ('{"schema_version": 1, "layerz": {}}', "unknown fields: layerz"),
        ('{"schema_version": 1, "layers": {"fc": {"w_bits": 5, "a_bits": 8}}}', "must be one of"),
        ('{"schema_version": 1, "layers": {"fc": "eight"}}', "cannot read layer bits"),
    ],
)
def test_load_gives_one_clear_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bits.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        BitConfig.load(path)
    assert str(err.value).startswith(str(path))


def test_from_any_accepts_every_documented_form() -> None:
    assert BitConfig.from_any("uniform8") == BitConfig.preset("uniform8")
    assert BitConfig.from_any({"fc": [8, 4]}).layers == {"fc": LayerBits(8, 4)}
    as_json = BitConfig.preset("uniform4").to_dict()
    assert BitConfig.from_any(as_json) == BitConfig.preset("uniform4")
    with pytest.raises(ValueError, match="neither a bit-config file nor a preset"):
        BitConfig.from_any("uniform3")


@pytest.mark.parametrize(
    ("units", "convs", "layers"), [([2, 2, 2, 2], 2, RESNET18_LAYERS), ([3, 4, 6, 3], 3, RESNET50_LAYERS)]
)
@pytest.mark.parametrize("preset", ["uniform4", "uniform8"])
def test_hawq_uniform_presets_translate_to_ours(units: list[int], convs: int, layers: list[str], preset: str) -> None:
    bits = 4 if preset == "uniform4" else 8
    translated = BitConfig.from_hawq(hawq_resnet_preset(units, convs, bits))
    assert translated.resolve(layers) == BitConfig.preset(preset).resolve(layers)


def test_hawq_mixed_activation_bits_land_on_the_consuming_conv() -> None:
    preset = hawq_resnet_preset([2, 2, 2, 2], 2, 8)
    preset["stage3.unit2.quant_act1"] = (4, "hook")
    preset["stage3.unit2.quant_convbn2"] = 4
    preset["stage4.unit1.quant_act"] = 4
    bits = BitConfig.from_hawq(preset).resolve(RESNET18_LAYERS)
    assert bits["layer3.1.conv2"] == LayerBits(4, 4)
    assert bits["layer3.1.conv1"] == LayerBits(8, 8)
    assert bits["layer4.0.conv1"] == bits["layer4.0.downsample.0"] == LayerBits(8, 4)


def test_hawq_bit_config_file_is_read_without_executing_it(tmp_path: Path) -> None:
    presets = {"bit_config_resnet18_uniform4": hawq_resnet_preset([2, 2, 2, 2], 2, 4),
               "bit_config_resnet18_uniform8": hawq_resnet_preset([2, 2, 2, 2], 2, 8)}
    path = tmp_path / "bit_config.py"
    path.write_text("import os\nos.remove(__file__)\nbit_config_dict = " + repr(presets) + "\n")
    config = BitConfig.from_hawq(path, "bit_config_resnet18_uniform4")
    assert config.resolve(RESNET18_LAYERS) == BitConfig.preset("uniform4").resolve(RESNET18_LAYERS)
    assert path.exists()
    with pytest.raises(ValueError, match="choose a preset with name=..., one of"):
        BitConfig.from_hawq(path, "bit_config_resnet18_uniform2")


def test_hawq_keys_outside_resnet_naming_are_listed() -> None:
    preset = hawq_resnet_preset([2, 2, 2, 2], 2, 4)
    preset["features.stage1.unit1.branches.branch1.q_input_act"] = 8
    with pytest.raises(ValueError, match=r"outside HAWQ's ResNet naming \(1\): features.stage1"):
        BitConfig.from_hawq(preset)


def test_a_dict_in_the_json_form_without_schema_version_is_read_as_such() -> None:
    config = BitConfig.from_any({"default": 4, "first_last": (8, 8), "layers": {"fc": 8}})
    assert config == BitConfig(default=LayerBits(4, 4), first_last=LayerBits(8, 8), layers={"fc": LayerBits(8, 8)})
    assert BitConfig.from_any({"conv1": (4, 8)}).layers == {"conv1": LayerBits(4, 8)}  # a {layer: bits} dict
    with pytest.raises(ValueError, match="unknown fields: conv1"):  # the two forms mixed: refused, not misread
        BitConfig.from_any({"default": 4, "conv1": 8})
