"""Reinforcement learning from outcomes: on-policy group sampling, group-relative advantages, and the
policy-gradient update as an advantage-weighted token loss on the model's own samples.

    source = ToolEpisodes(...)       # any `EpisodeSource`; glmkit.eval.toolrl plays tool-use tasks
    it = RLBatchIterator(source, model, tokenizer, group=4, tasks=4, seq_len=512, layout="chat", seed=0)
    batch = next(it)                 # a numpy Batch whose loss_weight holds each sampled token's advantage

One batch (GRPO's recipe, without its KL term):
1. take the next `tasks` tasks of the source (an epoch shuffles them by (seed, epoch); data shard r of
   `world_size` takes every world_size-th);
2. play each task `group` times with the weights being trained (`source.play`, model in eval mode, then
   back to train mode): `Episode`s, each the generation rounds of one attempt (`Round`: the prompt ids the
   engine read, the ids it sampled ending with the stop id) and a scalar reward;
3. advantage of attempt j of a task: A_j = r_j - mean(r) over its group (`advantages`); with `scale_std`
   also divided by the group's sample standard deviation (ddof = 1) + 1e-4, as TRL's GRPO does (off by
   default, as Dr. GRPO recommends: dividing by the std weighs near-solved and near-hopeless tasks up);
4. an attempt with A = 0 adds nothing to the gradient and is left out, and so is a whole group whose
   rewards are all equal (DAPO's dynamic sampling, without re-drawing). Each round of each kept attempt
   becomes one packed conversation (`glmkit.train.chat_data.pack_rows`): its prompt without loss, its
   sampled ids as loss positions, weighted by the attempt's advantage; a round whose prompt extends the
   previous round's ids continues that conversation instead (`episode_examples`: the same ids, positions
   and attention, the shared prefix computed once). A batch without any kept attempt
   holds one round at weight 0 (a zero gradient), so a step never has nothing to score. A batch has as
   many rows of `seq_len` as its rounds need.

The trainer's loss over a step is then sum(A x -log p(token)) / (tokens of the kept attempts), whose
gradient is the policy gradient with token-level normalisation (DAPO, Dr. GRPO). It is on-policy: the
samples come from the current weights and each batch makes one optimizer step, so PPO / GRPO's importance
ratio is exactly 1 and the gradient of its clipped objective is this one. No reference model, no KL
penalty: the update moves only where a group's attempts differ in reward. Sampling at a temperature
other than 1 samples from a sharpened (or flattened) policy, slightly off the one the loss differentiates.

Training sees exactly the ids the model was conditioned on and sampled, never a re-rendering of the parsed
messages (which could tokenize differently).

Exact resume: the seed of attempt j of a task is a function of (seed, epoch, the task's index, j), and
`state_dict()` is (epoch, cursor): a resumed run samples the same episodes from the same weights.
`pop_metrics()` returns the means of this process's episodes since its last call (reward, the source's
per-episode measurements, groups kept, sampling time), which the training loop logs with each step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from glmkit.errors import GlmkitError
from glmkit.train.chat_data import LAYOUTS, pack_rows


@dataclass
class Episode:
    """One attempt at a task: its rounds as (prompt ids, sampled ids) pairs, its reward, and measurements of
    the source's choosing (numbers; averaged into the step's metrics)."""
    rounds: list[tuple[list[int], list[int]]]
    reward: float
    info: dict = field(default_factory=dict)


class EpisodeSource(Protocol):
    """What `RLBatchIterator` samples from. `tasks`: the training tasks (any objects); `fingerprint`: a
    string that changes when they or the scoring change (a resumed run must see the same);
    `play(model, tokenizer, task, seeds, causal=, max_len=)`: one `Episode` per seed, generated with `model`
    (in eval mode; build a fresh engine: a cached prefix from older weights is stale), every round at most
    `max_len` tokens; `causal`: the model reads chat as plain text (CLM-trained and HF models)."""
    tasks: list
    fingerprint: str

    def play(self, model, tokenizer, task, seeds: list[int], *, causal: bool, max_len: int) -> list[Episode]: ...


def advantages(rewards, scale_std: bool = False) -> np.ndarray:
    """Group-relative advantages of one group's rewards: r - mean(r), divided by std(r, ddof=1) + 1e-4 with
    `scale_std` (a group of one has advantage 0)."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 1 or len(r) == 0:
        raise GlmkitError(f"advantages need a 1-D group of rewards, got shape {r.shape}")
    a = r - r.mean()
    if scale_std and len(r) > 1:
        a = a / (r.std(ddof=1) + 1e-4)
    return a


def round_example(prompt: list[int], sampled: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, loss) of one round as a packable conversation: position i is a loss position when token i + 1
    was sampled (the positions P-1 .. P+G-2 of a prompt of P and G sampled ids)."""
    ids = np.asarray(list(prompt) + list(sampled), dtype=np.int64)
    loss = np.zeros(len(ids), dtype=bool)
    loss[len(prompt) - 1:len(ids) - 1] = True
    return ids, loss


def episode_examples(rounds: list[tuple[list[int], list[int]]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The packable conversations of one attempt's rounds: a round whose prompt starts with everything the
    previous one read and sampled continues that conversation (one sequence, the ids between the two
    samples, e.g. a tool result, without loss); otherwise it starts its own. The same ids at the same
    positions under the same causal attention, so the loss is that of separate rounds, at the cost of
    the longest prompt instead of all of them."""
    out: list[tuple[list[int], list[bool]]] = []     # (ids, whether position i predicts a sampled id)
    for prompt, sampled in rounds:
        if not sampled:
            continue
        prev = out[-1][0] if out else None
        if prev is not None and len(prompt) >= len(prev) and list(prompt[:len(prev)]) == prev:
            ids, learn = out[-1]
            learn.extend([False] * (len(prompt) - len(ids)))
            ids.extend(prompt[len(ids):])
        else:
            ids, learn = list(prompt), [False] * len(prompt)
            out.append((ids, learn))
        learn[-1] = True                      # the prompt's last token predicts the first sampled id
        ids.extend(sampled)
        learn.extend([True] * (len(sampled) - 1) + [False])
    return [(np.asarray(ids, dtype=np.int64), np.asarray(learn, dtype=bool)) for ids, learn in out]


def _seed(seed: int, epoch: int, task: int, attempt: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, task, attempt]).generate_state(1)[0])


class RLBatchIterator:
    """Yields numpy `Batch`es of sampled, advantage-weighted rounds forever; see the module docstring.
    `model` is the module being trained (unwrapped: the engine runs its forward with a KV cache)."""

    def __init__(self, source: EpisodeSource, model: torch.nn.Module, tokenizer, *, group: int, tasks: int,
                 seq_len: int, layout: str, scale_std: bool = False, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        if group < 2:
            raise GlmkitError(f"--rl-group {group}: a group needs at least 2 attempts (its mean is the baseline)")
        if tasks < 1 or seq_len < 2:
            raise GlmkitError(f"tasks per batch ({tasks}) must be >= 1 and seq_len ({seq_len}) >= 2")
        if not 0 <= rank < world_size:
            raise GlmkitError(f"rank={rank} is outside world_size={world_size}; use 0 <= rank < world_size")
        if len(source.tasks) < world_size:
            raise GlmkitError(f"{len(source.tasks)} tasks cannot feed {world_size} data shards; give more tasks "
                              "or use fewer shards")
        if layout not in LAYOUTS:
            raise GlmkitError(f"unknown chat layout {layout!r}; use one of {', '.join(LAYOUTS)}")
        self.source, self.model, self.tokenizer = source, model, tokenizer
        self.group, self.tasks, self.seq_len, self.layout, self.scale_std = group, tasks, seq_len, layout, scale_std
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.cursor = 0, 0
        self._order: dict[int, np.ndarray] = {}
        self._metrics: list[dict] = []

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._order:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.source.tasks))
            self._order = {epoch: order[self.rank::self.world_size]}
        return self._order[epoch]

    def _next_tasks(self) -> list[tuple[int, int]]:
        """(epoch, task index) of the next `tasks` tasks; moves the cursor."""
        out = []
        while len(out) < self.tasks:
            order = self._epoch_order(self.epoch)
            if self.cursor >= len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
                continue
            out.append((self.epoch, int(order[self.cursor])))
            self.cursor += 1
        return out

    def __iter__(self):
        return self

    def __next__(self):
        picks = self._next_tasks()
        start, was_training = time.perf_counter(), self.model.training
        self.model.eval()
        try:
            groups = [self.source.play(self.model, self.tokenizer, self.source.tasks[i],
                                       [_seed(self.seed, epoch, i, j) for j in range(self.group)],
                                       causal=self.layout == "causal", max_len=self.seq_len)
                      for epoch, i in picks]
        finally:
            self.model.train(was_training)
        sample_s = time.perf_counter() - start
        examples, weights, kept = [], [], 0
        for episodes in groups:
            if len(episodes) != self.group:
                raise GlmkitError(f"the episode source played {len(episodes)} attempts, asked for {self.group}")
            adv = advantages([e.reward for e in episodes], self.scale_std)
            if not np.any(adv):
                continue
            kept += 1
            for episode, a in zip(episodes, adv):
                if a == 0:                       # no gradient from it
                    continue
                for example in episode_examples(episode.rounds):
                    examples.append(example)
                    weights.append(float(a))
        if not examples:                         # no group carries a signal: one round at weight 0
            prompt, sampled = next((r for g in groups for e in g for r in e.rounds if r[1]), ([0, 0], [0]))
            examples, weights = [round_example(prompt, sampled)], [0.0]
        self._record(groups, kept, sample_s)
        return self._pack(examples, weights)

    def _pack(self, examples, weights):
        too_long = max(len(ids) for ids, _ in examples)
        if too_long > self.seq_len:
            raise GlmkitError(f"the episode source returned a round of {too_long} tokens, more than seq_len "
                              f"{self.seq_len}; it must keep every round within max_len")
        batch, placed = pack_rows(examples, len(examples), self.seq_len, self.layout, self.tokenizer.pad_id,
                                  weights=weights)
        assert placed == len(examples)
        rows = int((batch.segment_ids >= 0).any(axis=1).sum())      # next-fit fills rows from the top
        return batch[:rows]

    def _record(self, groups: list[list[Episode]], kept: int, sample_s: float) -> None:
        episodes = [e for g in groups for e in g]
        m = {"reward": float(np.mean([e.reward for e in episodes])), "groups_kept": kept / len(groups),
             "sample_s": sample_s, "sampled_tokens": sum(len(s) for e in episodes for _, s in e.rounds)}
        for key in sorted({k for e in episodes for k in e.info}):
            m[key] = float(np.mean([e.info.get(key, 0) for e in episodes]))
        self._metrics.append(m)

    def pop_metrics(self) -> dict:
        """Means of the batches drawn since the last call (sums for sample_s and sampled_tokens); {} if none."""
        rows, self._metrics = self._metrics, []
        if not rows:
            return {}
        out = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        for k in ("sample_s", "sampled_tokens"):
            out[k] = float(sum(r[k] for r in rows))
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "fingerprint": self._fingerprint()}

    def _fingerprint(self) -> str:
        return (f"{self.source.fingerprint}:{len(self.source.tasks)}:{self.group}:{self.tasks}:{self.seq_len}:"
                f"{self.layout}:{self.scale_std}")

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "rank", "world_size", "fingerprint"):
            if state.get(key) != mine[key]:
                raise GlmkitError(f"RL data state was saved with {key}={state.get(key)!r}, this run has "
                                  f"{mine[key]!r}; resume with the same tasks, group, tasks per batch, sequence "
                                  "length, seed and data shards")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
