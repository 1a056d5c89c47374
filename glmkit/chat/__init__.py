"""Chat and tools (GLM-4 All Tools): message formats, tool calling, the tools themselves (user
functions, the browser, the python sandbox) and the agent loop.

Imports `glmkit.errors`, `glmkit.data`, `glmkit.model`, `glmkit.checkpoint`, `glmkit.infer`.
"""
