"""CUDA graphs of the packed forward (sensimix.inference.graphs), on the CPU through their eager twin
(``capture=False``: the same buckets, padded packing, static buffers and calls, ``fn`` run where a graph would be
replayed), and captured on a GPU (``gpu`` mark).

What is proven here: the bucket arithmetic (by hand and over every count up to 20,000), the padded layout, that pad
rows change no valid row (A8: the logits bit for bit, however many pad rows and whichever tokens they copy; fp32
within 1e-5), that a key's buffers are made once and reused, and that ``cuda_graphs=True`` is refused off CUDA."""

from __future__ import annotations

import pytest
import torch
from helpers import CUDA, build_qat, logits_of, ragged_inputs

from sensimix import SensiMixForSequenceClassification as Packed
from sensimix.export import export_checkpoint
from sensimix.inference import Packing, graphs, make_plan
from sensimix.inference.graphs import GraphCache, PackedGraphs, padded_packing, span_bucket, token_bucket


@pytest.fixture(scope="module", params=["a8", "fp32"])
def folder(request, tmp_path_factory):
    qat = build_qat(4, 2, seed=3, activation_quant="a8" if request.param == "a8" else None)
    return request.param, qat, export_checkpoint(qat, tmp_path_factory.mktemp("graphs") / request.param)


def twin(folder_path, **kwargs) -> Packed:
    """A model whose forward runs through the eager twin of its CUDA graphs."""
    model = Packed.from_pretrained(folder_path, **kwargs)
    model.graphs = PackedGraphs(model, capture=False)
    return model


def same_logits(kind: str, got: torch.Tensor, want: torch.Tensor) -> None:
    if kind == "a8":  # integer GEMMs and row rules: nothing depends on the other rows
        assert torch.equal(got, want)
    else:  # fp32 GEMMs: the same numbers up to the summation order a library picks for another M
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# the arithmetic of buckets and layouts
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens,bucket", [(0, 64), (1, 64), (64, 64), (65, 72), (100, 104), (128, 128), (129, 144),
                                           (1000, 1024), (1025, 1152), (3392, 3584), (16384, 16384)])
def test_token_bucket_by_hand(tokens: int, bucket: int) -> None:
    assert token_bucket(tokens) == bucket


def test_token_buckets_pad_at_most_an_eighth_with_eight_per_octave() -> None:
    buckets = [token_bucket(t) for t in range(1, 20001)]
    assert all(b >= t for t, b in zip(range(1, 20001), buckets))
    assert all(b - t <= max(64, t) / 8 or t <= 64 for t, b in zip(range(1, 20001), buckets))
    assert buckets == sorted(buckets)
    for octave in range(6, 14):  # tokens in (2^octave, 2^(octave + 1)]
        assert len({token_bucket(t) for t in range(2 ** octave + 1, 2 ** (octave + 1) + 1)}) == 8
    with pytest.raises(ValueError):
        token_bucket(-1)


@pytest.mark.parametrize("span,seq,width", [(1, 128, 32), (32, 128, 32), (33, 128, 64), (120, 128, 128),
                                            (120, 100, 100), (24, 24, 24)])
def test_span_bucket_by_hand(span: int, seq: int, width: int) -> None:
    assert span_bucket(span, seq) == width


def test_the_padded_layout_holds_every_real_token_once_and_pads_read_the_first() -> None:
    mask = ragged_inputs()["attention_mask"]
    p = Packing.of(mask)
    (batch, seq), t = mask.shape, p.index.numel()
    span = graphs.longest_span(p, seq)
    pp = padded_packing(p, batch, seq, t + 11, span)
    (g,) = pp.groups
    assert pp.index.numel() == t + 11 and torch.equal(pp.index[:t], p.index) and not pp.index[t:].any()
    assert torch.equal(pp.positions, pp.index % seq) and torch.equal(pp.cls, p.cls)
    assert g.rows == batch and g.span == span and g.count == t + 11 and g.start == 0
    assert int(g.mask.sum()) == t and torch.equal(g.mask.view(batch, span), mask.bool()[:, :span])
    real = g.slots[:t]
    assert torch.equal(g.gather[real], torch.arange(t)) and not g.slots[t:].any()
    assert not g.gather[~g.mask.view(-1)].any()  # every masked slot reads row 0, a real token
    full = padded_packing(None, 3, 8, 24, 8)
    assert torch.equal(full.index, torch.arange(24)) and bool(full.groups[0].mask.all())
    with pytest.raises(ValueError, match="do not fit"):
        padded_packing(p, batch, seq, t - 1, span)
    with pytest.raises(ValueError, match="a span of"):
        padded_packing(p, batch, seq, t, span - 1)


# ---------------------------------------------------------------------------------------------------
# pad rows change no valid row
# ---------------------------------------------------------------------------------------------------
def test_the_twin_computes_the_forward_s_logits(folder) -> None:
    kind, qat, path = folder
    inputs = ragged_inputs()
    eager = logits_of(Packed.from_pretrained(path), inputs)
    model = twin(path)
    same_logits(kind, logits_of(model, inputs), eager)
    if kind == "a8":
        with torch.inference_mode():
            assert torch.equal(eager, qat(**inputs).logits)


@pytest.mark.parametrize("extra", [0, 1, 37, 300])
def test_pad_rows_change_no_valid_row_whatever_they_hold(folder, monkeypatch, extra: int) -> None:
    # more pad rows than any bucket gives, each a copy of another (random) token: the logits stay what they were
    kind, _, path = folder
    inputs = ragged_inputs()
    eager = logits_of(Packed.from_pretrained(path), inputs)
    laid = graphs.padded_packing
    g = torch.Generator().manual_seed(extra)

    def poisoned(packing, batch, seq, tokens, span, device=None):
        pp = laid(packing, batch, seq, tokens + extra, span, device)
        t = packing.index.numel()
        pp.index[t:] = torch.randint(0, batch * seq, (tokens + extra - t,), generator=g)
        pp.positions.copy_(pp.index % seq)
        return pp

    monkeypatch.setattr(graphs, "padded_packing", poisoned)
    same_logits(kind, logits_of(twin(path), inputs), eager)


def test_every_path_of_the_forward_goes_through_the_twin(folder) -> None:
    kind, _, path = folder
    inputs = ragged_inputs()
    model = twin(path)
    eager = Packed.from_pretrained(path)
    cases = {
        "packing given": dict(inputs, packing=Packing.of(inputs["attention_mask"])),
        "packing made": inputs,
        "no padding": {**inputs, "attention_mask": torch.ones_like(inputs["attention_mask"])},
        "no mask": {k: v for k, v in inputs.items() if k != "attention_mask"},
        "no token types": {k: v for k, v in inputs.items() if k != "token_type_ids"},
    }
    for name, case in cases.items():
        before = sum(e.calls for e in model.graphs.cache.entries.values())
        want = logits_of(eager, {k: v for k, v in case.items() if k != "packing"})
        same_logits(kind, logits_of(model, case), want)
        assert sum(e.calls for e in model.graphs.cache.entries.values()) == before + 1, name
    masked_first = dict(inputs, attention_mask=inputs["attention_mask"].clone())
    masked_first["attention_mask"][0, 0] = 0  # no [CLS] to pool (refused unless unchecked): the padded path, eagerly
    model.check_inputs = eager.check_inputs = False
    entries = len(model.graphs.cache.entries)
    same_logits(kind, logits_of(model, masked_first), logits_of(eager, masked_first))
    assert len(model.graphs.cache.entries) == entries
    padded = twin(path, skip_padding=False)
    same_logits(kind, logits_of(padded, inputs), logits_of(Packed.from_pretrained(path, skip_padding=False), inputs))
    assert [k[2] for k in padded.graphs.cache.entries] == ["padded"]


# ---------------------------------------------------------------------------------------------------
# static buffers: one set per key, reused, outputs copied out
# ---------------------------------------------------------------------------------------------------
def test_a_key_s_buffers_are_made_once_and_reused(folder) -> None:
    kind, _, path = folder
    model, eager = twin(path), Packed.from_pretrained(path)
    first = ragged_inputs(seed=4)
    second = dict(ragged_inputs(seed=9), attention_mask=first["attention_mask"])  # other tokens, the same key
    out1 = logits_of(model, first)
    (key, entry), = model.graphs.cache.entries.items()
    buffers = {name: t.data_ptr() for name, t in entry.inputs.items() if isinstance(t, torch.Tensor)}
    index = entry.inputs["packing"].index.data_ptr()
    out2 = logits_of(model, second)
    assert list(model.graphs.cache.entries) == [key] and entry.calls == 2
    assert {name: t.data_ptr() for name, t in entry.inputs.items() if isinstance(t, torch.Tensor)} == buffers
    assert entry.inputs["packing"].index.data_ptr() == index
    same_logits(kind, out1, logits_of(eager, first))
    same_logits(kind, out2, logits_of(eager, second))  # the second batch's inputs were copied in
    shorter = dict(first, attention_mask=first["attention_mask"].clone())
    shorter["attention_mask"][:, 12:] = 0  # fewer tokens and a shorter span: another key
    shorter["input_ids"] = shorter["input_ids"].masked_fill(shorter["attention_mask"] == 0, 0)
    same_logits(kind, logits_of(model, shorter), logits_of(eager, shorter))
    assert len(model.graphs.cache.entries) == 2 and model.graphs.cache.captures == 0  # the twin captures nothing


def test_the_cache_copies_outputs_out_and_runs_eagerly_when_full() -> None:
    calls = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.data_ptr())
        return x * 2

    cache = GraphCache(fn, capture=False, max_graphs=1)
    a = cache("k", {"x": torch.ones(3)})
    a += 100  # the caller owns what it got
    b = cache("k", {"x": torch.full((3,), 5.0)})
    assert torch.equal(b, torch.full((3,), 10.0)) and calls[0] == calls[1]  # the same static buffer both times
    c = cache("other", {"x": torch.ones(2)})  # the cache is full: eagerly, on the caller's tensor
    assert torch.equal(c, torch.full((2,), 2.0)) and list(cache.entries) == ["k"]
    with pytest.raises(ValueError, match="should fix"):
        graphs._load((1, 2), (1, 3))


# ---------------------------------------------------------------------------------------------------
# where it runs
# ---------------------------------------------------------------------------------------------------
def test_cuda_graphs_are_refused_off_cuda_in_one_line(folder) -> None:
    _, _, path = folder
    with pytest.raises(ValueError, match="needs a CUDA device, not cpu") as info:
        Packed.from_pretrained(path, cuda_graphs=True)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        make_plan("cpu", cuda_graphs=True)
    with pytest.raises(ValueError, match="not both"):
        Packed.from_pretrained(path, cuda_graphs=True, compile=True)
    with pytest.raises(TypeError, match="cuda_graphs must be True or False"):
        Packed.from_pretrained(path, cuda_graphs="yes")
    model = Packed.from_pretrained(path)
    assert model.graphs is None and not model.plan.cuda_graphs


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_graphs_on_gpu_replay_the_forward(folder, precision: str) -> None:
    kind, _, path = folder
    if kind == "a8" and precision == "fp16":
        pytest.skip("an A8 checkpoint runs fp32 (exact) plans only")
    inputs = ragged_inputs()
    eager = Packed.from_pretrained(path, device="cuda", precision=precision)
    model = Packed.from_pretrained(path, device="cuda", precision=precision, cuda_graphs=True)
    assert model.plan.cuda_graphs and "CUDA graphs" in model.plan.describe()
    want = logits_of(eager, inputs, "cuda")
    for _ in range(3):
        got = logits_of(model, inputs, "cuda")
        if kind == "a8" or precision == "fp32":
            same_logits(kind, got, want)
        else:  # fp16: attention over another layout (one group, a bucketed span) rounds differently
            torch.testing.assert_close(got, want, rtol=0, atol=2e-2)
    assert model.graphs.cache.captures == 1 and next(iter(model.graphs.cache.entries.values())).calls == 3
    shorter = dict(inputs, attention_mask=inputs["attention_mask"].clone())
    shorter["attention_mask"][:, 12:] = 0
    logits_of(model, shorter, "cuda")
    assert model.graphs.cache.captures == 2
