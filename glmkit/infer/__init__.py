"""Inference: sampling, the engine (token ids in, token ids out) and the text API over it (infill,
generate, stream).

Imports `glmkit.data`, `glmkit.model`, `glmkit.checkpoint`.
"""
