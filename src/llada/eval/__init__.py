"""Evaluation: generated tasks with checkable answers (and, later, lm-eval and reversal-curse)."""
