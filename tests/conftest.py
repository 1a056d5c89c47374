import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# tiny test models run far faster on one thread than on two busy cores
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A toy corpus and a run of the tiny model trained on it for 2 steps (one checkpoint), built once
    per session for tests that need any checkpoint: {"corpus": dir, "run": dir}."""
    import numpy as np

    from glmkit.data.corpus import build_corpus
    from glmkit.data.sources import Document, Source
    from glmkit.data.tokenizer import GLMTokenizer
    from glmkit.train.loop import TrainConfig, train

    root = tmp_path_factory.mktemp("tiny_run")
    rng = np.random.default_rng(0)
    words = "the cat dog sat ran on under a mat tree red blue small big and then 北京 上海 天气 很好".split()
    docs = [Document(" ".join(rng.choice(words, size=40)) + ".", "toy", f"doc{i}") for i in range(60)]
    tokenizer = GLMTokenizer.train([d.text for d in docs], vocab_size=512)
    corpus = build_corpus([Source("toy", "test data", "generated", read=lambda src: iter(docs))], tokenizer,
                          root / "corpus", val_fraction=0.2)
    cfg = TrainConfig(out_dir=str(root / "run"), model="tiny", corpus=str(corpus.directory), seq_len=64,
                      batch_size=2, max_steps=2, warmup_steps=1, eval_every=0, save_every=2, progress=False,
                      tensorboard=False, prefetch=0, device="cpu")
    train(cfg)
    return {"corpus": corpus.directory, "run": root / "run"}
