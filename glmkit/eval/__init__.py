"""Evaluation: tasks built from held-out text, scoring of candidates, the evaluation suite and the
GLM vs MLM vs CLM experiment.

Imports `glmkit.data`, `glmkit.model`, `glmkit.checkpoint`, `glmkit.infer`, `glmkit.train`.
"""
