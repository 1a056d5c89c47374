"""Fixtures shared by the test modules; the plain helpers they use are in tests/helpers.py (and, for
the `glmkit serve` tests, tests/serve_helpers.py).

Session-scoped fixtures build an expensive thing once for the whole run. They are shared: a test that
changes one (writes into a run directory, trains a model) works on a copy (`shutil.copytree`,
`copy.deepcopy`).
"""

import os
import shutil
import sys
from typing import NamedTuple

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# tiny test models run far faster on one thread than on two busy cores
torch.set_num_threads(1)

from helpers import build_toy_corpus, tiny_train_config, train_tokenizer  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def bilingual_tokenizer():
    """A 420-token BPE trained on `helpers.TEXTS` (English, Chinese, KJV)."""
    return train_tokenizer()


@pytest.fixture(scope="session")
def toy_corpus(tmp_path_factory):
    """`helpers.build_toy_corpus`: 160 toy-grammar documents with their own tokenizer."""
    return build_toy_corpus(tmp_path_factory.mktemp("toy-corpus") / "toy")


class Run(NamedTuple):
    directory: object    # pathlib.Path of the run (metrics.jsonl, checkpoints/)
    result: dict         # what `glmkit.train.loop.train` returned


@pytest.fixture(scope="session")
def tiny_run(toy_corpus, tmp_path_factory) -> Run:
    """A finished `helpers.tiny_train_config` run on `toy_corpus` (tiny model, glm objective, 12
    steps, checkpoints 8 and 12 kept, validation at 6 and 12). Read it; change only `tiny_run_copy`."""
    from glmkit.train.loop import train
    out = tmp_path_factory.mktemp("tiny-run") / "run"
    return Run(out, train(tiny_train_config(toy_corpus.directory, out)))


@pytest.fixture
def tiny_run_copy(tiny_run, tmp_path):
    """A private copy of `tiny_run`'s directory that a test may resume, overwrite or corrupt."""
    return shutil.copytree(tiny_run.directory, tmp_path / "run")


# ---------------------------------------------------------------------------- chat tokenizers
CHAT_TEXTS = [
    "Hello! How can I help you today? The weather in Beijing is sunny, 3 degrees. " * 4,
    "北京和上海的天气？我来查一下。晴，温度三度。你好，请简短回答。今天天气怎么样？" * 4,
    '{"city": "北京", "days": 2, "temp": 3, "ok": true, "items": [1, 2, 3], "name": "get_weather"}\n' * 4,
    "import math\nprint(math.pi)\ndef f(x):\n    return x * 2\n" * 4,
]


@pytest.fixture(scope="session")
def chat_tok():
    """A tiny glmkit-trained tokenizer: GLM-4's special tokens plus GLM-4.5's structural ones."""
    from glmkit.data.tokenizer import GLMTokenizer
    return GLMTokenizer.train(CHAT_TEXTS, vocab_size=700)


@pytest.fixture(scope="session")
def glm4_tok(tmp_path_factory):
    """A tiny tokenizer.json laid out like GLM-4-9B's: byte-level BPE, GLM-4's specials appended
    after the vocabulary, none of GLM-4.5's structural tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from glmkit.data.tokenizer import GLMTokenizer
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(CHAT_TEXTS, trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.add_special_tokens(["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>",
                                "<|user|>", "<|assistant|>", "<|observation|>"])
    file = tmp_path_factory.mktemp("glm4_tok") / "tokenizer.json"
    backend.save(str(file))
    return GLMTokenizer.load(file)


# ---------------------------------------------------------------------------- the OpenAI server (test_serve_*.py)
# One server per test module, as before the tests were split: a module's tests share it (the
# script's markers keep their replies apart) and it stops when the module ends.

@pytest.fixture(scope="module")
def chat_model(chat_tok):
    """A tiny random GLM over `chat_tok`'s vocabulary (1024 positions), the same in every module."""
    from glmkit.model.config import GLMConfig
    from glmkit.model.glm import GLM
    torch.manual_seed(0)
    return GLM(GLMConfig.from_name("tiny", vocab_size=len(chat_tok), max_position_embeddings=1024)).eval()


@pytest.fixture(scope="module")
def served_script(chat_tok):
    """The shared server's `serve_helpers.Script`: a test adds its marker, then reads the prompts."""
    from serve_helpers import Script
    return Script(chat_tok)


@pytest.fixture(scope="module")
def served(chat_model, chat_tok, served_script):
    """(server, base_url) of the module's glmkit server: 16 rows, a queue of 128, keepalives every 0.5 s."""
    from serve_helpers import serving
    with serving(chat_model, chat_tok, max_batch=16, processor_hook=served_script, keepalive_s=0.5,
                 max_waiting=128) as s:
        yield s


@pytest.fixture(scope="module")
def served_client(served):
    """The official `openai` client of the module's server."""
    import openai
    return openai.OpenAI(base_url=served[1], api_key="unused", max_retries=0, timeout=60)
