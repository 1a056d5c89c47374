"""Pretraining: options and run set-up, the data prefetcher (which builds the mask metadata and loss
positions on the host), the training loop, distributed wrapping (the only user of `torch.distributed`),
metrics and loss-curve plots.

Imports `glmkit.data`, `glmkit.model`, `glmkit.checkpoint` (and `glmkit.infer` / `glmkit.chat` for
chat fine-tuning and tool-use RL).
"""
