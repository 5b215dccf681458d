"""KOTCA criterion 2: SensiMix inference time <= 20% of BERT fp32's (3 trials, mean of per-trial ratios).

One pytest-benchmark per model (``benchmark.pedantic``: one round = one certified trial over all examples,
warm-up batches before the first round, device synchronized inside ``run_inference``); the per-trial times
go to a session collector, the ratio tests judge them. Benchmark names carry the run id
(device-data-examples) so ``--benchmark-compare`` pairs like with like. Only ratios measured in this run
are asserted, never absolute times.
"""

from __future__ import annotations

import pytest

from sensimix import kotca

pytestmark = pytest.mark.benchmark(group="kotca-inference", disable_gc=True)


def _benchmark(benchmark, kotca_state, kotca_timer, name: str) -> kotca.ModelTimer:
    timer = kotca_timer(name)
    benchmark.extra_info.update(kotca_state.extra_info(), model=name, precision=timer.precision)
    benchmark.pedantic(timer.trial, setup=timer.warm_up, rounds=kotca_state.trials, warmup_rounds=0, iterations=1)
    benchmark.extra_info.update(trial_ms=timer.durations_ms, qnli_accuracy=timer.accuracy)
    assert all(r.num_examples == kotca_state.examples for r in timer.results), (
        f"{name} ran {[r.num_examples for r in timer.results]} examples per trial, expected {kotca_state.examples}")
    return timer


def _skip_unless_cuda(kotca_state) -> None:
    if not kotca_state.device.startswith("cuda"):
        pytest.skip(f"GPU only: the fp16 BERT baseline is timed on CUDA (this run: {kotca_state.device}); "
                    "fp16 GEMMs on CPU are not what a CPU user deploys")


def test_bert_fp32_inference(benchmark, kotca_state, kotca_timer, kotca_run):
    _benchmark(benchmark, kotca_state, kotca_timer, kotca.BERT_FP32)


@pytest.mark.gpu
def test_bert_fp16_inference(benchmark, kotca_state, kotca_timer, kotca_run):
    _skip_unless_cuda(kotca_state)
    _benchmark(benchmark, kotca_state, kotca_timer, kotca.BERT_FP16)


def test_sensimix_inference(benchmark, kotca_state, kotca_timer, kotca_run):
    timer = _benchmark(benchmark, kotca_state, kotca_timer, kotca.SENSIMIX)
    timing = kotca_state.timing()
    for baseline in (kotca.BERT_FP32, kotca.BERT_FP16):
        ratios = timing.ratios(kotca.SENSIMIX, baseline)
        if ratios:  # the JSON history carries the judged figures beside the times
            benchmark.extra_info[f"ratio_vs_{baseline}"] = ratios
            benchmark.extra_info[f"mean_ratio_vs_{baseline}"] = timing.mean_ratio(kotca.SENSIMIX, baseline)
    assert timer.results


def _trial_table(timing: kotca.TimingReport, baseline: str) -> str:
    return "; ".join(f"trial {i + 1}: {t[baseline]:,.0f} ms vs {t[kotca.SENSIMIX]:,.0f} ms = "
                     f"{100 * t[kotca.SENSIMIX] / t[baseline]:.1f}%" for i, t in enumerate(timing.trials))


def test_inference_time_ratio(kotca_state, ensure_trials):
    ensure_trials([kotca.BERT_FP32, kotca.SENSIMIX])
    timing = kotca_state.timing()
    c = kotca.time_criterion(timing)
    assert c.passed, (f"{c.title} on {timing.device} ({timing.data}): {c.format_value()} > "
                      f"{c.format_value(c.threshold)} ({_trial_table(timing, kotca.BERT_FP32)})")


@pytest.mark.gpu
def test_inference_time_ratio_vs_fp16(kotca_state, ensure_trials):
    _skip_unless_cuda(kotca_state)
    ensure_trials([kotca.BERT_FP16, kotca.SENSIMIX])
    timing = kotca_state.timing()
    c = kotca.fp16_time_criterion(timing, kotca_state.fp16_max_ratio)
    assert c.passed, (f"{c.title} on {timing.device}: {c.format_value()} > {c.format_value(c.threshold)} "
                      f"({_trial_table(timing, kotca.BERT_FP16)})")
