"""Checks of command-line values shared by the verbs, so that every bad input is refused before any
work starts, with one line naming the option and the fix (issue 15 §3).

Two kinds:
- argparse `type=` functions (`positive_int`, `nonnegative_float`, ...): argparse reports their
  `ArgumentTypeError` as `glmkit VERB: error: argument --OPTION: MESSAGE` and exits with status 2;
- checks run on the parsed values (`check_device`, `read_text_file`, `check_output_file`, ...) raise
  `GlmkitError`, which `glmkit.cli.main` prints as one line with exit status 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from glmkit.errors import GlmkitError


# ---------------------------------------------------------------------------- argparse types
def _number(kind, text: str):
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def positive_int(text: str) -> int:
    value = _number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (got {value})")
    return value


def nonnegative_int(text: str) -> int:
    value = _number(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (got {value})")
    return value


def positive_float(text: str) -> float:
    value = _number(float, text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number (got {text})")
    return value


def nonnegative_float(text: str) -> float:
    value = _number(float, text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (got {text})")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1)."""
    value = _number(float, text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1), e.g. 0.05 (got {text})")
    return value


def existing_path(text: str) -> str:
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    return text


def existing_dir(text: str) -> str:
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist; give a folder")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; give a folder")
    return text


def existing_file(text: str) -> str:
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist; give a file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file")
    return text


def folder_to_write(text: str) -> str:
    """A folder that may exist or not, but is not a file."""
    if Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text} is a file; give a folder (it is created if missing)")
    return text


# ---------------------------------------------------------------------------- checks on parsed values
def check_device(device: str, option: str = "--device") -> str:
    """'cpu', 'auto', 'cuda' or 'cuda:N', refused when CUDA is asked for and not available."""
    if device in ("cpu", "auto") or device.startswith("cuda"):
        if device.startswith("cuda"):
            import torch
            if not torch.cuda.is_available():
                raise GlmkitError(f"{option} {device}: CUDA is not available on this machine; use {option} cpu")
        return device
    raise GlmkitError(f"{option} {device!r} is not a device; use cpu or cuda (cuda:N for one GPU)")


def read_text_file(path: str, option: str) -> str:
    """The UTF-8 text of `path`, or a GlmkitError naming `option` (missing, a folder, not UTF-8)."""
    file = Path(path)
    if not file.exists():
        raise GlmkitError(f"{option} {path} does not exist; give a UTF-8 text file")
    if not file.is_file():
        raise GlmkitError(f"{option} {path} is a folder; give a UTF-8 text file")
    data = file.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise GlmkitError(f"{option} {path} is not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 4]!r}); "
                          "convert it, e.g. `iconv -f GB18030 -t UTF-8 in.txt > out.txt`") from None


def check_output_file(path: str | Path, option: str, suffixes: tuple[str, ...] = ()) -> Path:
    """A file to write: its folder must exist (never created behind the user's back), it must not be a
    folder, and its suffix must be one of `suffixes` when given."""
    out = Path(path)
    if out.is_dir():
        raise GlmkitError(f"{option} {path} is a folder; give a file name, e.g. {out / ('out' + (suffixes or ('',))[0])}")
    if suffixes and out.suffix.lower() not in suffixes:
        raise GlmkitError(f"{option} {path}: the file name must end in {' or '.join(suffixes)}")
    if not out.parent.is_dir():
        raise GlmkitError(f"{option} {path}: the folder {out.parent} does not exist; create it first "
                          f"(mkdir -p {out.parent}) or write elsewhere")
    return out


def warn(verb: str, text: str) -> None:
    """A warning about legal but suspicious input: one line on stderr, the command goes on."""
    import sys
    print(f"glmkit {verb}: warning: {text}", file=sys.stderr, flush=True)


def probability(text: str) -> float:
    """A number in (0, 1]."""
    value = _number(float, text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], 1 keeps every token (got {text})")
    return value


# ---------------------------------------------------------------------------- shared option groups
def add_memory_arguments(parser: argparse.ArgumentParser) -> None:
    """`--quantize` and `--kv-dtype`: how a verb that decodes holds its weights and its KV cache."""
    parser.add_argument("--quantize", choices=("int8", "int4"), default=None,
                        help="weight-only quantized linear layers (int8: ~half the bf16 weight memory; "
                             "glmkit.model.quantize)")
    parser.add_argument("--kv-dtype", choices=("auto", "fp32", "bf16", "fp16", "fp8"), default="auto",
                        help="KV cache storage dtype (default auto: the model's); fp8 = float8_e4m3fn, a quarter "
                             "of fp32 (glmkit.model.kv_cache)")
