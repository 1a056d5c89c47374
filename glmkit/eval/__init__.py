"""Evaluation: tasks built from held-out text, scoring of candidates, the evaluation suite and the
GLM vs MLM vs CLM experiment; the tool-use task suite (`tooltasks`: generators, disjoint splits,
checkers), its SFT conversations played out on the real tools (`toolsft`), the tool-use evaluation
(`tooleval`: held-out tasks through the real agent loop, with and without tools) and its RL episodes,
attempts through the agent loop rewarded by the checked answer (`toolrl`); the demo's tool-use stage
(`tooldemo`: the suite, fine-tuning the demo model on it, the before/after table and a transcript).

Imports `glmkit.data`, `glmkit.model`, `glmkit.checkpoint`, `glmkit.infer`, `glmkit.chat`, `glmkit.train`.
"""
