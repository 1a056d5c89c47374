"""The GLM transformer of every generation: `GLMConfig` and presets, the model, attention backends,
mixture of experts and the static KV cache with its prefill / decode steps.

Imports only `glmkit.errors` and `glmkit.batch`. Written for one device; parallelism and compilation
are applied from outside, and run-time choices (attention backend, Flex kernel options, MoE
implementation) are set on each model (`GLM.set_runtime`), never kept in module globals or the config.
"""
