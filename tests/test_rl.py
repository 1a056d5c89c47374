"""RL from outcomes: group-relative advantages (exact values), the per-token loss weight (all ones = the plain
loss; it survives every batch operation and the prefetcher), an update that raises a rewarded sample's
log-probability and lowers a penalized one's, batches that train only on the sampled ids of each round with
their attempt's advantage (through the real agent loop and tools), rewards from the checked answer, exact
resume, and `glmkit rl` end to end."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import make_batch, tiny_model, train_losses

from glmkit.batch import Batch
from glmkit.checkpoint import store as ckpt_io
from glmkit.errors import GlmkitError
from glmkit.train.loop import train
from glmkit.train.rl import Episode, RLBatchIterator, advantages, episode_examples, round_example
from glmkit.train.setup import TrainConfig

# --------------------------------------------------------------------------------------- advantages


def test_advantages_are_the_reward_minus_the_group_mean():
    np.testing.assert_array_equal(advantages([1.0, 0.0, 0.0, 1.0]), [0.5, -0.5, -0.5, 0.5])
    np.testing.assert_array_equal(advantages([1.0, 0.0, 0.0, 0.0]), [0.75, -0.25, -0.25, -0.25])
    np.testing.assert_array_equal(advantages([1.2, 1.2, 1.2]), [0.0, 0.0, 0.0])
    std = np.sqrt(1 / 3)                       # sample std (ddof 1) of 1, 0, 0, 1
    np.testing.assert_allclose(advantages([1.0, 0.0, 0.0, 1.0], scale_std=True),
                               np.array([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4), rtol=1e-12)
    with pytest.raises(GlmkitError, match="1-D group"):
        advantages([])


# --------------------------------------------------------------------------------------- the weighted loss


def test_unit_weights_give_the_plain_loss_and_weights_scale_each_token():
    model = tiny_model()
    batch = make_batch([[("glm", 12, [3, 2])], [("clm", 10)]], 24, vocab=model.config.vocab_size)
    plain = model.loss(batch)
    ones = Batch(**{**batch.__dict__, "loss_weight": torch.ones(batch.shape)})
    assert abs(model.loss(ones).item() - plain.item()) <= 1e-6
    # any weights: sum(w x cross-entropy) / number of loss positions; weights off the loss positions do nothing
    w = torch.rand(batch.shape, generator=torch.Generator().manual_seed(1)) * 4 - 2
    weighted = model.loss(Batch(**{**batch.__dict__, "loss_weight": w}))
    from helpers import dense_forward
    logp = torch.log_softmax(dense_forward(model, batch), -1)
    ce = -logp.gather(-1, batch.targets[..., None]).squeeze(-1)
    m = batch.loss_mask
    torch.testing.assert_close(weighted, (ce[m] * w[m]).sum() / m.sum(), atol=1e-5, rtol=1e-5)
    w_off = torch.where(m, w, torch.full_like(w, 100.0))
    assert model.loss(Batch(**{**batch.__dict__, "loss_weight": w_off})).item() == weighted.item()


def test_loss_weight_survives_batch_operations_and_the_prefetcher():
    from glmkit.train.prefetch import prepare
    batch = make_batch([[("clm", 6)], [("clm", 8)]], 8).numpy()
    assert batch.loss_weight is None
    assert batch.to("cpu").loss_weight is None and batch[1].loss_weight is None       # absent stays absent
    assert prepare(batch, "sdpa", "cpu", torch.float32).batch.loss_weight is None
    w = np.arange(16, dtype=np.float64).reshape(2, 8) / 4
    weighted = Batch(**{**batch.__dict__, "loss_weight": w})
    t = weighted.to("cpu")
    assert t.loss_weight.dtype == torch.float32 and t.loss_weight.tolist() == w.tolist()
    assert weighted[1].loss_weight.tolist() == [w[1].tolist()]
    assert t.numpy().loss_weight.tolist() == w.tolist()
    step = prepare(weighted, "sdpa", "cpu", torch.float32)
    assert step.batch.loss_weight.tolist() == w.tolist() and step.n_loss == batch.num_loss_tokens
    with pytest.raises(ValueError, match="loss_weight"):
        Batch(**{**batch.__dict__, "loss_weight": w[:, :4]})


# --------------------------------------------------------------------------------------- toy sources


class FixedSource:
    """Each task is a list of (rounds, reward) attempts returned as they are (seeds ignored)."""

    def __init__(self, tasks, fingerprint="fixed"):
        self.tasks, self.fingerprint, self.calls = tasks, fingerprint, []

    def play(self, model, tokenizer, task, seeds, *, causal, max_len):
        self.calls.append((len(seeds), model.training, causal, max_len))
        return [Episode(rounds, reward, {"n": float(len(rounds))}) for rounds, reward in task]


class SamplingSource:
    """Samples 6 ids after a fixed prompt on the engine (seeded); reward: the share of even ids sampled."""
    fingerprint = "sampling"

    def __init__(self, prompts):
        self.tasks = prompts

    def play(self, model, tokenizer, task, seeds, *, causal, max_len):
        from glmkit.infer.engine import Engine, Request
        from glmkit.infer.sampling import SamplingConfig
        engine = Engine(model, tokenizer, max_batch=len(seeds), max_len=max_len)
        results = engine.generate([Request.chat(task, SamplingConfig(temperature=1.0, max_new_tokens=6, seed=s))
                                   for s in seeds])
        return [Episode([(list(task), r.tokens[0])], sum(t % 2 == 0 for t in r.tokens[0]) / 6) for r in results]


def _init_checkpoint(tok, path):
    model = tiny_model(vocab_size=tok.vocab_size, max_position_embeddings=4096)
    return ckpt_io.save_checkpoint(
        path, 0, model_state=model.state_dict(), save_config=model.config.save,
        save_tokenizer=lambda p: tok.save(p.parent), train_state={"step": 0},
        fingerprint={"objective": {"kind": "glm"}, "tokenizer": tok.hash}, keep=1)


def _rl_config(init, tasks_dir, out, **kw):
    tasks_dir.mkdir(exist_ok=True)
    (tasks_dir / "train_tasks.jsonl").touch()
    base = dict(out_dir=str(out), init=str(init), rl_tasks=str(tasks_dir), seq_len=64, rl_group=2,
                rl_tasks_per_batch=2, max_steps=1, lr=1e-2, warmup_steps=0, weight_decay=0.0, save_every=0,
                progress=False, tensorboard=False, prefetch=0, device="cpu")
    return TrainConfig(**{**base, **kw})


def _logp(model, prompt, sampled) -> float:
    """log p(sampled | prompt) under `model`, in the chat layout."""
    from glmkit.train.chat_data import pack_rows
    ids, loss = round_example(prompt, sampled)
    batch, _ = pack_rows([(ids, loss)], 1, len(ids), "chat", 0)
    b = batch.to("cpu")
    model.eval()
    with torch.no_grad():
        h = model(b.input_ids, b.position_ids, b.block_position_ids, model.attention_mask(b))
        logp = torch.log_softmax(model.logits(h).float(), -1)[0]
    return float(logp[len(prompt) - 1:len(ids) - 1].gather(1, torch.as_tensor(sampled)[:, None]).sum())


def test_an_update_raises_the_rewarded_sample_and_lowers_the_penalized_one(chat_tok, tmp_path):
    from glmkit.checkpoint.loader import load
    init = _init_checkpoint(chat_tok, tmp_path / "init")
    prompt = chat_tok.encode("[gMASK]<sop><|user|>\nWeather?<|assistant|>", allow_special=True)
    good = chat_tok.encode("\nIt is sunny.<|user|>", allow_special=True)
    bad = chat_tok.encode("\nNo idea at all.<|user|>", allow_special=True)
    task = [([(prompt, good)], 1.0), ([(prompt, bad)], 0.0)]
    source = FixedSource([task, task])
    before = load(init).model
    train(_rl_config(init, tmp_path / "tasks", tmp_path / "run", save_every=1), episodes=source)
    after = load(tmp_path / "run").model
    assert _logp(after, prompt, good) > _logp(before, prompt, good) + 0.1
    assert _logp(after, prompt, bad) < _logp(before, prompt, bad) - 0.1
    # sampled with the training model in eval mode, rows of seq_len
    assert source.calls == [(2, False, False, 64)] * 2
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["reward"] == 0.5 and record["rl_groups_kept"] == 1.0 and record["rl_n"] == 1.0


def test_a_batch_trains_only_on_each_rounds_sampled_ids_with_its_attempts_advantage(chat_tok):
    model = tiny_model()
    p1, s1, p2, s2 = [5, 6, 7], [8, 9], [5, 6, 7, 8, 9, 10, 11], [12, 13, 14]
    two_rounds = [(p1, s1), (p2, s2)]
    tasks = [[(two_rounds, 1.0), ([(p1, [20])], 0.0), ([(p1, [21, 22])], 0.5)],     # advantages 0.5, -0.5, 0
             [([(p1, [30])], 1.0), ([(p1, [31])], 1.0), ([(p1, [32])], 1.0)]]      # no signal: left out
    it = RLBatchIterator(FixedSource(tasks), model, chat_tok, group=3, tasks=2, seq_len=12, layout="chat")
    b = next(it)
    learned = [(int(b.targets[r, c]), float(b.loss_weight[r, c])) for r, c in zip(*np.nonzero(b.loss_mask))]
    # rounds of attempts with a non-zero advantage, in order; every prompt position is without loss
    assert learned == [(8, 0.5), (9, 0.5), (12, 0.5), (13, 0.5), (14, 0.5), (20, -0.5)]
    assert float(np.abs(b.loss_weight[~b.loss_mask]).sum()) == 0.0
    assert b.shape == (2, 12)      # the two rounds are one conversation of 10 tokens, then one of 4: rows of 12
    assert it.pop_metrics() == {"reward": 0.75, "groups_kept": 0.5, "sample_s": pytest.approx(0, abs=1),
                                "sampled_tokens": 2 + 3 + 1 + 2 + 3, "n": pytest.approx(7 / 6)}
    # a batch in which no group carries a signal still has a loss position, at weight 0
    it = RLBatchIterator(FixedSource([tasks[1]]), model, chat_tok, group=3, tasks=1, seq_len=12, layout="chat")
    b = next(it)
    assert b.num_loss_tokens == 1 and float(b.loss_weight.sum()) == 0.0


def test_a_round_that_extends_the_last_one_continues_its_conversation_with_the_same_log_probabilities(chat_tok):
    from helpers import dense_forward

    from glmkit.train.chat_data import pack_rows
    p1, s1 = [2, 4, 40, 41, 42], [50, 51, 52]
    p2, s2 = p1 + s1 + [60, 61], [70, 71]              # round 2 reads round 1 and a tool result
    p3, s3 = [2, 4, 43], [80]                          # a round that does not extend it starts anew
    (ids, learn), (ids3, learn3) = episode_examples([(p1, s1), (p2, s2), (p3, []), (p3, s3)])
    assert ids.tolist() == p2 + s2 and ids3.tolist() == p3 + s3
    assert ids[1:][learn[:-1]].tolist() == s1 + s2 and ids3[1:][learn3[:-1]].tolist() == s3
    # numerically: the sampled ids' log-probabilities merged are those of the rounds apart
    model = tiny_model(vocab_size=chat_tok.vocab_size)

    def sampled_logp(examples):
        batch, _ = pack_rows(examples, len(examples), 16, "chat", 0)
        logp = torch.log_softmax(dense_forward(model, batch), -1)
        b = batch.to("cpu")
        return logp[b.loss_mask].gather(-1, b.targets[b.loss_mask][:, None]).squeeze(-1)

    apart = sampled_logp([round_example(p1, s1), round_example(p2, s2)])
    torch.testing.assert_close(sampled_logp([(ids, learn)]), apart, atol=1e-5, rtol=1e-5)


def test_tool_episodes_reward_the_checked_answer_and_keep_the_ids_read_and_sampled(chat_tok):
    from glmkit.chat.agent import ScriptedModel
    from glmkit.eval.toolrl import ToolEpisodes
    from glmkit.eval.tooltasks import ToolSuite
    from glmkit.train.chat_data import pack_rows

    task = ToolSuite(seed=0, per_split={"train": 1, "heldout": 0}, families=("functions",),
                     langs=("en",)).tasks("train")[0]
    (call,) = task.calls
    texts = [f"{call.tool}\n{json.dumps(call.args)}<|observation|>", f"\n{task.reply}<|user|>",     # right
             f"{call.tool}\n{json.dumps(call.args)}<|observation|>", "\nThe answer is 0.<|user|>",  # wrong
             "\nNo tool needed.<|user|>"]                                                           # no call
    script = ScriptedModel.from_texts(chat_tok, texts)
    source = ToolEpisodes([task], None, fmt="glm4", logits_processor=script, format_reward=0.25)
    model = tiny_model(vocab_size=chat_tok.vocab_size, max_position_embeddings=4096).train()
    episodes = source.play(model, chat_tok, task, [1, 2, 3], causal=False, max_len=4096)
    assert script.done
    assert [e.reward for e in episodes] == [1.25, 0.25, 0.25]
    assert [e.info["correct"] for e in episodes] == [1.0, 0.0, 0.0]
    assert [e.info["calls_right"] for e in episodes] == [1.0, 1.0, 0.0]
    assert [e.info["rounds"] for e in episodes] == [2.0, 2.0, 1.0]
    ids = [chat_tok.encode(t, allow_special=True) for t in texts]
    assert [s for e in episodes for _, s in e.rounds] == ids             # exactly the sampled ids, stop ids included
    (p1, _), (p2, _) = episodes[0].rounds
    assert p2[:len(p1)] == p1 and p1[-1] == chat_tok.special_id("<|assistant|>")
    assert p2[:len(p1) + len(ids[0])] == p1 + ids[0]      # the history re-renders as sampled: one conversation
    assert len(episode_examples(episodes[0].rounds)) == 1
    # packed, the loss targets are the assistant's ids only: the tool result sits in round 2's prompt, unlearned
    examples = [round_example(p, s) for e in episodes for p, s in e.rounds]
    batch, placed = pack_rows(examples, len(examples), 4096, "chat", chat_tok.pad_id)
    assert placed == len(examples)
    assert batch.targets[batch.loss_mask].tolist() == [t for i in ids for t in i]


def test_attempts_decoded_together_sample_what_they_sample_one_at_a_time(chat_tok):
    from glmkit.eval.toolrl import ToolEpisodes
    from glmkit.eval.tooltasks import ToolSuite

    task = ToolSuite(seed=0, per_split={"train": 1, "heldout": 0}, families=("functions",),
                     langs=("en",)).tasks("train")[0]
    model = tiny_model(vocab_size=chat_tok.vocab_size, max_position_embeddings=4096)
    play = lambda n: ToolEpisodes([task], None, max_new_tokens=6, max_rounds=2, concurrency=n).play(  # noqa: E731
        model, chat_tok, task, [11, 12, 13], causal=False, max_len=4096)
    alone, together = play(1), play(3)
    assert [e.rounds for e in together] == [e.rounds for e in alone]
    assert [e.reward for e in together] == [e.reward for e in alone]
    assert len({tuple(e.rounds[0][1]) for e in alone}) > 1          # the seeds drew different attempts


def test_an_rl_run_resumes_exactly(chat_tok, tmp_path):
    init = _init_checkpoint(chat_tok, tmp_path / "init")
    prompts = [chat_tok.encode(f"[gMASK]<sop><|user|>\nQuestion {i}?<|assistant|>", allow_special=True)
               for i in range(5)]
    cfg = lambda out, **kw: _rl_config(init, tmp_path / "tasks", out, **{  # noqa: E731
        "max_steps": 4, "save_every": 2, "lr": 3e-3, "rl_group": 4, **kw})
    train(cfg(tmp_path / "full"), episodes=SamplingSource(prompts))
    losses = train_losses(tmp_path / "full")
    rewards = [json.loads(r).get("reward") for r in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(losses) == [1, 2, 3, 4] and any(v != 0 for v in losses.values())
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    shutil.rmtree(part / "checkpoints" / "step-000004")
    (part / "checkpoints" / "latest").write_text("step-000002\n")
    train(cfg(part, resume=True), episodes=SamplingSource(prompts))
    assert train_losses(part) == losses
    assert [json.loads(r).get("reward") for r in (part / "metrics.jsonl").read_text().splitlines()] == rewards
    # other tasks (another source fingerprint) do not resume this run
    source = SamplingSource(prompts)
    source.fingerprint = "other"
    with pytest.raises(GlmkitError, match="different setup"):
        train(cfg(part, resume=True, max_steps=6), episodes=source)


def test_rl_options_are_checked_up_front(tmp_path):
    (tmp_path / "train_tasks.jsonl").touch()
    ok = dict(init=str(tmp_path), rl_tasks=str(tmp_path), prefetch=0)
    TrainConfig(**ok).validate()
    for bad, match in ((dict(rl_group=1), "--rl-group"), (dict(prefetch=2), "--prefetch"),
                       (dict(rl_temperature=0.0), "--rl-temperature"), (dict(parallel="fsdp"), "fsdp"),
                       (dict(chat_data=str(tmp_path)), "--chat-data"), (dict(init=None), "--init"),
                       (dict(rl_tasks=str(tmp_path / "none")), "train_tasks.jsonl"), (dict(lora_rank=2), "--lora-rank")):
        with pytest.raises(GlmkitError, match=match):
            TrainConfig(**{**ok, **bad}).validate()
    with pytest.raises(GlmkitError, match="glmkit rl"):       # an RL config without its episodes
        train(TrainConfig(**ok, out_dir=str(tmp_path / "run")))


def test_glmkit_rl_trains_on_the_task_suite_and_scores_the_held_out_split(chat_tok, tmp_path, capsys):
    from glmkit.cli import main
    from glmkit.eval.toolrl import ToolEpisodes
    from glmkit.eval.toolsft import write_suite
    from glmkit.eval.tooltasks import ToolSuite

    suite = ToolSuite(seed=0, per_split={"train": 2, "heldout": 1}, families=("functions",), langs=("en",))
    write_suite(suite, tmp_path / "tasks", "glm4")
    source = ToolEpisodes.from_folder(tmp_path / "tasks", "heldout")
    assert [(t.id, t.question, t.answer, t.calls) for t in source.tasks] == \
        [(t.id, t.question, t.answer, t.calls) for t in suite.tasks("heldout")]
    init = _init_checkpoint(chat_tok, tmp_path / "init")
    argv = ["rl", "--init", str(init), "--rl-tasks", str(tmp_path / "tasks"), "--out-dir", str(tmp_path / "run"),
            "--seq-len", "4096", "--rl-group", "2", "--rl-tasks-per-batch", "1", "--rl-max-new-tokens", "4",
            "--rl-max-rounds", "1", "--max-steps", "1", "--save-every", "1", "--no-progress", "--no-tensorboard",
            "--device", "cpu", "--score-heldout"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "step 1: loss" in out
    scores = json.loads(out.strip().splitlines()[-1])["heldout"]
    assert scores["init"]["tasks"] == 1 and scores["rl"]["families"]["functions"]["answer_em_with_tools"] == 0.0
    record = json.loads((tmp_path / "run" / "train_config.json").read_text())
    data = record["fingerprint"]["objective"]["data"]
    assert data["tasks"] == ToolEpisodes.from_folder(tmp_path / "tasks", "train").fingerprint and data["rl_group"] == 2
