"""The one model loader (`glmkit.checkpoint.loader.load`) on every folder it accepts, and its errors;
the one manifest writer behind training checkpoints and converted folders."""

import json
import shutil

import pytest
import torch

from glmkit.checkpoint import store as C
from glmkit.checkpoint.convert import save_glmkit
from glmkit.checkpoint.loader import load, locate
from glmkit.data.tokenizer import GLMTokenizer
from glmkit.errors import GlmkitError
from glmkit.model.config import GLMConfig
from glmkit.model.glm import GLM

TEXTS = ["The quick brown fox jumps over the lazy dog. A small cat sat on the warm mat. " * 2,
         "北京是中国的首都。上海是一个大城市。我们今天去公园散步。" * 2]


@pytest.fixture(scope="module")
def tok():
    return GLMTokenizer.train(TEXTS * 4, vocab_size=400)


def _model(tok, preset="tiny"):
    torch.manual_seed(3)
    return GLM(GLMConfig.from_name(preset, vocab_size=tok.vocab_size))


def _save_run(run_dir, model, tok, step=7, objective="mlm"):
    return C.save_checkpoint(run_dir / "checkpoints", step, model_state=model.state_dict(),
                             save_config=model.config.save, save_tokenizer=lambda p: tok.save(p.parent),
                             train_state={"step": step}, fingerprint={"objective": {"kind": objective}})


def _logits(model, ids):
    with torch.no_grad():
        n = ids.shape[1]
        pos = torch.arange(n)[None]
        return model.logits(model(ids, pos, torch.zeros_like(pos)))


def test_training_checkpoint_from_step_checkpoints_and_run_folders(tok, tmp_path):
    model = _model(tok)
    step_dir = _save_run(tmp_path, model, tok)
    ids = torch.tensor([tok.encode("The quick brown fox")])
    want = _logits(model.eval(), ids)
    for path in (step_dir, tmp_path / "checkpoints", tmp_path, str(tmp_path)):
        loaded = load(path)
        assert (loaded.objective, loaded.format, loaded.path) == ("mlm", "glmkit", step_dir)
        assert loaded.tokenizer.hash == tok.hash
        assert not loaded.model.training and loaded.model.lm_head.weight.t().is_contiguous()   # decode layout
        # the decode layout sums in another order: equal to rounding
        torch.testing.assert_close(_logits(loaded.model, ids), want, atol=1e-5, rtol=0)
    raw = load(tmp_path, for_inference=False)
    assert raw.model.training and raw.model.lm_head.weight.is_contiguous()
    assert all(torch.equal(a, b) for a, b in zip(raw.model.state_dict().values(), model.state_dict().values()))


def test_dtype_casts_all_but_the_moe_router(tok, tmp_path):
    model = _model(tok, "tiny-moe")
    _save_run(tmp_path, model, tok, objective="glm")
    loaded = load(tmp_path, dtype=torch.bfloat16)
    dtypes = {n: p.dtype for n, p in loaded.model.named_parameters()}
    assert dtypes["embed_tokens.weight"] == torch.bfloat16 and dtypes["layers.1.mlp.gate.weight"] == torch.float32
    assert loaded.objective == "glm"


def test_converted_and_hf_folders(tok, tmp_path):
    from glmkit.checkpoint.hf import to_hf

    model = _model(tok)
    to_hf(model, tmp_path / "hf")
    tok.save(tmp_path / "hf")
    ids = torch.tensor([tok.encode("北京是中国的首都")])
    want = _logits(model.eval(), ids)
    hf = load(tmp_path / "hf")
    assert (hf.format, hf.objective, hf.path) == ("hf", "clm", tmp_path / "hf")
    assert (_logits(hf.model, ids) - want).abs().max() < 1e-5
    save_glmkit(hf.model, tmp_path / "gk", source=tmp_path / "hf")
    converted = load(tmp_path / "gk")
    assert (converted.format, converted.objective) == ("glmkit", "clm")
    assert converted.tokenizer.hash == tok.hash and (_logits(converted.model, ids) - want).abs().max() < 1e-5


def test_one_manifest_writer_for_checkpoints_and_converted_folders(tok, tmp_path):
    model = _model(tok)
    step_dir = _save_run(tmp_path / "run", model, tok, step=5)
    save_glmkit(model, tmp_path / "gk")
    ck, cv = (json.loads((p / "manifest.json").read_text()) for p in (step_dir, tmp_path / "gk"))
    assert set(ck) == set(cv) == {"format", "step", "created", "files", "fingerprint"}
    assert ck["format"] == cv["format"] == C.FORMAT and (ck["step"], cv["step"]) == (5, 0)
    assert sorted(ck["files"]) == sorted(C.FILES) and sorted(cv["files"]) == ["config.json", "model.safetensors"]
    f = cv["files"]["config.json"]
    assert f == {"sha256": C.sha256(tmp_path / "gk" / "config.json"),
                 "bytes": (tmp_path / "gk" / "config.json").stat().st_size}
    assert cv["fingerprint"] == {"converted_from": None, "objective": {"kind": "clm"}}
    assert C.verify(tmp_path / "gk") == cv


def test_clear_errors(tok, tmp_path):
    with pytest.raises(GlmkitError, match="does not exist"):
        load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GlmkitError, match="is not a model folder"):
        load(tmp_path / "empty")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(GlmkitError, match="is a file"):
        load(tmp_path / "file.bin")
    model = _model(tok)
    save_glmkit(model, tmp_path / "gk")               # no source: no tokenizer copied
    with pytest.raises(GlmkitError, match="has no tokenizer.json"):
        load(tmp_path / "gk")
    assert load(tmp_path / "gk", tokenizer=False).tokenizer is None
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "gk", bad)
    (bad / "manifest.json").unlink()
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "hidden_size": 32}))
    with pytest.raises(GlmkitError, match=r"embed_tokens.weight has shape \[\d+, 64\], but the config implies "
                                          r"\[\d+, 32\]"):
        load(bad, tokenizer=False)
    (tmp_path / "gk" / "config.json").write_text(json.dumps({**config, "num_layers": 3}))
    with pytest.raises(GlmkitError, match="corrupted: config.json"):
        load(tmp_path / "gk", tokenizer=False)


def test_locate_prefers_hf_config(tok, tmp_path):
    from glmkit.checkpoint.hf import to_hf

    to_hf(_model(tok), tmp_path)
    assert locate(tmp_path) == (tmp_path, "hf")
