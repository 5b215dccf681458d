"""Property-based tests (hypothesis): the quantization primitives, bit packing, config validation and the TSV
reader hold their contracts for every input hypothesis generates, not only for the hand-picked ones.

Reproducible: ``derandomize=True`` (examples derived from each test's source, the same on every run) and no
example database. The number of examples per test is the ``*_EXAMPLES`` constant it names.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sensimix import quant
from sensimix.cli.common import finite_float, int_at_least
from sensimix.config import MAX_LAYERS, SIGN_PRESERVING_ACTS, SensiMixConfig
from sensimix import data

QUANT_EXAMPLES = 300
PACK_EXAMPLES = 300
CONFIG_EXAMPLES = 250
TSV_EXAMPLES = 300
OPTION_EXAMPLES = 200

PROPERTY = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---------------------------------------------------------------------------------------------------
# 8-bit index quantization
# ---------------------------------------------------------------------------------------------------
FP16_MAX = 60000.0  # weights beyond fp16's range cannot have a stored (lo, hi) at all
finite = st.floats(-FP16_MAX, FP16_MAX, allow_nan=False, allow_infinity=False, width=32)
shapes = st.lists(st.integers(1, 6), min_size=1, max_size=3)


@st.composite
def weights(draw, values=finite) -> torch.Tensor:
    shape = draw(shapes)
    n = math.prod(shape)
    return torch.tensor(draw(st.lists(values, min_size=n, max_size=n)), dtype=torch.float32).reshape(shape)


@settings(PROPERTY, max_examples=QUANT_EXAMPLES)
@given(weights())
def test_index8_error_is_at_most_half_a_step(w):
    q, lo, hi = quant.index8_quantize(w)
    assert q.dtype == torch.int8 and q.shape == w.shape
    w_hat = quant.index8_dequantize(q, lo, hi)
    s = quant.index8_step(lo, hi)
    slack = max(abs(w.min().item() - lo.item()), abs(w.max().item() - hi.item()))  # fp16 rounding of lo, hi
    rounding = 4 * torch.finfo(torch.float32).eps * max(abs(lo.item()), abs(hi.item()), 255 * s.item())
    assert (w - w_hat).abs().max().item() <= s.item() / 2 + slack + rounding


@settings(PROPERTY, max_examples=QUANT_EXAMPLES)
@given(weights(st.floats(-FP16_MAX, FP16_MAX, allow_nan=False, width=16)))
def test_index8_extremes_map_to_minus128_and_127(w):
    """fp16-exact weights: lo and hi are exactly the min and max, which land on the end indices."""
    assume(w.max() > w.min())
    q, lo, hi = quant.index8_quantize(w)
    assert (lo.item(), hi.item()) == (w.min().item(), w.max().item())
    assert q.flatten()[w.argmin()].item() == -128 and q.flatten()[w.argmax()].item() == 127
    assert q.min().item() == -128 and q.max().item() == 127


@settings(PROPERTY, max_examples=QUANT_EXAMPLES)
@given(st.floats(-FP16_MAX, FP16_MAX, allow_nan=False, width=16), shapes)
def test_index8_constant_tensor_is_exact(c, shape):
    w = torch.full(shape, c)
    q, lo, hi = quant.index8_quantize(w)
    assert (q == -128).all()
    assert torch.equal(quant.index8_dequantize(q, lo, hi), w)


@settings(PROPERTY, max_examples=QUANT_EXAMPLES)
@given(st.lists(st.integers(-128, 127), min_size=1, max_size=64),
       st.floats(-FP16_MAX, FP16_MAX, allow_nan=False, width=16),
       st.floats(-FP16_MAX, FP16_MAX, allow_nan=False, width=16))
def test_index8_requantizing_the_dequantized_values_gives_the_indices_back(indices, a, b):
    q = torch.tensor(indices, dtype=torch.int8)
    lo, hi = torch.tensor(min(a, b)), torch.tensor(max(a, b))
    assume(hi > lo)  # a constant range holds one value: every index means -128
    again, _, _ = quant.index8_quantize(quant.index8_dequantize(q, lo, hi), lo, hi)
    assert torch.equal(again, q)


# ---------------------------------------------------------------------------------------------------
# sign bits
# ---------------------------------------------------------------------------------------------------
sign_values = st.floats(allow_nan=True, allow_infinity=True, width=32) | st.sampled_from([0.0, -0.0, 1e-45, -1e-45])


@settings(PROPERTY, max_examples=PACK_EXAMPLES)
@given(st.lists(st.integers(1, 4), max_size=3), st.integers(1, 70), st.integers(0, 2**32 - 1),
       st.lists(st.tuples(st.integers(0, 10**6), sign_values), max_size=8))
def test_pack_unpack_signs_round_trip(lead, k, seed, specials):
    """Any leading shape and K; random signs plus drawn edge values (0, -0, NaN, inf, denormals) at drawn places."""
    x = torch.randn(*lead, k, generator=torch.Generator().manual_seed(seed))
    for where, value in specials:
        x.view(-1)[where % x.numel()] = value
    packed = quant.pack_signs(x)
    assert packed.dtype == torch.uint8 and packed.shape == (*lead, (k + 7) // 8)
    assert torch.equal(quant.unpack_bits(packed, k), (x > 0).to(torch.uint8))
    assert torch.equal(quant.unpack_signs(packed, k), quant.sign(x))
    padding = quant.unpack_bits(packed, packed.shape[-1] * 8)[..., k:]
    assert not padding.any()


def test_pack_signs_of_an_empty_batch():
    # found by the round-trip property: torch cannot infer a -1 dimension for 0 elements
    assert quant.pack_signs(torch.empty(0, 9)).shape == (0, 2)
    assert quant.unpack_signs(quant.pack_signs(torch.empty(2, 0, 9)), 9).shape == (2, 0, 9)


@settings(PROPERTY, max_examples=PACK_EXAMPLES)
@given(st.integers(1, 8), st.integers(-20, 80))
def test_unpack_refuses_a_k_its_bytes_do_not_fit(nbytes, k):
    packed = torch.zeros(3, nbytes, dtype=torch.uint8)
    if (nbytes - 1) * 8 < k <= nbytes * 8:
        assert quant.unpack_bits(packed, k).shape == (3, k)
    else:
        with pytest.raises(ValueError, match=f"cannot hold k={k}"):
            quant.unpack_bits(packed, k)


# ---------------------------------------------------------------------------------------------------
# config validation: a valid SensiMixConfig or one ValueError, whatever config.json holds
# ---------------------------------------------------------------------------------------------------
json_scalars = (st.integers(-3, 300) | st.sampled_from([0, -1, 2**31, 2**63, 10**20]) | st.floats(-2.0, 2.0)
                | st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e-12, 1e-300, 0.0, 1.0])
                | st.booleans() | st.none() | st.text(max_size=8) | st.sampled_from(sorted(SIGN_PRESERVING_ACTS))
                | st.sampled_from(["absolute", "relative_key", "12", "gelu "]))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)
CONFIG_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "num_8bit_layers",
                 "hidden_dropout_prob", "attention_probs_dropout_prob", "position_embedding_type", "num_labels",
                 "id2label", "label2id", "pad_token_id", "initializer_range", "classifier_dropout", "unknown_field")
VALID = dict(vocab_size=30, hidden_size=8, num_hidden_layers=3, num_attention_heads=2, intermediate_size=12,
             max_position_embeddings=16, type_vocab_size=2, num_8bit_layers=2)


def assert_invariants(c: SensiMixConfig) -> None:
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "max_position_embeddings", "type_vocab_size"):
        value = getattr(c, name)
        assert isinstance(value, int) and not isinstance(value, bool) and value >= 1, (name, value)
    assert 0 <= c.num_8bit_layers <= c.num_hidden_layers <= MAX_LAYERS
    assert c.hidden_size % c.num_attention_heads == 0
    assert math.isfinite(c.layer_norm_eps) and 0 < c.layer_norm_eps < 1
    assert c.hidden_act in SIGN_PRESERVING_ACTS
    assert c.mixed_layers == list(range(c.num_8bit_layers, c.num_hidden_layers))


@settings(PROPERTY, max_examples=CONFIG_EXAMPLES)
@given(st.dictionaries(st.sampled_from(CONFIG_FIELDS), json_values, max_size=4))
def test_config_is_valid_or_one_value_error(changes):
    fields = {**VALID, **changes}
    try:
        config = SensiMixConfig(**fields)
    except ValueError as exc:
        assert "\n" not in str(exc) and str(exc)  # one line, not empty
        return
    assert_invariants(config)


@settings(PROPERTY, max_examples=CONFIG_EXAMPLES)
@given(st.dictionaries(st.sampled_from(CONFIG_FIELDS), json_values, max_size=4))
def test_a_bert_source_config_is_valid_or_one_source_error(changes):
    """The same for a plain BERT folder's config.json (``compress --bert`` / the V&V baseline)."""
    from sensimix.sources import SourceError, bert_config

    fields = {k: v for k, v in {**VALID, **changes}.items() if k != "num_8bit_layers"}
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(fields))
        try:
            config = bert_config(folder)
        except SourceError as exc:
            assert folder in str(exc)
            return
    assert 1 <= config.num_hidden_layers <= MAX_LAYERS and config.hidden_size % config.num_attention_heads == 0
    assert math.isfinite(config.layer_norm_eps) and 0 < config.layer_norm_eps < 1


# ---------------------------------------------------------------------------------------------------
# the TSV reader: Examples, or a ValueError / FileNotFoundError naming the file
# ---------------------------------------------------------------------------------------------------
tsv_pieces = st.sampled_from(["\t", "\n", "\r\n", "\r", '"', "'", "\\", "\x00", "\ufeff", " ", "0", "1", "label",
                              "sentence", "\u2028", "\x85", "entailment"])
tsv_text = st.lists(tsv_pieces | st.text(max_size=6), max_size=30).map("".join)
tsv_bytes = st.one_of(
    st.binary(max_size=200),
    tsv_text.map(lambda t: t.encode("utf-8")),
    st.tuples(tsv_text, st.binary(max_size=4), tsv_text).map(lambda p: p[0].encode() + p[1] + p[2].encode()),
    tsv_text.map(lambda t: ("sentence\tlabel\n" + t).encode("utf-8")),
    st.sampled_from([b"", b"sentence\tlabel\n", b"sentence\tlabel\n\n\n", b"\xef\xbb\xbfsentence\tlabel\na\t1\n"]),
)


def read_tsv(task: str, content: bytes):
    """(Examples or the exception, path) of ``content`` as ``task``'s train.tsv."""
    spec = data.task_spec(task)
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / spec.name / "train.tsv"
        path.parent.mkdir()
        path.write_bytes(content)
        try:
            return data.load_glue(task, "train", root), str(path)
        except (ValueError, FileNotFoundError) as exc:
            return exc, str(path)


@settings(PROPERTY, max_examples=TSV_EXAMPLES)
@given(st.sampled_from(["sst-2", "qnli", "cola"]), tsv_bytes)
def test_any_bytes_are_examples_or_one_clear_error(task, content):
    result, path = read_tsv(task, content)
    if isinstance(result, Exception):
        assert path in str(result), f"the error does not name the file: {result}"
        assert "\n" not in str(result).strip()
        return
    spec = data.task_spec(task)
    assert len(result) >= 1 and len(result.text_a) == len(result.labels)
    assert (result.text_b is None) == (spec.text_b is None)
    assert set(result.labels) <= set(range(len(spec.labels)))


sentences = st.text(st.characters(blacklist_characters="\t\n\r", blacklist_categories=("Cs",)), min_size=1,
                    max_size=40).filter(str.strip)  # an empty or blank sentence is refused (below)


@settings(PROPERTY, max_examples=TSV_EXAMPLES)
@given(st.lists(st.tuples(sentences, sentences, st.booleans()), min_size=1, max_size=8), st.booleans())
def test_valid_rows_are_read_back_exactly(rows, crlf):
    """Any sentence without a tab or line break survives: quotes, backslashes, NUL, unicode, outer spaces."""
    end = "\r\n" if crlf else "\n"
    lines = ["index\tquestion\tsentence\tlabel"] + [
        f"{i}\t{a}\t{b}\t{'entailment' if y else 'not_entailment'}" for i, (a, b, y) in enumerate(rows)]
    result, _ = read_tsv("qnli", (end.join(lines) + end).encode("utf-8"))
    assert not isinstance(result, Exception), result
    assert result.text_a == [a for a, _, _ in rows] and result.text_b == [b for _, b, _ in rows]
    assert result.labels == [0 if y else 1 for _, _, y in rows]


def test_an_empty_sentence_is_refused_with_its_line():
    for blank in ("", "   ", "\u3000"):
        result, path = read_tsv("qnli", f"index\tquestion\tsentence\tlabel\n0\twhy?\t{blank}\tentailment\n".encode())
        assert isinstance(result, ValueError) and f"{path}:2: the 'sentence' field is empty" in str(result)


@settings(PROPERTY, max_examples=10)  # every one of the 5 x 2 combinations
@given(st.sampled_from([1, 131_072, data.MAX_FIELD_BYTES - 10, data.MAX_FIELD_BYTES + 1, 3 * data.MAX_FIELD_BYTES]),
       st.sampled_from(["a", "\u00e9"]))
def test_long_fields_up_to_the_limit_are_read_and_longer_ones_named(length, char):
    result, path = read_tsv("sst-2", f"sentence\tlabel\n{char * length}\t1\n".encode("utf-8"))
    if length + 2 <= data.MAX_FIELD_BYTES:
        assert result.text_a == [char * length]
    else:
        assert isinstance(result, ValueError) and f"{path}:2: a line of" in str(result)


# ---------------------------------------------------------------------------------------------------
# command-line numbers, and the V&V example count
# ---------------------------------------------------------------------------------------------------
@settings(PROPERTY, max_examples=OPTION_EXAMPLES)
@given(st.text(max_size=12) | st.sampled_from(["nan", "inf", "-inf", "1e400", "0", "-0", "1e-400", "0x10", " 3 "]))
def test_numeric_options_parse_to_a_valid_value_or_refuse(text):
    for parse, ok in ((finite_float(0, open_low=True, high=1.0), lambda v: 0 < v <= 1 and math.isfinite(v)),
                      (int_at_least(1), lambda v: isinstance(v, int) and v >= 1)):
        try:
            value = parse(text)
        except argparse.ArgumentTypeError:
            continue
        assert ok(value), (text, value)


@settings(PROPERTY, max_examples=OPTION_EXAMPLES)
@given(st.none() | st.integers(-3, 10_000))
def test_vv_example_count_is_kept_or_refused_never_replaced(examples):
    """``--kotca-examples 0`` must be refused, not silently become the default."""
    from sensimix.vv import VVSettings

    settings_ = VVSettings(device="cpu", examples=examples, accuracy=None)
    if examples is not None and examples < 1:
        with pytest.raises(ValueError, match="--examples must be an integer >= 1"):
            settings_.resolved()
    else:
        assert settings_.resolved().examples == (256 if examples is None else examples)


@pytest.mark.parametrize("content", [b"sentence\tlabel\rgood\t1\rbad\t0\r", b"sentence\tlabel\ngo\rod\t1\n"])
def test_a_carriage_return_inside_a_line_is_named_as_such(content):
    result, path = read_tsv("sst-2", content)
    assert isinstance(result, ValueError) and "carriage return (CR) inside the line" in str(result)
    assert str(result).startswith(path + ":")
