"""Pretraining and chat fine-tuning: options and run set-up, chat data (`chat_data`: conversations rendered,
labelled and packed for `glmkit sft`), RL from outcomes (`rl`: group sampling from an episode source,
group-relative advantages, advantage-weighted token losses for `glmkit rl`), the data prefetcher (which builds the mask metadata and loss
positions on the host), the training loop, distributed wrapping (the only user of `torch.distributed`),
metrics and loss-curve plots.

Imports `glmkit.data`, `glmkit.model`, `glmkit.checkpoint` (and `glmkit.infer` / `glmkit.chat` for
chat fine-tuning and tool-use RL).
"""
