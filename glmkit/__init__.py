"""glmkit: the GLM family of language models in PyTorch.

Autoregressive blank-infilling pretraining (GLM, MLM and CLM in one batch structure), the GLM
transformer and its generations with HF checkpoint interop, blank-infilling inference and evaluation.
"""

__version__ = "0.1.0"
