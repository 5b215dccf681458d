"""Verification & validation: the KOTCA KST-21-049 criteria measured, judged and reported.

Layers, top to bottom: :mod:`.run` (one V&V run: settings, folders, sizes, timing, accuracy, report), the
measurements (:mod:`.sizes`, :mod:`.timing`, :mod:`.accuracy`, built on :mod:`sensimix.measure`), the judgement
(:mod:`.criteria`), the writers (:mod:`.report`) and the procedure's constants (:mod:`.procedure`).
"""

from .accuracy import AccuracyReport, AccuracySettings, Agreement
from .criteria import Criterion, Report
from .procedure import BERT_FP16, BERT_FP32, CRITERION_IDS, SCHEMA, SENSIMIX
from .report import load_history, render_markdown, write_chart, write_report
from .run import VVRun, VVSettings
from .sizes import SizeReport
from .timing import ModelTimer, TimingReport

__all__ = [
    "AccuracyReport", "AccuracySettings", "Agreement", "BERT_FP16", "BERT_FP32", "CRITERION_IDS", "Criterion",
    "ModelTimer", "Report", "SCHEMA", "SENSIMIX", "SizeReport", "TimingReport", "VVRun", "VVSettings",
    "load_history", "render_markdown", "write_chart", "write_report",
]
