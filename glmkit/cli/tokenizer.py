"""`glmkit tokenizer train|encode|decode|info`: the bilingual byte-level BPE from the command line.

    glmkit tokenizer train notes/ --out data/tokenizer --vocab-size 8000
    glmkit tokenizer encode "北京是中国的首都" --tokenizer runs/demo
    glmkit tokenizer decode 9906 11 1917
    glmkit tokenizer info --tokenizer data/default
"""

from __future__ import annotations

import argparse
import sys
import time

from glmkit.cli.corpus import add_source_arguments, load_tokenizer, sources_from_args, warn_small_vocab
from glmkit.cli.options import fraction, positive_int
from glmkit.data.tokenizer import DEFAULT_VOCAB_SIZE, GLM45_TOKENS, GLM_SPECIALS
from glmkit.errors import GlmkitError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = sub.add_parser("train", help="train a byte-level BPE on the default corpus or your files")
    add_source_arguments(p)
    p.add_argument("--out", default="data/tokenizer", help="directory to write tokenizer.json into")
    p.add_argument("--vocab-size", type=positive_int, default=DEFAULT_VOCAB_SIZE)
    p.add_argument("--val-fraction", type=fraction, default=0.05,
                   help="documents held out of training (and used to report characters per token)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    for name, help_text in (("encode", "show the tokens of a text"), ("decode", "turn token ids into text"),
                            ("info", "vocabulary size, hash and special token ids")):
        q = sub.add_parser(name, help=help_text)
        q.add_argument("--tokenizer", default="data/default",
                       help="tokenizer.json, a folder holding one (a corpus), or a checkpoint / run directory "
                            "(default: the default corpus's)")
        if name == "encode":
            q.add_argument("text", help="text to encode ('-' reads stdin)")
            q.add_argument("--allow-special", action="store_true", help="match special tokens in the text")
        elif name == "decode":
            q.add_argument("ids", nargs="+", type=int, metavar="ID")
            q.add_argument("--skip-special", action="store_true")


def run(args: argparse.Namespace) -> int:
    if args.action == "train":
        return _train(args)
    tok = load_tokenizer(args.tokenizer)
    if args.action == "encode":
        text = _stdin_text() if args.text == "-" else args.text
        ids = tok.encode(text, allow_special=args.allow_special)
        print(" ".join(map(str, ids)))
        print(" ".join(repr(p) for p in tok.pieces(ids)))
        print(f"{len(text)} characters -> {len(ids)} tokens")
    elif args.action == "decode":
        bad = [i for i in args.ids if not 0 <= i < tok.vocab_size]
        if bad:
            raise GlmkitError(f"ID {', '.join(map(str, bad[:5]))} out of range: the ids of this tokenizer are "
                              f"0..{tok.vocab_size - 1}")
        print(tok.decode(args.ids, skip_special=args.skip_special))
    else:
        print(f"{args.tokenizer}: {tok!r}\nhash {tok.hash}\npad_id {tok.pad_id}")
        for name, text in GLM_SPECIALS.items():
            print(f"{name + '_id':<16}{getattr(tok, name + '_id'):>8}  {text}")
        glm45 = {t: tok.special_id(t) for t in GLM45_TOKENS}
        if all(i is not None for i in glm45.values()):
            print("GLM-4.5 chat tokens: " + " ".join(f"{t}={i}" for t, i in glm45.items()))
        else:
            print("GLM-4.5 chat tokens: absent (the glm45 chat format cannot be used with this tokenizer)")
        print(f"sentence-ending tokens: {len(tok.sentence_end_ids)}")
    return 0


def _stdin_text() -> str:
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise GlmkitError(f"the text on stdin (TEXT '-') is not valid UTF-8 (byte {e.start}: "
                          f"{data[e.start:e.start + 4]!r}); convert it, e.g. `iconv -f GB18030 -t UTF-8`") from None


def _train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from glmkit.data.corpus import split_of, train_tokenizer
    out = Path(args.out)
    if out.is_file() and out.suffix != ".json":
        raise GlmkitError(f"--out {args.out} is a file; give a folder (tokenizer.json is written into it) or a "
                          "path ending in .json")
    sources = sources_from_args(args)
    start = time.perf_counter()
    tok = train_tokenizer(sources, args.vocab_size, args.val_fraction, args.seed)
    seconds = time.perf_counter() - start
    print(f"trained {tok!r} on {[s.name for s in sources]} in {seconds:.1f} s -> {tok.save(args.out)}")
    warn_small_vocab("tokenizer train", tok, args.vocab_size)
    for src in sources:  # characters per token on the held-out documents
        val = [d.text for d in src if d.text.strip() and split_of(d, args.val_fraction, args.seed) == "val"]
        n = sum(len(ids) for ids in tok.encode_batch(val))
        if n:
            print(f"  {src.name}: {sum(map(len, val)) / n:.2f} characters/token on {len(val)} held-out documents")
    return 0
