"""Benchmarks, outside the installed core namespace: `python -m bench SUITE` or `freezeflow bench SUITE`.

harness (settings, contenders, reports, the recipes/loader/limit suites), peers (fastai, Lightning),
quality (accuracy on real photo sets), sweep, gpu; study_defaults (the issue-15 defaults study)."""
