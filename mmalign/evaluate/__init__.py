"""Evaluation: one runner (`runner.py`) and one module per benchmark family (toy world, CHAIR,
POPE, VQA, MME, multiple choice), Markdown + PNG reports, and the lmms-eval adapter."""
