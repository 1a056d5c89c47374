"""Weights on disk: glmkit checkpoint folders (atomic, verified, one manifest writer), the HF
transformers format, the conversion between them, and the one model loader (`loader.load`).

Imports `glmkit.data` (tokenizers travel with weights) and `glmkit.model`.
"""
