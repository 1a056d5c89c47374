"""The bilingual tokenizer: a byte-level BPE over HF `tokenizers`, with GLM's special tokens.

`GLMTokenizer.train(texts)` learns a byte-level BPE (lossless: `decode(encode(s)) == s` for every
str, English, Chinese, whitespace and emoji alike, because every byte has a token and nothing is
normalised). `GLMTokenizer.load(path)` reads the tokenizer it saved or any HF `tokenizer.json` that
carries the GLM special tokens (GLM-4 checkpoints ship one).

Special tokens (GLM-4 spelling) and the attribute holding each id:
    <|endoftext|> eot_id   [MASK] mask_id   [sMASK] smask_id   [gMASK] gmask_id   <sop> sop_id
    <eop> eop_id   <|system|> system_id   <|user|> user_id   <|assistant|> assistant_id
    <|observation|> observation_id   and pad_id: <|pad|> (or <pad>) when the vocabulary has one,
    else <|endoftext|>, as GLM-4 does.

GLM-4.5's structural tokens (`GLM45_TOKENS`: <think> </think> <tool_call> </tool_call> <arg_key>
</arg_key> <arg_value> </arg_value> <tool_response> </tool_response>) are added by `train` after the
ones above, so tokenizers glmkit trains can speak the `glm45` chat format. They are optional:
GLM-4-9B's tokenizer.json lacks them and loads as before; `special_id(text)` returns None for a
token the vocabulary lacks, and the chat renderers say so.

A user's text never becomes a special token: `encode` runs a second copy of the tokenizer from
which every special token (and every GLM-4.5 structural token, whatever its flag) is removed, so the text "[MASK]" encodes as the ordinary tokens
"[", "MASK", "]". Only `allow_special=True` matches special tokens in text.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from glmkit.errors import GlmkitError

# attribute name -> token text. Every tokenizer glmkit uses must have all of these.
GLM_SPECIALS: dict[str, str] = {
    "eot": "<|endoftext|>",
    "mask": "[MASK]",
    "gmask": "[gMASK]",
    "smask": "[sMASK]",
    "sop": "<sop>",
    "eop": "<eop>",
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "observation": "<|observation|>",
}
PAD_TOKEN = "<|pad|>"  # added by `train`; loaded tokenizers without one pad with <|endoftext|>
# GLM-4.5's chat structure; added by `train`, optional when loading (see the module docstring)
GLM45_TOKENS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
                "</arg_value>", "<tool_response>", "</tool_response>")
PAD_FALLBACKS = (PAD_TOKEN, "<pad>", "[PAD]")

# 16k: most Chinese characters of the default corpus become single tokens and common English
# words whole ones, while the embedding stays small enough for CPU-sized models (see README).
DEFAULT_VOCAB_SIZE = 16384

# GLM-4's pre-tokenizer pattern (cl100k style): words with one leading non-letter, numbers in
# groups of at most 3 digits, punctuation runs, newlines kept apart from other whitespace.
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# A token ends a sentence when its text, minus trailing whitespace and closing quotes/brackets,
# ends with one of these (used by the [sMASK] objective to find sentence boundaries).
SENTENCE_END_CHARS = ".!?。！？…‼⁇⁈⁉"
CLOSERS = "\"'”’」』)）]】》〉»"


class GLMTokenizer:
    """A `tokenizers.Tokenizer` plus the GLM special-token ids. Construct with `train` or `load`."""

    def __init__(self, backend: Tokenizer):
        backend.no_truncation()  # a tokenizer.json may ask for these; a corpus must never be cut or padded
        backend.no_padding()
        self.backend = backend
        vocab = backend.get_vocab(with_added_tokens=True)
        missing = [tok for tok in GLM_SPECIALS.values() if tok not in vocab]
        if missing:
            raise GlmkitError(
                f"the tokenizer lacks the GLM special token(s) {', '.join(missing)}; glmkit needs all of "
                f"{', '.join(GLM_SPECIALS.values())}. Use a GLM tokenizer.json, or train one with "
                "`glmkit tokenizer train` (it adds them).")
        for name, tok in GLM_SPECIALS.items():
            setattr(self, f"{name}_id", vocab[tok])
        self.pad_id = next((vocab[t] for t in PAD_FALLBACKS if t in vocab), self.eot_id)
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.json = backend.to_str()
        # every added token flagged special, plus the GLM ones whatever their flag (a tokenizer.json may
        # list <think> or <tool_call> as non-special added tokens; user text must never produce them)
        glm = set(GLM_SPECIALS.values()) | {self.backend.id_to_token(self.pad_id)}
        glm |= {t for t in GLM45_TOKENS if t in vocab}
        added = backend.get_added_tokens_decoder()
        self._added = {t.content: i for i, t in added.items()}
        self._bytes: dict[int, bytes] = {}  # token_bytes cache
        self.special_ids = {i for i, t in added.items() if t.special or t.content in glm} | {vocab[t] for t in glm}
        self._plain = _without_specials(self.json, {self.backend.id_to_token(i) for i in self.special_ids})

    # ------------------------------------------------------------------ construction
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, min_frequency: int = 2,
              show_progress: bool = False) -> GLMTokenizer:
        """Learn a byte-level BPE of `vocab_size` tokens (specials included) from `texts`."""
        specials = list(GLM_SPECIALS.values()) + [PAD_TOKEN, *GLM45_TOKENS]
        if vocab_size <= 256 + len(specials):
            raise GlmkitError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs the 256 bytes plus "
                              f"{len(specials)} special tokens and some merges; use at least 512 "
                              f"(default {DEFAULT_VOCAB_SIZE})")
        backend = _empty_byte_level_bpe()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend)

    @classmethod
    def load(cls, path: str | os.PathLike) -> GLMTokenizer:
        """From a directory holding `tokenizer.json`, or a `tokenizer.json` file itself."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise GlmkitError(f"no tokenizer at {path}: expected a tokenizer.json file or a directory holding one; "
                              "train one with `glmkit tokenizer train` or point to a GLM checkpoint's folder")
        try:
            backend = Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed json
            raise GlmkitError(f"{file} is not a valid HF tokenizer.json ({e}); re-save it with `tokenizers` "
                              "or retrain with `glmkit tokenizer train`") from e
        return cls(backend)

    def save(self, path: str | os.PathLike) -> Path:
        """Write `path/tokenizer.json` (or `path` itself when it ends in .json); returns the file."""
        path = Path(path)
        file = path if path.suffix == ".json" else path / "tokenizer.json"
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(".json.tmp")
        tmp.write_text(self.json, encoding="utf-8")
        os.replace(tmp, file)
        return file

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        return self.encode_batch([text], allow_special)[0]

    def encode_batch(self, texts: Sequence[str], allow_special: bool = False) -> list[list[int]]:
        """Many texts at once, in parallel on the Rust side (what the corpus builder uses)."""
        backend = self.backend if allow_special else self._plain
        for t in texts:
            if not isinstance(t, str):
                raise GlmkitError(f"can only encode str, got {type(t).__name__}; decode bytes to str first")
        try:
            encodings = backend.encode_batch_fast(list(texts), add_special_tokens=False)
        except TypeError as e:  # what tokenizers raises for a str it cannot turn into UTF-8
            bad = next(t for t in texts if not _is_utf8(t))
            raise GlmkitError(f"text {bad[:40]!r}... is not valid Unicode (it holds a lone surrogate); "
                              "decode your input with errors='replace' or fix its source") from e
        return [e.ids for e in encodings]

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special: bool = False) -> str:
        ids = ids.tolist() if isinstance(ids, np.ndarray) else list(ids)
        if not skip_special:
            return self.backend.decode(ids, skip_special_tokens=False)
        # decode the runs between specials separately, so a special never glues two byte runs
        return "".join(self.backend.decode(run, skip_special_tokens=False) for run in self._split_specials(ids))

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special: bool = False) -> list[str]:
        return [self.decode(ids, skip_special) for ids in batch]

    def pieces(self, ids: Sequence[int] | np.ndarray) -> list[str]:
        """The text of each token for display; a token holding part of a UTF-8 character shows its
        bytes instead ("<E4><B8>")."""
        ids = ids.tolist() if isinstance(ids, np.ndarray) else list(ids)
        out = []
        for i, text in zip(ids, self.backend.decode_batch([[i] for i in ids], skip_special_tokens=False)):
            if "\ufffd" in text and (raw := _token_bytes(self.backend.id_to_token(i))) is not None:
                text = raw.decode("utf-8", errors="backslashreplace")
                text = re.sub(r"\\x([0-9a-f]{2})", lambda m: f"<{m.group(1).upper()}>", text)
            out.append(text)
        return out

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def special_id(self, text: str) -> int | None:
        """The id of the special (added) token spelled `text`, or None when the vocabulary lacks it
        (e.g. `special_id("<tool_call>")` on GLM-4-9B's tokenizer)."""
        i = self.backend.token_to_id(text)
        return i if i is not None and i in self.special_ids else None

    def token_bytes(self, id: int) -> bytes:
        """The bytes a token stands for (special tokens: their text in UTF-8). Decoding a stream token
        by token through an incremental UTF-8 decoder over these never splits a character."""
        id = int(id)
        raw = self._bytes.get(id)
        if raw is None:
            token = self.backend.id_to_token(id)
            if token is None:
                raise GlmkitError(f"token id {id} is outside the vocabulary (size {self.vocab_size})")
            if id in self.special_ids or token in self._added:
                raw = token.encode("utf-8")
            else:  # byte-level tokens map back to bytes; any other vocabulary decodes one token alone
                raw = _token_bytes(token)
                if raw is None:
                    raw = self.backend.decode([id], skip_special_tokens=False).encode("utf-8")
            self._bytes[id] = raw
        return raw

    def id_to_token(self, id: int) -> str | None:
        return self.backend.id_to_token(int(id))

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"GLMTokenizer(vocab_size={self.vocab_size}, hash={self.hash[:12]})"

    # ------------------------------------------------------------------ derived tables
    @cached_property
    def hash(self) -> str:
        """sha256 of what decides tokenization (vocabulary, merges, added tokens, normaliser, pre-tokenizer,
        decoder), read from the tokenizer's json with keys sorted and merges in one spelling, so the
        same tokenizer hashes alike whichever `tokenizers` version wrote the file."""
        spec = json.loads(self.json)
        model = dict(spec.get("model") or {})
        if isinstance(model.get("merges"), list):
            model["merges"] = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        added = sorted((t["id"], t["content"], bool(t.get("special"))) for t in spec.get("added_tokens") or [])
        keys = ("normalizer", "pre_tokenizer", "post_processor", "decoder")
        canonical = json.dumps({"model": model, "added": added, **{k: spec.get(k) for k in keys}},
                               sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    @cached_property
    def sentence_end_ids(self) -> np.ndarray:
        """Sorted ids of the tokens whose text ends a sentence (`. ! ? 。 ！ ？ …`, possibly followed by
        closing quotes/brackets and whitespace), so a sentence boundary falls right after them."""
        ids = [i for i in range(self.vocab_size) if i not in self.special_ids]
        texts = self.backend.decode_batch([[i] for i in ids], skip_special_tokens=False)
        ends = [i for i, t in zip(ids, texts) if _ends_sentence(t)]
        return np.asarray(ends, dtype=np.int64)

    def _split_specials(self, ids: list[int]) -> list[list[int]]:
        runs, run = [], []
        for i in ids:
            if i in self.special_ids:
                if run:
                    runs.append(run)
                run = []
            else:
                run.append(i)
        if run:
            runs.append(run)
        return runs


def _empty_byte_level_bpe() -> Tokenizer:
    """BPE over bytes: GLM-4's split pattern, then bytes mapped to printable chars; no normaliser
    (normalising would make the round trip lossy)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _without_specials(tokenizer_json: str, specials: set[str]) -> Tokenizer:
    """A copy of the tokenizer that does not match `specials` in text (they stay in the vocabulary,
    and byte-level BPE cannot rebuild them from pieces because the pre-tokenizer splits them)."""
    spec = json.loads(tokenizer_json)
    spec["added_tokens"] = [t for t in spec.get("added_tokens") or [] if t["content"] not in specials]
    return Tokenizer.from_str(json.dumps(spec))


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of the byte-level alphabet (GPT-2's printable stand-ins for the 256 bytes)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _token_bytes(token: str | None) -> bytes | None:
    table = _byte_decoder()
    if token is None or any(c not in table for c in token):
        return None  # not a byte-level token (e.g. a sentencepiece vocabulary)
    return bytes(table[c] for c in token)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _ends_sentence(text: str) -> bool:
    core = text.rstrip().rstrip(CLOSERS)
    return bool(core) and core[-1] in SENTENCE_END_CHARS and "\ufffd" not in text
