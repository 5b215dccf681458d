import pytest

from sensimix.config import SensiMixConfig


def test_defaults_are_the_certified_2_plus_1():
    cfg = SensiMixConfig()
    assert (cfg.num_hidden_layers, cfg.num_8bit_layers) == (3, 2)
    assert cfg.mixed_layers == [2] and cfg.num_mixed_layers == 1
    assert cfg.describe() == "SensiMix (2+1)"


@pytest.mark.parametrize("n,a", [(1, 0), (1, 1), (6, 3), (9, 3), (12, 0), (12, 12)])
def test_any_valid_split(n, a):
    cfg = SensiMixConfig(num_hidden_layers=n, num_8bit_layers=a)
    assert cfg.mixed_layers == list(range(a, n))


@pytest.mark.parametrize("n,a,match", [
    (3, 4, r"num_8bit_layers \(a; compress --8bit-layers\) must be in \[0, num_hidden_layers=3\]"),
    (3, -1, "num_8bit_layers"),
    (0, 0, "num_hidden_layers"),
])
def test_invalid_split_names_field_and_range(n, a, match):
    with pytest.raises(ValueError, match=match):
        SensiMixConfig(num_hidden_layers=n, num_8bit_layers=a)


def test_hidden_size_must_divide_into_heads():
    with pytest.raises(ValueError, match="hidden_size"):
        SensiMixConfig(hidden_size=100, num_attention_heads=12)


def test_deeper_than_teacher_is_refused():
    cfg = SensiMixConfig(num_hidden_layers=9, num_8bit_layers=3)
    with pytest.raises(ValueError, match=r"\[1, 6\]"):
        cfg.validate_sensimix(teacher_layers=6)


def test_round_trips_through_json(tmp_path):
    cfg = SensiMixConfig(num_hidden_layers=6, num_8bit_layers=3, hidden_size=64, num_attention_heads=4)
    cfg.save_pretrained(tmp_path)
    from transformers import AutoConfig

    import sensimix  # noqa: F401  (registers the model type)

    back = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(back, SensiMixConfig) and back.num_8bit_layers == 3 and back.num_hidden_layers == 6
