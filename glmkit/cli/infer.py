"""`glmkit infill` and `glmkit generate`: fill blanks in text, or continue a prompt, with a model.

    glmkit infill runs/demo "北京是中国的[MASK]。" --temperature 0.8 --top-p 0.9 --seed 1
    glmkit generate runs/demo "In the beginning" --max-new-tokens 40
    glmkit generate runs/demo --file prompts.txt --no-stream      # one prompt a line, decoded as one batch

A single prompt streams its text as it is produced (each blank under its own heading for `infill`);
several prompts, or `--no-stream`, print each result when complete.
"""

from __future__ import annotations

import argparse

from glmkit.cli.options import (
    add_memory_arguments,
    check_device,
    existing_dir,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    probability,
    read_text_file,
)
from glmkit.errors import GlmkitError

BLANKS = ("[MASK]", "[sMASK]", "[gMASK]")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    generation = parser.prog.endswith("generate")
    parser.set_defaults(generation=generation)
    parser.add_argument("checkpoint", type=existing_dir,
                        help="a glmkit run / checkpoint directory, or an HF GLM-4 folder")
    parser.add_argument("text", nargs="*", help="prompts (one row each; several are decoded as one batch)"
                        + ("" if generation else ": put [MASK] / [sMASK] / [gMASK] where the blanks go"))
    parser.add_argument("--file", help="read prompts from this UTF-8 file, one per line")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64, help="per blank")
    parser.add_argument("--temperature", type=nonnegative_float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=nonnegative_int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=probability, default=1.0, help="1 = off")
    parser.add_argument("--repetition-penalty", type=positive_float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--causal", action="store_true", default=None,
                        help="read the prompt causally and continue it (default: on for CLM-trained and HF models)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    add_memory_arguments(parser)
    parser.add_argument("--no-stream", action="store_true", help="print each result when complete")
    parser.add_argument("--max-len", type=positive_int, default=None,
                        help="KV slots per prompt: prompt and fills (default: the model's context, at most 4096)")
    parser.add_argument("--prefill-chunk", type=positive_int, default=512,
                        help="most prompt tokens fed per forward: bounds prefill memory (default 512)")


def prompts_of(args: argparse.Namespace) -> list[str]:
    texts = list(args.text)
    if args.file:
        texts += [ln for ln in read_text_file(args.file, "--file").splitlines() if ln.strip()]
    if not texts:
        raise GlmkitError("no prompt given: pass text after the checkpoint or --file PROMPTS.txt")
    if any(not s for s in args.stop):
        raise GlmkitError("--stop '' is empty and would end every blank at once; give the text to stop at")
    if args.generation:
        blank = next((b for t in texts for b in BLANKS if b in t), None)
        if blank is not None:
            raise GlmkitError(f"the prompt holds {blank}: `glmkit generate` continues text after its end; to fill "
                              "blanks inside the text use `glmkit infill` with the same arguments")
    return texts


def run(args: argparse.Namespace) -> int:
    from glmkit.checkpoint.loader import load
    from glmkit.infer.engine import Engine
    from glmkit.infer.sampling import SamplingConfig
    from glmkit.infer.text import assemble, encode_prompts, run_fill, stream
    texts = prompts_of(args)
    check_device(args.device)
    cfg = SamplingConfig(args.temperature, args.top_k, args.top_p, args.repetition_penalty,
                         args.max_new_tokens, args.seed)
    loaded = load(args.checkpoint, args.device, quantize=args.quantize)
    model, tok, objective = loaded.model, loaded.tokenizer, loaded.objective
    causal = objective == "clm" if args.causal is None else args.causal
    if causal and not args.generation:
        raise GlmkitError("a causal (CLM-trained or HF) model cannot fill blanks; use `glmkit generate`")
    engine = Engine(model, tok, max_batch=len(texts), max_len=args.max_len, prefill_chunk=args.prefill_chunk,
                    kv_dtype=args.kv_dtype)
    kw = dict(generation=args.generation, causal=causal, stop=args.stop, engine=engine)
    if args.no_stream or len(texts) > 1:
        for f in run_fill(model, tok, texts, cfg, **kw):
            print(f.fills[-1] if args.generation else f.text)
        return 0
    if args.generation:
        for piece in stream(model, tok, texts, cfg, **kw):
            print(piece.text, end="", flush=True)
        print()
        return 0
    prompt = encode_prompts(texts, tok, False, causal)[0]
    fills, last = [""] * len(prompt.blanks), None
    for piece in stream(model, tok, texts, cfg, **kw):     # each fill as it is produced, then the whole text
        if piece.blank != last:
            print(("\n" if last is not None else "") + f"[blank {piece.blank + 1}] ", end="", flush=True)
            last = piece.blank
        print(piece.text, end="", flush=True)
        fills[piece.blank] += piece.text
    print(("\n" if last is not None else "") + assemble(prompt, fills, tok))
    return 0
