"""`glmkit corpus build|info`: build a tokenized corpus (default: the bilingual one) or summarise one.

    glmkit corpus build                               # the default bilingual corpus in data/default
    glmkit corpus build notes/ books.jsonl --out data/mine --vocab-size 8000
    glmkit corpus info data/mine

Also home of the input options shared with `glmkit tokenizer train` (`add_source_arguments`,
`sources_from_args`) and of `load_tokenizer`, which accepts what users point at (a tokenizer.json,
a folder holding one, a corpus, a checkpoint or a run directory).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from glmkit.cli.options import fraction, positive_int, warn
from glmkit.data.corpus import DEFAULT_ROOT, DEFAULT_VAL_FRACTION, Corpus, build_corpus, train_tokenizer
from glmkit.data.sources import Source, chosen_sources
from glmkit.data.tokenizer import DEFAULT_VOCAB_SIZE, GLMTokenizer
from glmkit.errors import GlmkitError


# ---------------------------------------------------------------------------- shared with `tokenizer train`
def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that choose documents, shared by `glmkit corpus build` and `glmkit tokenizer train`."""
    g = parser.add_argument_group("inputs (none given: the default bilingual corpus)")
    g.add_argument("inputs", nargs="*", metavar="PATH",
                   help="text files (one document each), .jsonl files (one per line) or folders of them")
    g.add_argument("--hf-dataset", action="append", default=[], metavar="NAME_OR_DIR",
                   help="a Hugging Face dataset: a save_to_disk folder or a cached dataset name (repeatable)")
    g.add_argument("--hf-split", default="train", help="split of --hf-dataset to read (default: train)")
    g.add_argument("--hf-config", default=None, help="configuration name of --hf-dataset")
    g.add_argument("--text-field", default="text", help="JSONL field / dataset column holding the text")
    g.add_argument("--split-blank-lines", action="store_true",
                   help="in text files, every blank-line-separated block is a document")
    g.add_argument("--skip-bad-files", action="store_true",
                   help="skip (and count in the manifest) unreadable or non-UTF-8 files and bad JSONL lines "
                        "instead of stopping")
    g.add_argument("--with-default", action="store_true", help="add the default bilingual corpus to the inputs")
    g.add_argument("--licence", default="user-provided (licence not stated)",
                   help="licence recorded in the manifest for the given inputs")


def sources_from_args(args: argparse.Namespace) -> list[Source]:
    for path in args.inputs:
        if not Path(path).exists():
            raise GlmkitError(f"input {path} does not exist; give text files, .jsonl files or folders of them")
    return chosen_sources(args.inputs, args.hf_dataset, with_default=args.with_default, text_field=args.text_field,
                          split_blank_lines=args.split_blank_lines, skip_bad_files=args.skip_bad_files,
                          hf_split=args.hf_split, hf_config=args.hf_config, licence=args.licence)


def load_tokenizer(path: str, option: str = "--tokenizer") -> GLMTokenizer:
    """A tokenizer from a tokenizer.json, a folder holding one (a corpus), or a checkpoint / run directory
    (the latest checkpoint's)."""
    p = Path(path)
    if not p.exists():
        raise GlmkitError(f"{option} {path} does not exist; give a tokenizer.json, a corpus folder or a "
                          "checkpoint / run directory")
    if p.is_file() or (p / "tokenizer.json").is_file():
        try:
            return GLMTokenizer.load(p)
        except GlmkitError as e:
            raise GlmkitError(f"{option}: {e}") from None
    from glmkit.checkpoint.store import latest_checkpoint
    for root in (p, p / "checkpoints"):
        found = latest_checkpoint(root) if root.is_dir() else None
        if found is not None and (found / "tokenizer.json").is_file():
            return GLMTokenizer.load(found)
    raise GlmkitError(f"{option} {path} holds no tokenizer.json (nor a checkpoint with one); give a "
                      "tokenizer.json, a corpus folder or a checkpoint / run directory")


def warn_small_vocab(verb: str, tokenizer: GLMTokenizer, asked: int) -> None:
    if tokenizer.vocab_size < asked:
        warn(verb, f"the tokenizer has {tokenizer.vocab_size} tokens, fewer than --vocab-size {asked}: the text "
                   "holds no more merges that occur at least twice; give more text or a smaller --vocab-size")


# ---------------------------------------------------------------------------- the verb
def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = sub.add_parser("build", help="tokenize documents into a corpus (no inputs: the default bilingual one)")
    add_source_arguments(p)
    p.add_argument("--out", default=None, help=f"corpus directory (default: {DEFAULT_ROOT} for the default "
                                               "corpus, data/corpus otherwise)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json, a folder holding one, or a checkpoint / run directory; default: train "
                        "one on the inputs' train split")
    p.add_argument("--vocab-size", type=positive_int, default=DEFAULT_VOCAB_SIZE, help="when training the tokenizer")
    p.add_argument("--val-fraction", type=fraction, default=DEFAULT_VAL_FRACTION,
                   help=f"documents held out for validation (default {DEFAULT_VAL_FRACTION})")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    p.add_argument("--force", action="store_true", help="rebuild even if the corpus exists")
    q = sub.add_parser("info", help="summarise a corpus's manifest")
    q.add_argument("directory", nargs="?", default=DEFAULT_ROOT)


def run(args: argparse.Namespace) -> int:
    if args.action == "info":
        print(Corpus.open(args.directory).summary())
        return 0
    is_default = not (args.inputs or args.hf_dataset) and args.tokenizer is None
    out = Path(args.out or (DEFAULT_ROOT if is_default else "data/corpus"))
    if out.is_file():
        raise GlmkitError(f"--out {out} is a file; give a folder for the corpus")
    if out.exists() and not args.force:
        corpus = Corpus.open(out)
        print(f"{out} exists (pass --force to rebuild it):")
        print(corpus.summary())
        return 0
    sources = sources_from_args(args)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer is not None else None
    if tokenizer is None:
        print(f"training a {args.vocab_size}-token tokenizer on {[s.name for s in sources]} ...", file=sys.stderr)
        tokenizer = train_tokenizer(sources, args.vocab_size, args.val_fraction, args.seed)
        warn_small_vocab("corpus build", tokenizer, args.vocab_size)
    corpus = build_corpus(sources, tokenizer, out, args.val_fraction, args.seed, overwrite=args.force,
                          log=lambda line: print(line, file=sys.stderr, flush=True))
    print(corpus.summary())
    if corpus.num_documents("val") == 0:
        warn("corpus build", f"0 of {corpus.num_documents('train')} documents went to the validation split "
                             f"(--val-fraction {args.val_fraction}), so training will log no validation loss; "
                             "raise --val-fraction, give more documents, or use --split-blank-lines")
    return 0
