"""Evaluation: tasks built from held-out text, scoring of candidates, the evaluation suite and the
GLM vs MLM vs CLM experiment; the tool-use task suite (`tooltasks`: generators, disjoint splits,
checkers) and its SFT conversations played out on the real tools (`toolsft`).

Imports `glmkit.data`, `glmkit.model`, `glmkit.checkpoint`, `glmkit.infer`, `glmkit.chat`, `glmkit.train`.
"""
