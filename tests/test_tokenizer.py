"""The bilingual tokenizer: lossless round trip, special tokens never made from user text, loading
HF tokenizer.json files with GLM-4's special tokens, clear errors on bad tokenizers."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from glmkit.data.sources import kjv_source, peoples_daily_source
from glmkit.data.tokenizer import GLM45_TOKENS, GLM_SPECIALS, PAD_TOKEN, GLMTokenizer
from glmkit.errors import GlmkitError

ENGLISH = ("In the beginning God created the heaven and the earth. And the earth was without form, and void! "
           "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.\n\n")
CHINESE = ("在１９９８年来临之际，我十分高兴地通过中央人民广播电台向全国各族人民致以问候！"
           "中国人民将满怀信心地开创新的业绩。“我们要更好地坚持解放思想。”他说。\n")


def _training_texts() -> list[str]:
    kjv = [d.text for d, _ in zip(kjv_source(), range(8))]
    pd = [d.text for d, _ in zip(peoples_daily_source(), range(30))]
    return kjv + pd + [ENGLISH * 3, CHINESE * 3]


@pytest.fixture(scope="module")
def tok() -> GLMTokenizer:
    return GLMTokenizer.train(_training_texts(), vocab_size=2000)


# ---------------------------------------------------------------------------- round trip
CJK = st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF)
CJK_PUNCT = st.sampled_from(list("，。！？、；：“”‘’（）《》——……１２３ＡＢ　"))
ASCII = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
WS = st.sampled_from([" ", "\n", "\t", "\r\n", "\r", "  ", "\n\n", "\u3000", "\xa0", "\u200b", "\ufeff"])
EMOJI = st.sampled_from(["😀", "👍🏽", "👨‍👩‍👧", "🇨🇳", "é", "e\u0301", "ﬁ", "Ⅻ", "ß", "\x00", "\x7f"])
MIXED = st.lists(st.one_of(CJK, CJK_PUNCT, ASCII, WS, EMOJI), max_size=120).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_round_trip_any_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(MIXED)
def test_round_trip_english_chinese_whitespace_emoji(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(np.asarray(ids, dtype=np.uint16)) == text  # token arrays from a corpus decode alike
    assert not set(ids) & tok.special_ids


def test_round_trip_real_text_and_batch(tok):
    texts = _training_texts()[:10] + ["", " ", "\n", "  leading and trailing  \n"]
    batch = tok.encode_batch(texts)
    assert batch == [tok.encode(t) for t in texts]
    assert [tok.decode(ids) for ids in batch] == texts


def test_chinese_characters_mostly_single_tokens(tok):
    # even this tiny vocabulary keeps the frequent characters whole; the default 16k keeps ~99%
    chars = [c for c in CHINESE if "\u4e00" <= c <= "\u9fff"]
    single = sum(len(tok.encode(c)) == 1 for c in chars)
    assert single / len(chars) > 0.9


# ---------------------------------------------------------------------------- special tokens
def test_special_attributes(tok):
    for name, text in GLM_SPECIALS.items():
        i = getattr(tok, f"{name}_id")
        assert tok.id_to_token(i) == text and tok.token_to_id(text) == i and i in tok.special_ids
    assert tok.id_to_token(tok.pad_id) == PAD_TOKEN and tok.pad_id in tok.special_ids
    structural = [tok.special_id(t) for t in GLM45_TOKENS]
    assert [tok.id_to_token(i) for i in structural] == list(GLM45_TOKENS)
    ids = [getattr(tok, f"{n}_id") for n in GLM_SPECIALS] + [tok.pad_id] + structural
    assert ids == list(range(len(ids)))  # specials first, in this order, then the learned vocabulary
    assert len(set(ids)) == len(ids) == len(tok.special_ids)
    assert tok.vocab_size == len(tok) == 2000
    assert tok.special_id("[gMASK]") == tok.gmask_id and tok.special_id("hello") is None


def test_token_bytes(tok):
    ids = tok.encode("a😀b 中文")
    assert b"".join(tok.token_bytes(i) for i in ids) == "a😀b 中文".encode()
    assert tok.token_bytes(tok.user_id) == b"<|user|>" and tok.token_bytes(tok.special_id("<think>")) == b"<think>"
    with pytest.raises(GlmkitError, match="outside the vocabulary"):
        tok.token_bytes(tok.vocab_size + 5)


def test_user_text_never_becomes_special(tok):
    text = ("The literal [MASK] and [gMASK]<sop> <|user|> text<|endoftext|>[sMASK]<eop><|pad|>"
            + "".join(GLM45_TOKENS))
    ids = tok.encode(text)
    assert not set(ids) & tok.special_ids
    assert tok.decode(ids) == text
    assert tok.encode("[MASK]") != [tok.mask_id]


def test_allow_special_matches_specials(tok):
    ids = tok.encode("a [MASK] b<|endoftext|>", allow_special=True)
    assert tok.mask_id in ids and ids[-1] == tok.eot_id
    assert tok.encode("[gMASK]<sop>", allow_special=True) == [tok.gmask_id, tok.sop_id]
    assert tok.decode(ids) == "a [MASK] b<|endoftext|>"
    assert tok.decode(ids, skip_special=True) == "a  b"


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(MIXED, st.sampled_from(list(GLM_SPECIALS.values()) + [PAD_TOKEN])), max_size=8))
def test_specials_inside_random_text(tok, parts):
    text = "".join(parts)
    ids = tok.encode(text)
    assert tok.decode(ids) == text and not set(ids) & tok.special_ids
    assert tok.decode(tok.encode(text, allow_special=True)) == text


# ---------------------------------------------------------------------------- persistence and hash
def test_save_load_keeps_hash_and_encodings(tok, tmp_path):
    path = tok.save(tmp_path / "tk")
    assert path.name == "tokenizer.json"
    for where in (tmp_path / "tk", path):
        loaded = GLMTokenizer.load(where)
        assert loaded.hash == tok.hash
        assert loaded.encode(CHINESE + ENGLISH) == tok.encode(CHINESE + ENGLISH)
        assert loaded.mask_id == tok.mask_id


def test_training_is_deterministic_and_hash_tells_tokenizers_apart(tok):
    again = GLMTokenizer.train(_training_texts(), vocab_size=2000)
    assert again.hash == tok.hash
    other = GLMTokenizer.train(_training_texts(), vocab_size=1500)
    assert other.hash != tok.hash


def test_sentence_end_ids(tok):
    ends = set(tok.sentence_end_ids.tolist())
    for text in (".", "。", "！", "?"):
        ids = tok.encode(text)
        assert len(ids) == 1 and ids[0] in ends, text
    for text in ("a", ",", "，", " the", "\n"):
        assert not set(tok.encode(text)) & ends, text
    assert not ends & tok.special_ids
    # every sentence of a text made of whole sentences ends on a sentence-end token
    ids = tok.encode("一二三。四五六！七八九。Hello there. Go!")
    assert ids[-1] in ends and sum(i in ends for i in ids) == 5


# ---------------------------------------------------------------------------- HF tokenizer.json files
GLM4_SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>"]


def _hf_tokenizer_file(tmp_path, specials: list[str]):
    """A tokenizer.json laid out like GLM-4's: a byte-level BPE, specials added after the vocabulary."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator([ENGLISH, CHINESE] * 4, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.add_special_tokens(specials)
    file = tmp_path / "tokenizer.json"
    backend.save(str(file))
    return file, backend


def test_load_hf_tokenizer_with_glm4_specials(tmp_path):
    file, backend = _hf_tokenizer_file(tmp_path, GLM4_SPECIALS)
    tok = GLMTokenizer.load(file)
    base = backend.get_vocab_size(with_added_tokens=False)
    assert tok.eot_id == base and tok.mask_id == base + 1 and tok.gmask_id == base + 2
    assert tok.observation_id == base + 9
    assert tok.pad_id == tok.eot_id  # GLM-4 pads with <|endoftext|>
    image = backend.token_to_id("<|begin_of_image|>")
    assert image in tok.special_ids  # any special of the file, not only GLM's, is kept from user text
    text = "user text <|begin_of_image|>[gMASK]<sop><|user|>你好"
    assert not set(tok.encode(text)) & tok.special_ids
    assert tok.encode("[gMASK]<sop><|user|>", allow_special=True) == [tok.gmask_id, tok.sop_id, tok.user_id]
    assert tok.decode(tok.encode(text)) == text


def test_glm45_tokens_are_optional_and_never_made_from_text(tmp_path):
    file, backend = _hf_tokenizer_file(tmp_path, GLM4_SPECIALS)
    assert GLMTokenizer.load(file).special_id("<tool_call>") is None  # GLM-4-9B's tokenizer lacks them
    # a tokenizer.json may list them as added tokens not flagged special: still kept from user text
    from tokenizers import AddedToken
    backend.add_tokens([AddedToken(t, special=False) for t in GLM45_TOKENS])
    backend.save(str(file))
    tok = GLMTokenizer.load(file)
    call = tok.special_id("<tool_call>")
    assert call == backend.token_to_id("<tool_call>") and call in tok.special_ids
    text = "<tool_call>f\n<arg_key>k</arg_key></tool_call><think>"
    assert not set(tok.encode(text)) & tok.special_ids and tok.decode(tok.encode(text)) == text
    assert tok.encode("<tool_call>", allow_special=True) == [call]


def test_missing_special_is_named(tmp_path):
    file, _ = _hf_tokenizer_file(tmp_path, [t for t in GLM4_SPECIALS if t != "[sMASK]"])
    with pytest.raises(GlmkitError, match=r"\[sMASK\]"):
        GLMTokenizer.load(file)


def test_bad_tokenizer_paths(tmp_path):
    with pytest.raises(GlmkitError, match="no tokenizer"):
        GLMTokenizer.load(tmp_path / "nowhere")
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": "nonsense"}))
    with pytest.raises(GlmkitError, match="not a valid HF tokenizer.json"):
        GLMTokenizer.load(tmp_path)


def test_bad_inputs(tok):
    with pytest.raises(GlmkitError, match="only encode str"):
        tok.encode(b"bytes")
    with pytest.raises(GlmkitError, match="surrogate"):
        tok.encode("a\ud800b")
    with pytest.raises(GlmkitError, match="too small"):
        GLMTokenizer.train(["abc"], vocab_size=100)


def test_pieces_show_partial_characters_as_bytes(tok):
    assert "".join(tok.pieces(tok.encode("plain words here"))) == "plain words here"
    pieces = tok.pieces(tok.encode("😀"))
    assert "".join(pieces) == "<F0><9F><98><80>"


def test_save_to_a_json_path(tok, tmp_path):
    file = tok.save(tmp_path / "ckpt" / "tokenizer.json")
    assert file == tmp_path / "ckpt" / "tokenizer.json" and GLMTokenizer.load(file).hash == tok.hash


def test_loaded_truncation_and_padding_are_ignored(tmp_path):
    file, backend = _hf_tokenizer_file(tmp_path, GLM4_SPECIALS)
    backend.enable_truncation(max_length=4)
    backend.enable_padding(length=64)
    backend.save(str(file))
    tok = GLMTokenizer.load(file)
    text = ENGLISH * 2
    assert tok.decode(tok.encode(text)) == text  # never cut at 4 tokens nor padded to 64
