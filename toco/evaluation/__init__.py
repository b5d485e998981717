"""Evaluation: test-time protocols, pseudo-label export, server submissions, provenance and
HTML reports, driven by evaluate.py (toco.evaluation.run)."""
