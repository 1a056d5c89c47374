"""`glmkit serve`: an OpenAI-compatible HTTP server over the inference engine (docs/serve.md).

- `protocol`: the OpenAI request / response / chunk / error shapes as pydantic models;
- `engine_loop`: the background thread that steps the `Engine` and routes outputs to asyncio queues;
- `chat`: chat completions (prompt, tool_choice, parsing, the response and its stream);
- `completions`: plain completions and filling [MASK] / [sMASK] / [gMASK] blanks;
- `tools`: server-side tools (`--tools python,browser`): a toolbox per conversation, requests in rounds;
- `metrics`: counters and the time-to-first-token histogram in Prometheus text;
- `app`: the FastAPI routes, errors, API key, streaming, disconnects.

Needs the `serve` extra (fastapi, uvicorn). Imports `glmkit.errors`, `infer`, `chat`; never `bench`
or `cli`.
"""
