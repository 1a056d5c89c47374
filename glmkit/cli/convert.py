"""`glmkit convert`: HF transformers checkpoints <-> glmkit checkpoints.

    glmkit convert --from-hf HF_DIR --out DIR [--dtype bf16]         # HF -> glmkit
    glmkit convert --to-hf CKPT --out HF_DIR [--max-shard-size 5GB]   # glmkit -> HF
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
    n = sum(p.numel() for p in model.parameters())
    print(f"{direction}: {model.config.name} ({human(n)} parameters, {model.embed_tokens.weight.dtype}) "
          f"from {src} to {args.out} in {time.perf_counter() - t0:.1f}s")
    return 0
