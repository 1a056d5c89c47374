"""`glmkit convert`: HF transformers checkpoints <-> glmkit checkpoints.

    glmkit convert --from-hf HF_DIR --out DIR [--dtype bf16]         # HF -> glmkit
    glmkit convert --to-hf CKPT --out HF_DIR [--max-shard-size 5GB]   # glmkit -> HF

--to-hf of a model with a tokenizer and no tokenizer_config.json of its own (a glmkit-trained one)
also writes tokenizer_config.json (the chat template of --chat-format, the special tokens) and
generation_config.json (the stop ids), so transformers, vLLM and SGLang chat with it unchanged
(`glmkit.chat.hf_files`). A converted HF model keeps the files it came with.
"""

from __future__ import annotations

import argparse
import time

from glmkit.checkpoint.convert import DTYPES, from_hf_folder, to_hf_folder
from glmkit.cli.options import existing_dir, folder_to_write


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="DIR", type=existing_dir,
                     help="HF checkpoint folder (GlmForCausalLM, Glm4ForCausalLM or Glm4MoeForCausalLM: config.json "
                          "+ safetensors) to convert into a glmkit checkpoint")
    src.add_argument("--to-hf", metavar="DIR", type=existing_dir,
                     help="glmkit checkpoint (or run) directory to convert into an HF checkpoint folder")
    parser.add_argument("--out", required=True, metavar="DIR", type=folder_to_write,
                        help="output folder (created; an existing one must be empty unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="write into an --out folder that already holds files")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="weight dtype of the output (default: that of the source; the MoE router stays fp32)")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="--to-hf: largest safetensors shard, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    parser.add_argument("--chat-format", choices=("auto", "glm4", "glm45"), default="auto",
                        help="--to-hf: the chat template written for a glmkit-trained model (auto: glm45 when its "
                             "tokenizer has GLM-4.5's tokens, as `glmkit chat` and `glmkit serve` choose, else glm4)")


def chat_files(model, out: str, chat_format: str) -> tuple[str, list[str]]:
    """The chat template and stop ids for an exported model whose tokenizer came without them."""
    from pathlib import Path

    from glmkit.chat.hf_files import write_chat_files
    from glmkit.data.tokenizer import GLMTokenizer
    out = Path(out)
    if not (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file():
        return "", []
    tok = GLMTokenizer.load(out / "tokenizer.json")
    fmt = chat_format
    if fmt == "auto":        # as `glmkit chat` / `glmkit serve` choose: glm45 when the tokenizer can spell it
        fits = [f for f in ("glm45", "glm4") if _has_tokens(f, tok)]
        if not fits:
            return "", []
        fmt = fits[0]
    return fmt, write_chat_files(out, fmt, tok, model.config.max_position_embeddings)


def _has_tokens(fmt: str, tok) -> bool:
    from glmkit.chat.render import stop_ids
    from glmkit.errors import GlmkitError
    try:
        stop_ids(fmt, tok)
        return True
    except GlmkitError:
        return False


def run(args: argparse.Namespace) -> int:
    from glmkit.checkpoint.hf import parse_size
    from glmkit.errors import GlmkitError
    from glmkit.model.config import human
    try:
        parse_size(args.max_shard_size)
    except GlmkitError:
        raise GlmkitError(f"--max-shard-size {args.max_shard_size!r} is not a size; write e.g. 5GB, 500MB, 2GiB "
                          "or a byte count") from None
    dtype = DTYPES[args.dtype] if args.dtype else None
    t0 = time.perf_counter()
    if args.from_hf:
        src, direction = args.from_hf, "HF -> glmkit"
        model = from_hf_folder(src, args.out, dtype, overwrite=args.overwrite)
    else:
        src, direction = args.to_hf, "glmkit -> HF"
        model = to_hf_folder(src, args.out, dtype, args.max_shard_size, overwrite=args.overwrite)
        fmt, written = chat_files(model, args.out, args.chat_format)
        if written:
            print(f"wrote {' and '.join(written)} (the {fmt} chat template, its stop ids) for transformers / vLLM")
    n = sum(p.numel() for p in model.parameters())
    print(f"{direction}: {model.config.name} ({human(n)} parameters, {model.embed_tokens.weight.dtype}) "
          f"from {src} to {args.out} in {time.perf_counter() - t0:.1f}s")
    return 0
