"""The benchmark's row table (sensimix.bench.rows): every row in order on CPU and CUDA, what each row loads, the
``--rows`` selection, and a SensiMix variant added by one line."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import CUDA, ORT_ROWS, cpu_bench_rows

from sensimix import kernels
from sensimix.bench import rows
from sensimix.bench.rows import (
    EVERY_VARIANT,
    LIKE_FOR_LIKE,
    SensiMixModel,
    Variant,
    geometry_label,
    model_specs,
    row_keys,
    select_rows,
    unmatched_patterns,
)

FOLDERS = {LIKE_FOR_LIKE: Path("bert-packed"), (3, 2): Path("sm21"), (6, 3): Path("sm33"),
           (3, 2, "a8"): Path("sm21a8"), (6, 3, "a8"): Path("sm33a8")}
NO_ORT = "onnxruntime/onnx not installed"
CPU_ONLY = [*ORT_ROWS, "bert-torch-int8", "bert3-torch-int8"]
# a CUDA run's rows, as listed where CUDA is absent: every 1-bit kernel but the sm_89+ default (fp8); the A8 default
# there is a8-triton (its other A8 kernel: a8-torch); each geometry's GPU peers with CUDA graphs and torch.compile
GRAPHED = ["fp32-graphs", "fast-graphs"]
CUDA_ROWS = ["bert-fp32", "bert-fp16", "bert-fp32-graphs", "bert-fp16-graphs", "bert-fp16-compiled", "bert-torch-int8",
             *ORT_ROWS[:4], "bert3-fp32", "bert3-fp16", "bert3-fp32-graphs", "bert3-fp16-graphs", "bert3-fp16-compiled",
             "bert3-torch-int8", *ORT_ROWS[4:], "bert-runtime-fp16-skip", "sensimix-2+1-fp32", "sensimix-2+1-fast",
             "sensimix-2+1-fast-padded", "sensimix-2+1-bf16", "sensimix-2+1-fp16", "sensimix-2+1-fp16-1bit-int8",
             "sensimix-2+1-fp16-1bit-float", "sensimix-2+1-fp16-1bit-xnor", "sensimix-2+1-fp16-8bit-dequant",
             "sensimix-2+1-fp32-8bit-bf16x3", "sensimix-2+1-fp16-compiled",
             *(f"sensimix-2+1-{v}-graphs" for v in ("fp32", "fast", "fast-padded", "bf16", "fp16")),
             "sensimix-3+3-fp32", "sensimix-3+3-fast", *(f"sensimix-3+3-{v}" for v in GRAPHED),
             "sensimix-2+1-a8-fp32", "sensimix-2+1-a8-fast", "sensimix-2+1-a8-fast-padded",
             "sensimix-2+1-a8-fp32-8bit-a8-torch",
             *(f"sensimix-2+1-a8-{v}-graphs" for v in ("fp32", "fast", "fast-padded", "fp32-8bit-a8-torch")),
             "sensimix-3+3-a8-fp32", "sensimix-3+3-a8-fast", *(f"sensimix-3+3-a8-{v}" for v in GRAPHED)]


def specs_on(device: str, **kwargs) -> dict[str, object]:
    return {s.key: s for s in model_specs(Path("bert"), "BERT-base", FOLDERS, {}, kwargs.pop("ort", None), device, 4,
                                          **kwargs)}


def test_cpu_rows_in_order_and_only_onnxruntime_skipped_without_it():
    specs = model_specs(Path("bert"), "BERT-base", FOLDERS, {}, NO_ORT, "cpu", 4)
    assert [s.key for s in specs] == cpu_bench_rows()
    assert "sensimix-2+1-fp32-8bit-dense" in cpu_bench_rows()  # the exact path's other 8-bit kernel, on every CPU
    assert {s.key: s.skipped for s in specs if s.skipped} == {k: NO_ORT for k in ORT_ROWS}


@pytest.mark.skipif(CUDA, reason="lists a CUDA run's rows where CUDA is absent")
def test_cuda_rows_in_order_with_the_cpu_runtimes_skipped():
    cuda = specs_on("cuda")
    assert list(cuda) == CUDA_ROWS
    assert {k for k, s in cuda.items() if s.skipped} == set(CPU_ONLY)
    no_compile = specs_on("cuda", compiled=False)  # --no-compile
    assert [k for k in cuda if k not in no_compile] == ["bert-fp16-compiled", "bert3-fp16-compiled",
                                                        "sensimix-2+1-fp16-compiled"]


@pytest.mark.skipif(CUDA, reason="lists a CUDA run's rows where CUDA is absent")
def test_graph_rows_load_their_twin_with_cuda_graphs_and_only_on_cuda():
    cuda, cpu = specs_on("cuda"), specs_on("cpu")
    graphed = [k for k in cuda if k.endswith("-graphs")]
    assert graphed and not [k for k in cpu if "graphs" in k or "compiled" in k]
    for key in graphed:
        spec = cuda[key]
        assert spec.cuda_graphs and not spec.compiled, key
        if key.startswith("sensimix"):  # the same folder and plan as the row without graphs
            twin = cuda[key[:-len("-graphs")]]
            assert not twin.cuda_graphs and spec.loads() == twin.loads() and spec.name == f"{twin.name}, CUDA graphs"
        else:  # transformers SDPA (the certified baseline's eager attention would be another model)
            assert (spec.runtime, spec.attention, spec.precision) == ("transformers", "sdpa", key.split("-")[1]), key
    peer = cuda["bert3-fp16-graphs"]
    assert (peer.runtime, peer.precision, peer.layers, peer.reference) == ("transformers", "fp16", 3, "bert3-fp32")
    assert cuda["bert-fp16-graphs"].layers is None and cuda["bert-fp16-compiled"].compiled


def test_what_each_sensimix_row_loads():
    cpu, cuda = specs_on("cpu"), specs_on("cuda")
    loads = {k: (s.path, s.precision, s.skip_padding, s.kernels, s.compiled, s.reference)
             for k, s in {**cpu, **cuda}.items() if k.startswith(("sensimix", "bert-runtime"))}
    assert loads["sensimix-2+1-fp32"] == ("sm21", "fp32", None, (None, None), False, None)
    assert loads["sensimix-2+1-fast-padded"] == ("sm21", "fast", False, (None, None), False, "sensimix-2+1-fp32")
    assert loads["sensimix-2+1-fp32-8bit-dense"] == ("sm21", "fp32", None, (None, "dense"), False, "sensimix-2+1-fp32")
    assert loads["sensimix-2+1-fp32-1bit-float"] == ("sm21", "fp32", None, ("float", None), False, "sensimix-2+1-fp32")
    assert loads["sensimix-2+1-fp32-8bit-bf16x3"] == ("sm21", "fp32", None, (None, "bf16x3"), False,
                                                      "sensimix-2+1-fp32")
    assert loads["sensimix-2+1-fp16-compiled"] == ("sm21", "fp16", None, (None, None), True, "sensimix-2+1-fp32")
    assert loads["sensimix-3+3-fast"] == ("sm33", "fast", None, (None, None), False, "sensimix-3+3-fp32")
    assert loads["bert-runtime-fp32-skip"] == ("bert-packed", "fp32", None, (None, None), False, None)
    assert cpu["sensimix-3+3-fast"].name == "SensiMix (3+3) fast" and cpu["bert-fp32"].name == (
        "BERT-base fp32 (certified baseline)")


def test_a_sensimix_variant_is_one_line(monkeypatch):
    # what the next precision or kernel costs: one Variant in the table
    extra = Variant("fast-int8", "fast, int8 activations", "fast", index8_kernel="int8")
    monkeypatch.setattr(rows, "SENSIMIX_MODELS", (SensiMixModel(3, 2, (*EVERY_VARIANT, extra)), SensiMixModel(6, 3)))
    keys = list(specs_on("cpu"))
    fp32_rows = [k for k in cpu_bench_rows() if "-a8" not in k]
    assert keys == [*fp32_rows[:-2], "sensimix-2+1-fast-int8", "sensimix-3+3-fp32", "sensimix-3+3-fast"]
    spec = specs_on("cpu")["sensimix-2+1-fast-int8"]
    assert (spec.name, spec.kernels, spec.reference) == ("SensiMix (2+1) fast, int8 activations", (None, "int8"),
                                                         "sensimix-2+1-fp32")
    assert "sensimix-2+1-fast-int8" in row_keys()  # --rows can pick it
    # a row that names a kernel is listed only where the kernel runs
    monkeypatch.setitem(kernels.INDEX8_KERNELS, "int8", SimpleNamespace(unavailable=lambda device: "not here"))
    assert "sensimix-2+1-fast-int8" not in specs_on("cpu")


def test_a_variant_naming_an_unknown_kernel_is_one_clear_error():
    with pytest.raises(ValueError, match=r"^variant 'a8': no 8-bit kernel 'int4'; the kernels: dense, dequant, "):
        Variant("a8", "a8", "fast", index8_kernel="int4")
    with pytest.raises(ValueError, match=r"^variant 'x': no 1-bit kernel 'nope'; the kernels: fp8, int8, "):
        Variant("x", "x", "fp32", binary_kernel="nope")


def test_variants_listed_by_device_and_compile():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    fp16 = Variant("fp16", "fp16", "fp16", only_on="cuda")
    compiled = Variant("fp16-compiled", "fp16, torch.compile", "fp16", compiled=True, only_on="cuda")
    assert not fp16.listed(cpu) and not compiled.listed(cpu)
    if not CUDA:  # listing a CUDA run's rows: CUDA-only rows without the kernel check
        assert fp16.listed(cuda) and compiled.listed(cuda) and not compiled.listed(cuda, compiled=False)
    int16 = Variant("fp32-8bit-int16", "int16", "fp32", index8_kernel="int16")
    assert not int16.listed(cuda), "int16 runs on CPU only: never a CUDA row"


def test_rows_selected_by_patterns_keep_the_baseline_first():
    specs = model_specs(Path("bert"), "BERT-base", FOLDERS, {}, None, "cpu", 4)
    keys = [s.key for s in select_rows(specs, ["bert3-ort-int8-bucketed", "sensimix-2+1-fp32*"])]
    assert keys[:2] == ["bert-fp32", "bert3-ort-int8-bucketed"], "the baseline always runs: every % is relative to it"
    assert set(keys[2:]) == {k for k in cpu_bench_rows() if k.startswith("sensimix-2+1-fp32")}
    assert select_rows(specs, None) == specs
    assert unmatched_patterns(["bert3-*", "nope", "sensimix-2+1-fp16-compiled"]) == ["nope"]  # CUDA keys count


def test_geometry_label():
    assert geometry_label(SimpleNamespace(num_hidden_layers=12, hidden_size=768)) == "BERT-base"
    assert geometry_label(SimpleNamespace(num_hidden_layers=6, hidden_size=128)) == "BERT 6L/128H"
