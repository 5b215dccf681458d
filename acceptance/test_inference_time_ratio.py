"""KOTCA criterion 2: SensiMix inference time <= 20% of BERT fp32's (3 trials, mean of per-trial ratios).

One pytest-benchmark per model (``benchmark.pedantic``: one round = one certified trial over all examples,
warm-up batches before the first round, device synchronized inside ``run_inference``); the per-trial times stay
on the session's V&V run, the ratio tests judge them. Benchmark names carry the run id
(device-data-examples-precision) so ``--benchmark-compare`` pairs like with like. Only ratios measured in this
run are asserted, never absolute times.
"""

from __future__ import annotations

import pytest

from sensimix.vv.criteria import fp16_time_criterion, time_criterion
from sensimix.vv.procedure import BATCH_SIZE, BERT_FP16, BERT_FP32, MAX_SEQ_LENGTH, SENSIMIX
from sensimix.vv.timing import ModelTimer, TimingReport

pytestmark = pytest.mark.benchmark(group="kotca-inference", disable_gc=True)


def _extra_info(vv_run) -> dict:
    s, env = vv_run.s, vv_run.environment
    return {"device": s.device, "device_name": env["device_name"], "torch": env["torch"], "cuda": env["cuda"],
            "data": vv_run.batches[1], "num_examples": s.examples, "batch_size": BATCH_SIZE,
            "max_seq_length": MAX_SEQ_LENGTH, "trials": s.trials, "warmup_batches": s.warmup_batches}


def _benchmark(benchmark, vv_run, name: str) -> ModelTimer:
    timer = vv_run.timer(name)
    benchmark.extra_info.update(_extra_info(vv_run), model=name, precision=timer.precision)
    benchmark.pedantic(timer.trial, setup=timer.warm_up, rounds=vv_run.s.trials, warmup_rounds=0, iterations=1)
    benchmark.extra_info.update(trial_ms=timer.durations_ms, qnli_accuracy=timer.accuracy)
    counts = [r.num_examples for r in timer.results]
    assert counts == [vv_run.s.examples] * len(counts), f"{name} ran {counts} examples per trial"
    return timer


def _skip_unless_cuda(vv_run) -> None:
    if not vv_run.s.device.startswith("cuda"):
        pytest.skip(f"GPU only: the fp16 BERT baseline is timed on CUDA (this run: {vv_run.s.device}); "
                    "fp16 GEMMs on CPU are not what a CPU user deploys")


def test_bert_fp32_inference(benchmark, vv_run, kotca_run):
    _benchmark(benchmark, vv_run, BERT_FP32)


@pytest.mark.gpu
def test_bert_fp16_inference(benchmark, vv_run, kotca_run):
    _skip_unless_cuda(vv_run)
    _benchmark(benchmark, vv_run, BERT_FP16)


def test_sensimix_inference(benchmark, vv_run, kotca_run):
    timer = _benchmark(benchmark, vv_run, SENSIMIX)
    plan = timer.model.plan
    benchmark.extra_info.update(plan=plan.describe(), sensimix_file=str(timer.model.source_file))
    # the timed model is the one criterion 1 sized, in the precision the run asked for
    assert timer.model.source_file.name == "pytorch_model.bin"
    assert plan.precision == vv_run.s.sensimix_precision
    timing = vv_run.timing()
    for baseline in (BERT_FP32, BERT_FP16):
        ratios = timing.ratios(SENSIMIX, baseline)
        if ratios:  # the JSON history carries the judged figures beside the times
            benchmark.extra_info[f"ratio_vs_{baseline}"] = ratios
            benchmark.extra_info[f"mean_ratio_vs_{baseline}"] = timing.mean_ratio(SENSIMIX, baseline)


def _trial_table(timing: TimingReport, baseline: str) -> str:
    return "; ".join(f"trial {i + 1}: {t[baseline]:,.0f} ms vs {t[SENSIMIX]:,.0f} ms = "
                     f"{100 * t[SENSIMIX] / t[baseline]:.1f}%" for i, t in enumerate(timing.trials))


def test_inference_time_ratio(vv_run):
    timing = vv_run.time_all([BERT_FP32, SENSIMIX])  # times them here (interleaved) if the benchmarks did not
    c = time_criterion(timing)
    assert len(timing.ratios()) == vv_run.s.trials
    assert c.passed, (f"{c.title} on {timing.device} ({timing.data}): {c.format_value()} > "
                      f"{c.format_value(c.threshold)} ({_trial_table(timing, BERT_FP32)})")


@pytest.mark.gpu
def test_inference_time_ratio_vs_fp16(vv_run):
    """A goal beside the certificate (SensiMix <= 20% of the fp16 BERT users deploy): measured and reported
    always, a failing test only with --kotca-gate-fp16."""
    _skip_unless_cuda(vv_run)
    timing = vv_run.time_all([BERT_FP16, SENSIMIX])
    c = fp16_time_criterion(timing, vv_run.s.fp16_max_ratio, gated=vv_run.s.gate_fp16)
    assert len(timing.ratios(SENSIMIX, BERT_FP16)) == vv_run.s.trials
    message = (f"{c.title} on {timing.device}: {c.format_value()} > {c.format_value(c.threshold)} "
               f"({_trial_table(timing, BERT_FP16)})")
    if not c.passed and not c.gated:
        pytest.xfail(f"goal missed (not gated; pass --kotca-gate-fp16 to gate): {message}")
    assert c.passed, message
