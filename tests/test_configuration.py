"""MPLUGConfig: defaults, presets, schedule derivation, validation, round trip."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig, BertConfig, CLIPVisionConfig

from transformers_mplug import MPLUGConfig
from transformers_mplug.configuration_mplug import cross_modal_schedule

from .conftest import tiny_config

CO, CONN = "co_attention", "connected_attention"


def test_defaults_are_mplug_base():
    config = MPLUGConfig()
    assert isinstance(config.vision_config, CLIPVisionConfig) and isinstance(config.text_config, BertConfig)
    assert config.vision_config.hidden_size == 768 and config.vision_config.patch_size == 16
    assert config.vision_config.num_hidden_layers == 12 and config.image_size == 384
    assert config.vision_config.hidden_act == "quick_gelu" and config.vision_config.layer_norm_eps == 1e-5
    assert config.text_config.num_hidden_layers == 6 and config.text_config.hidden_size == 768
    assert config.text_config.vocab_size == 30522 and config.text_config.layer_norm_eps == 1e-12
    assert config.cross_modal_layer_types == [CO, CO, CO, CONN, CO, CO]
    assert config.num_decoder_layers == 12
    assert not config.has_vision_projection
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 101, 102)
    assert config.num_image_tokens == 24 * 24 + 1


def test_large_preset():
    config = MPLUGConfig.from_preset("large")
    assert config.vision_config.hidden_size == 1024 and config.vision_config.patch_size == 14
    assert config.vision_config.num_hidden_layers == 24 and config.image_size == 336
    assert config.cross_modal_layer_types == [CO] * 6
    assert config.has_vision_projection and config.hidden_size == 768
    assert MPLUGConfig.from_preset("large", image_size=448).image_size == 448
    with pytest.raises(ValueError, match="preset"):
        MPLUGConfig.from_preset("huge")


@pytest.mark.parametrize(
    ("layers", "stride", "expected"),
    [
        (6, 3, [CO, CO, CO, CONN, CO, CO]),
        (6, 6, [CO] * 6),
        (4, 2, [CO, CO, CONN, CO]),
        (3, 1, [CO, CONN, CONN]),
    ],
)
def test_schedule_derived_from_stride(layers, stride, expected):
    assert cross_modal_schedule(layers, stride) == expected
    assert (
        MPLUGConfig(num_cross_modal_layers=layers, connected_attention_stride=stride).cross_modal_layer_types
        == expected
    )


def test_round_trip_through_config_json(tmp_path):
    config = tiny_config(cross_modal_layer_types=[CONN, CO], num_decoder_layers=2)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "mplug"
    assert saved["cross_modal_layer_types"] == [CONN, CO]
    assert saved["vision_config"]["image_size"] == 32
    loaded = MPLUGConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    auto = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(auto, MPLUGConfig) and auto.cross_modal_layer_types == [CONN, CO]
    assert MPLUGConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_decoder_layer=3), "num_decoder_layer"),  # typo
        (dict(cross_modal_layer_types=["co_attention", "merged"]), "cross_modal_layer_types"),
        (dict(cross_modal_layer_types=[]), "cross_modal_layer_types"),
        (dict(cross_modal_layer_types="co_attention"), "cross_modal_layer_types"),
        (dict(cross_modal_layer_types=[CO, CO], num_cross_modal_layers=3), "num_cross_modal_layers"),
        (dict(cross_modal_layer_types=[CO, CO, CO, CO], connected_attention_stride=2), "connected_attention_stride"),
        (dict(connected_attention_stride=0), "connected_attention_stride"),
        (dict(num_cross_modal_layers=0), "num_cross_modal_layers"),
        (dict(num_decoder_layers=0), "num_decoder_layers"),
        (dict(image_size=0), "image_size"),
        (dict(image_size=100), "patch_size"),
        (dict(text_config=dict(hidden_size=30, num_attention_heads=4)), "num_attention_heads"),
        (dict(text_config=dict(num_hidden_layers=0)), "text_config.num_hidden_layers"),
        (dict(eos_token_id=40000), "eos_token_id"),
        (dict(vision_projection_dropout=1.5), "vision_projection_dropout"),
    ],
)
def test_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MPLUGConfig(**kwargs)


def test_sub_config_type_checked():
    with pytest.raises(TypeError, match="vision_config"):
        MPLUGConfig(vision_config=[1, 2])


def test_explicit_schedule_consistent_with_stride_is_accepted():
    config = MPLUGConfig(cross_modal_layer_types=[CO, CO, CO, CONN, CO, CO], connected_attention_stride=3)
    assert config.cross_modal_layer_types[3] == CONN


def test_decoder_config_is_a_cross_attending_bert():
    config = tiny_config(num_decoder_layers=2)
    decoder = config.decoder_config()
    assert decoder.is_decoder and decoder.add_cross_attention and decoder.num_hidden_layers == 2
    assert config.text_config.num_hidden_layers == 2 and not config.text_config.is_decoder


def test_partial_sub_configs_fill_from_mplug_defaults():
    config = MPLUGConfig(vision_config={"hidden_size": 64, "num_attention_heads": 2})
    assert (config.vision_config.patch_size, config.vision_config.image_size) == (16, 384)  # not CLIP's 32 / 224
    assert config.vision_config.attention_dropout == 0.1 and config.vision_config.hidden_act == "quick_gelu"
    text = MPLUGConfig(text_config={"hidden_size": 48, "num_attention_heads": 2}).text_config
    assert text.num_hidden_layers == 6 and text.layer_norm_eps == 1e-12  # mPLUG's 6-layer text encoder, not BERT's 12


@pytest.mark.parametrize("name", ["vision_config", "text_config"])
def test_a_typo_inside_a_sub_config_is_refused(name):
    with pytest.raises(ValueError, match=rf"`{name}` has unknown field\(s\) \['hiden_size'\]"):
        MPLUGConfig(**{name: {"hiden_size": 64}})


def test_a_saved_config_with_unknown_keys_still_loads_with_a_warning(tmp_path, caplog):
    import json

    MPLUGConfig().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    saved = json.loads(path.read_text())
    saved["feature_of_a_newer_release"] = 3
    saved["text_config"]["another_new_field"] = True
    path.write_text(json.dumps(saved))
    with caplog.at_level("WARNING"):
        loaded = MPLUGConfig.from_pretrained(tmp_path)
    assert "feature_of_a_newer_release" in caplog.text and "another_new_field" in caplog.text
    assert loaded.feature_of_a_newer_release == 3
    assert loaded.cross_modal_layer_types == MPLUGConfig().cross_modal_layer_types
    # an extra attribute set on a config round-trips (as for any transformers config)
    loaded.save_pretrained(tmp_path / "again")
    assert MPLUGConfig.from_pretrained(tmp_path / "again").feature_of_a_newer_release == 3
    # while a misspelt constructor argument is still an error
    with pytest.raises(ValueError, match="num_decoder_layer"):
        MPLUGConfig(num_decoder_layer=2)
