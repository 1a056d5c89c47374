"""Weights on disk: glmkit checkpoint folders (atomic, verified), the HF transformers format, and the
conversion between them.

Imports `glmkit.data` (tokenizers travel with weights) and `glmkit.model`.
"""
