"""The GLM transformer of every generation: `GLMConfig` and presets, the model, attention backends,
mixture of experts and the static KV cache with its prefill / decode steps.

Imports only `glmkit.errors` and `glmkit.batch`. Written for one device; parallelism, compilation and
run-time choices (attention backend, MoE implementation) are applied from outside.
"""
