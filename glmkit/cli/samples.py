"""`glmkit samples`: print what each objective makes of real English and Chinese text.

    glmkit samples --length 40 --per-language 2 --table
"""

from __future__ import annotations

import argparse

import numpy as np

from glmkit.cli.options import existing_dir, positive_int
from glmkit.data.objective_config import ObjectiveConfig, SpecialIds
from glmkit.data.objectives import CLM, GMASK, KIND_NAMES, MASK, MLM, SMASK
from glmkit.data.samples import TITLES, make, pick_pieces, show
from glmkit.errors import GlmkitError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", default=None, type=existing_dir,
                        help="corpus folder (default: the default bilingual corpus, built on first use)")
    parser.add_argument("--length", type=positive_int, default=48, help="tokens of text per sample (default 48)")
    parser.add_argument("--per-language", type=positive_int, default=1, help="samples per objective and language")
    parser.add_argument("--layout", choices=("glm", "span"), default="glm")
    parser.add_argument("--no-shuffle", action="store_true", help="Part B spans left to right")
    parser.add_argument("--table", action="store_true", help="also print every position as a row")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from glmkit.data.corpus import Corpus, default_corpus
    if args.length < 8:
        raise GlmkitError(f"--length {args.length} is too short to mask 15% of it; use at least 8")
    if args.corpus is None:
        print("opening the default corpus (built on first use: a minute or two) ...")
        corpus = default_corpus()
    else:
        corpus = Corpus.open(args.corpus)
    tok = corpus.tokenizer
    specials = SpecialIds.from_tokenizer(tok)
    rng = np.random.default_rng(args.seed)
    pieces = pick_pieces(corpus, args.length, args.per_language, rng)
    if not pieces:
        raise GlmkitError(f"no document in {corpus.directory} is longer than {args.length} tokens; use a smaller --length")
    cfg = ObjectiveConfig(layout=args.layout, shuffle_spans=not args.no_shuffle)
    print(f"corpus {corpus.directory}; tokenizer {tok!r}; {args.length}-token pieces; layout {args.layout}, "
          f"Part B {'left to right' if args.no_shuffle else 'in random span order'}")
    for kind in (MASK, SMASK, GMASK, MLM, CLM):
        print(f"\n=== {TITLES[kind]}")
        for lang, ps in pieces.items():
            for s in make(kind, ps, cfg, specials, rng):
                used = KIND_NAMES[s["kind"]]
                note = f" (no whole sentence fitted: built as {used})" if used != KIND_NAMES[kind] else ""
                print(f"--- {lang}{note}")
                print(show(s, tok, specials, args.table))
    return 0
