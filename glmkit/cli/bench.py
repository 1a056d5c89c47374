"""`glmkit bench WHAT`: speed measured against a named peer in the same run.

    glmkit bench data                      # objective corruption + packing vs pure Python
    glmkit bench train --device cuda       # training steps vs HF transformers
    glmkit bench generate                  # decode tokens/s vs HF generate
    glmkit bench engine                    # 64 mixed requests: continuous batching vs HF's
    glmkit bench serve                     # glmkit serve vs transformers serve over HTTP, c = 1, 8, 32
    glmkit bench quantize runs/demo        # fp32 / bf16 / int8 / int4 weights, fp8 KV: memory, bits/byte, speed
    glmkit bench context                   # prefill + decode time and peak memory vs context length

Each prints its numbers as it measures them and, as its last line, one JSON object: the result dict
of `glmkit.bench.{data,train,generate,engine,serve,quantize,context}`. The bench modules are imported only when their bench runs.
"""

from __future__ import annotations

import argparse
import importlib
import json

from glmkit.cli.options import existing_dir, nonnegative_int, positive_float, positive_int

# benchmark -> (module, function, options dataclass, one-line help)
BENCHES: dict[str, tuple[str, str, str, str]] = {
    "data": ("glmkit.bench.data", "bench_data", "DataBench",
             "objective corruption + packing tokens/s per core vs a pure-Python GLM pipeline"),
    "train": ("glmkit.bench.train", "bench_train", "TrainBench",
              "training steps of a glmkit model vs the same HF transformers model"),
    "generate": ("glmkit.bench.generate", "bench_generate", "GenerateBench",
                 "decode tokens/s of glmkit vs HF transformers generate, same weights"),
    "engine": ("glmkit.bench.engine", "bench_engine", "EngineBench",
               "many mixed requests: glmkit's engine vs HF continuous batching vs HF generate one at a time"),
    "serve": ("glmkit.bench.serve", "bench_serve", "ServeBench",
              "glmkit serve vs transformers serve --continuous-batching over HTTP: tokens/s, p50/p99 latency, TTFT"),
    "quantize": ("glmkit.bench.quantize", "bench_quantize", "QuantizeBench",
                 "one checkpoint as fp32 / bf16 / int8 / int4 weights and with an fp8 KV cache: weight and KV "
                 "memory, validation bits/byte, decode tokens/s, ratios against bf16"),
    "context": ("glmkit.bench.context", "bench_context", "ContextBench",
                "prefill and decode time and peak memory against context length, glmkit vs HF transformers"),
}


def _data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", default="data/default", help="corpus folder (default: data/default); "
                   "synthetic Zipfian tokens when it does not exist")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--seq-len", type=positive_int, default=1024)
    p.add_argument("--tokens", type=positive_int, default=6_000_000,
                   help="text tokens to push through each objective, over all rounds (default 6M)")
    p.add_argument("--baseline-tokens", type=positive_int, default=900_000,
                   help="text tokens for the slower pure-Python baseline, over all rounds (default 900k)")
    p.add_argument("--rounds", type=positive_int, default=3, help="timed rounds per objective; the best counts (default 3)")
    p.add_argument("--seed", type=int, default=0)


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--preset", default=None, help="model preset (default: bench-338m on cuda, small on cpu)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="default: 16 on cuda, 4 on cpu")
    p.add_argument("--seq-len", type=positive_int, default=None, help="default: 1024 on cuda, 256 on cpu")
    p.add_argument("--steps", type=positive_int, default=None, help="timed steps per model (default: 20 cuda, 8 cpu)")
    p.add_argument("--warmup", type=nonnegative_int, default=None,
                   help="untimed steps first (default: 5 cuda/compile, 1 cpu)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (glmkit: per block)")
    p.add_argument("--objective", choices=["glm", "clm", "both"], default="glm")
    p.add_argument("--backend", default=None,
                   help="glmkit attention backend: auto | sdpa | flex | split (default: auto)")
    p.add_argument("--hf-arch", choices=["glm4", "glm"], default="glm4",
                   help="peer architecture for dense presets: Glm4ForCausalLM (sandwich) or GlmForCausalLM")
    p.add_argument("--no-hf", action="store_true", help="time glmkit only (ratio null)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loop-steps", type=nonnegative_int, default=10,
                   help="then time this many steps of the whole training loop (glmkit train on the default "
                        "corpus, data loading included) and report the data pipeline's share of step time (0: skip)")
    p.add_argument("--attention-table", action="store_true",
                   help="instead: fwd+bwd ms of each attention backend on GLM rows vs flash causal (CUDA)")
    p.add_argument("--flex-options", action="append", default=[], metavar="JSON",
                   help="with --attention-table: also time Flex with these kernel options (repeatable), e.g. "
                        "'{\"BLOCK_M\": 64, \"BLOCK_N\": 64}'; without it: the options every Flex call uses")


def _generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="small", help="model preset (glmkit.model.config PRESETS)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=positive_int, default=32)
    p.add_argument("--new-tokens", type=positive_int, default=128)
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--compile", action="store_true", help="compile the decode step (static cache)")
    p.add_argument("--seed", type=int, default=0)


def _engine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="small", help="model preset (glmkit.model.config PRESETS)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--requests", type=positive_int, default=64)
    p.add_argument("--min-prompt", type=positive_int, default=16)
    p.add_argument("--max-prompt", type=positive_int, default=512)
    p.add_argument("--min-new", type=positive_int, default=8)
    p.add_argument("--max-new", type=positive_int, default=128)
    p.add_argument("--max-batch", type=positive_int, default=32, help="glmkit engine rows (running requests)")
    p.add_argument("--prefill-chunk", type=positive_int, default=256, help="most prompt tokens fed per request per step")
    p.add_argument("--patterns", default="burst,spread", help="arrival patterns: burst (all at once), spread")
    p.add_argument("--no-sequential", dest="sequential", action="store_false",
                   help="skip HF generate one request at a time")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch threads for every side (default 1: steadier on a small shared CPU)")
    p.add_argument("--seed", type=int, default=0)


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, type=existing_dir, help="a glmkit checkpoint or run folder (default: a random-weight "
                   "model of --preset with a tokenizer trained on the King James Bible)")
    p.add_argument("--preset", default="small", help="model preset without --model (default small)")
    p.add_argument("--concurrency", default="1,8,32", help="client counts, comma-separated (default 1,8,32)")
    p.add_argument("--requests", type=positive_int, default=None,
                   help="requests per concurrency level (default: max(8, 2 x concurrency))")
    p.add_argument("--min-prompt", type=positive_int, default=32, help="user-message tokens, at least (default 32)")
    p.add_argument("--max-prompt", type=positive_int, default=256, help="user-message tokens, at most (default 256)")
    p.add_argument("--min-new", type=positive_int, default=32, help="max_tokens of a request, at least (default 32)")
    p.add_argument("--max-new", type=positive_int, default=128, help="max_tokens of a request, at most (default 128)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="OMP_NUM_THREADS (torch threads) of both servers (default 1)")
    p.add_argument("--no-hf", dest="hf", action="store_false", help="glmkit serve alone (no transformers serve)")
    p.add_argument("--timeout", type=positive_int, default=1200, help="seconds for the whole bench (default 1200)")
    p.add_argument("--seed", type=int, default=0)


def _context_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="small", help="model preset (max_position_embeddings raised to the longest length)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="float32", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768",
                   help="comma-separated context lengths in tokens (CUDA: up to 131072 and beyond)")
    p.add_argument("--prefill-chunk", type=positive_int, default=512, help="glmkit's prefill chunk (tokens)")
    p.add_argument("--part-a", action="store_true",
                   help="also time glmkit with the prompt as a bidirectional GLM Part A (layer-by-layer chunks)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads in each measuring process")
    p.add_argument("--time-budget", type=positive_float, default=600.0,
                   help="seconds: skip a side's lengths whose predicted prefill takes longer (default 600)")
    p.add_argument("--memory-budget", type=positive_int, default=16384,
                   help="MiB: skip a side's lengths whose predicted peak is larger (default 16384)")
    p.add_argument("--plot", default="context.png", help="PNG of the curves ('' for none)")
    p.add_argument("--seed", type=int, default=0)


def _quantize_arguments(p: argparse.ArgumentParser) -> None:
    from glmkit.bench.quantize import VARIANTS
    p.add_argument("checkpoint", type=existing_dir, help="a glmkit run or checkpoint folder (or an HF GLM folder)")
    p.add_argument("--corpus", default=None, help="the corpus the model was trained on (default: data/default)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--val-tokens", type=positive_int, default=20000, help="validation tokens scored per variant")
    p.add_argument("--window", type=positive_int, default=256, help="tokens per validation window")
    p.add_argument("--prompt-len", type=positive_int, default=32, help="decode: prompt tokens")
    p.add_argument("--new-tokens", type=positive_int, default=128, help="decode: greedy tokens per run")
    p.add_argument("--repeats", type=positive_int, default=3, help="decode: best of this many runs")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1: steadier on a shared CPU)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")


ARGUMENTS = {"data": _data_arguments, "train": _train_arguments, "generate": _generate_arguments,
             "engine": _engine_arguments, "serve": _serve_arguments, "quantize": _quantize_arguments,
             "context": _context_arguments}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="WHAT", required=True)
    for name, (*_, help_text) in BENCHES.items():
        ARGUMENTS[name](sub.add_parser(name, help=help_text, description=help_text))


def run(args: argparse.Namespace) -> int:
    from dataclasses import fields
    module_name, function, options, _ = BENCHES[args.bench]
    module = importlib.import_module(module_name)
    cls = getattr(module, options)
    opts = cls(**{f.name: getattr(args, f.name) for f in fields(cls)})
    result = getattr(module, function)(opts, log=lambda line: print(line, flush=True))
    print(json.dumps(result))
    return 0
