"""The GLUE table (issue 25): the fp32 reference, SensiMix (3+3) and (2+1) with fp32 and A8 activations, and the
recipe's ablation, trained over seeds on the GLUE tasks with train splits, scored on their dev splits through the
packed runtime, one results line per finished run. ``scripts/glue_table.py`` parses, prints and writes.

Modules, top to bottom: :mod:`.runner` (one session: references reused or fine-tuned, SensiMix compressed and
scored, the progress and the time left), :mod:`.summary` (the table, A8 vs fp32, the gaps, the ablation and the
goals from a results file), :mod:`.chart` (score vs model size), :mod:`.results` (the results file: atomic writes,
a cut last line tolerated, a foreign file refused), :mod:`.plans` (runs, named plans, protocols, run keys) and
:mod:`.metrics` (accuracy, F1, Matthews correlation). Guide: docs/glue.md.
"""
