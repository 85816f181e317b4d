"""Evaluation: the official scores, clinical metrics with confidence intervals, calibration,
fairness slices and the self-contained HTML report.

Submodules are imported lazily by their users: `metrics` and `calibration` need only numpy/scipy,
`report` pulls in matplotlib, so a serving process never pays for the reporting stack.
"""
