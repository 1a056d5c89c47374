"""The batch iterator: documents -> an endless, resumable stream of packed `Batch`es.

Each epoch deterministically shuffles the documents (seed, epoch) and gives rank r every
world_size-th of them; documents are cut into pieces that fit a row (`packing.chunk_length`), and
the pieces form this rank's stream. A batch takes pieces from the stream in order, corrupts them with
the objective and packs them first-fit (`packing.pack`); pieces that did not fit stay at the head of
the stream for the next batch. Epochs run into each other without a gap.

Determinism and resumption: a batch is a pure function of (seed, rank, step) for its randomness and
of the stream cursor (epoch, piece) for its text, so `state_dict()` is three integers and a resumed
iterator yields bit for bit the batches the original would have.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

import numpy as np

from glmkit.batch import Batch
from glmkit.errors import GlmkitError
from glmkit.objectives import ObjectiveConfig, SpecialIds, chunk_length, offsets_of
from glmkit.packing import PackResult, PackStats, pack


class BatchIterator:
    """Yields `Batch` (numpy, batch_size x seq_len) forever.

    documents: token arrays (one per document, e.g. `glmkit.corpus.Corpus.documents("train")`);
    empty ones are skipped and counted. `stats` accumulates `PackStats` over the batches yielded;
    `last` is the `PackResult` of the latest batch (its samples, rows and columns)."""

    def __init__(self, documents: list[np.ndarray], objective: ObjectiveConfig, specials: SpecialIds,
                 batch_size: int, seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size < 1 or seq_len < 1:
            raise GlmkitError(f"batch_size={batch_size} and seq_len={seq_len} must both be >= 1")
        if not 0 <= rank < world_size:
            raise GlmkitError(f"rank={rank} is outside world_size={world_size}; use 0 <= rank < world_size")
        if seed < 0:
            raise GlmkitError(f"seed={seed} must be >= 0")
        objective.check(specials)
        self.documents, self.objective, self.specials = documents, objective, specials
        self.batch_size, self.seq_len, self.seed, self.rank, self.world_size = batch_size, seq_len, seed, rank, world_size
        self.chunk_len = chunk_length(objective, seq_len)
        self.doc_len = self._check_documents(documents, specials)
        n_usable = int((self.doc_len > 0).sum())
        if n_usable < world_size:
            raise GlmkitError(f"{n_usable} non-empty documents cannot feed {world_size} ranks; "
                              "give more documents or use fewer ranks")
        self.epoch, self.cursor, self.step = 0, 0, 0
        self.stats = PackStats()
        self.skipped_empty = len(documents) - n_usable
        self.total_pieces = int((-(-self.doc_len // self.chunk_len)).sum())
        self.last: PackResult | None = None
        self.last_source = np.zeros((0, 2), dtype=np.int64)   # (epoch, document) of each sample of `last`
        self._pieces: dict[int, tuple[np.ndarray, ...]] = {}

    @staticmethod
    def _check_documents(documents, specials: SpecialIds) -> np.ndarray:
        if len(documents) == 0:
            raise GlmkitError("no documents to iterate over; build a corpus first (glmkit corpus build)")
        lengths = np.empty(len(documents), dtype=np.int64)
        for i, d in enumerate(documents):
            if getattr(d, "ndim", None) != 1:
                raise GlmkitError(f"document {i} is not a 1-D token array; pass a list of 1-D integer arrays")
            lengths[i] = len(d)
            if len(d) and (int(d.min()) < 0 or int(d.max()) >= specials.vocab_size):
                raise GlmkitError(f"document {i} has token ids outside 0..{specials.vocab_size - 1}; "
                                  "the documents were tokenized with another tokenizer — rebuild the corpus")
        return lengths

    # ------------------------------------------------------------ the stream of pieces

    def _epoch_pieces(self, epoch: int) -> tuple[np.ndarray, ...]:
        """This rank's pieces in epoch order: document, start token, length (P,), and the running
        total of their lengths (P+1,)."""
        if epoch not in self._pieces:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.documents))
            order = order[self.rank::self.world_size]
            order = order[self.doc_len[order] > 0]
            L = self.doc_len[order]
            n = -(-L // self.chunk_len)
            doc = np.repeat(order, n)
            k = np.arange(int(n.sum())) - np.repeat(offsets_of(n)[:-1], n)
            start = k * self.chunk_len
            length = np.minimum(self.chunk_len, self.doc_len[doc] - start)
            if len(self._pieces) >= 2:                          # keep the current and the next epoch
                del self._pieces[min(self._pieces)]
            self._pieces[epoch] = (doc, start, length, offsets_of(length))
        return self._pieces[epoch]

    def _window(self, budget: int) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]], np.ndarray]:
        """Pieces from the cursor on until `budget` text tokens: flat tokens, offsets, the (epoch,
        cursor) after each piece (to advance by however many the batch consumes), and the
        (epoch, document) of each piece."""
        parts, lengths, after, source = [], [], [], []
        epoch, cursor, total = self.epoch, self.cursor, 0
        while total < budget:
            doc, start, length, cum = self._epoch_pieces(epoch)
            if cursor >= len(doc):
                if len(doc) == 0:
                    raise GlmkitError(f"rank {self.rank} has no non-empty document; use fewer ranks")
                epoch, cursor = epoch + 1, 0
                continue
            end = min(len(doc), int(np.searchsorted(cum, cum[cursor] + budget - total)))
            for i in range(cursor, end):
                d, s = int(doc[i]), int(start[i])
                parts.append(self.documents[d][s:s + int(length[i])])
            lengths.append(length[cursor:end])
            source.append(np.stack([np.full(end - cursor, epoch), doc[cursor:end]], 1))
            after.extend((epoch, i + 1) for i in range(cursor, end))
            total += int(length[cursor:end].sum())
            cursor = end
        tokens = np.concatenate(parts).astype(np.int64, copy=False)
        return tokens, offsets_of(np.concatenate(lengths)), after, np.concatenate(source)

    # ------------------------------------------------------------ batches

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        return self.next_result().batch

    def next_result(self) -> PackResult:
        """The next batch with its packing details."""
        budget = self.batch_size * self.seq_len + self.chunk_len // 4
        seen = 0
        while True:
            tokens, offsets, after, source = self._window(budget)
            rng = np.random.default_rng([self.seed, self.rank, self.step])
            res = pack(tokens, offsets, self.objective, self.specials, rng, self.batch_size, self.seq_len)
            if res.consumed == 0:
                raise GlmkitError("a document piece does not fit an empty row; this is a bug in chunk_length")
            self.epoch, self.cursor = after[res.consumed - 1]
            self.step += 1
            self.stats = self.stats + res.stats
            if res.stats.samples > 0:
                self.last, self.last_source = res, source[res.index]
                return res
            seen += res.consumed
            if seen > self.total_pieces:
                raise GlmkitError(
                    f"no document makes a {self.objective.kind} sample: all are shorter than "
                    f"{self.objective.min_length} tokens; give longer documents")

    # ------------------------------------------------------------ resumption

    def _fingerprint(self) -> str:
        cfg = json.dumps({"objective": self.objective.to_dict(), "specials": repr(self.specials),
                          "batch_size": self.batch_size, "seq_len": self.seq_len,
                          "doc_len": hashlib.sha1(self.doc_len.tobytes()).hexdigest()}, sort_keys=True)
        return hashlib.sha1(cfg.encode()).hexdigest()[:16]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "step": self.step, "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size, "fingerprint": self._fingerprint(),
                "stats": asdict(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "rank", "world_size", "fingerprint"):
            if state.get(key) != mine[key]:
                raise GlmkitError(
                    f"data state was saved with {key}={state.get(key)!r}, this iterator has {mine[key]!r}; "
                    "resume with the same documents, objective, batch size, sequence length, seed and ranks")
        self.epoch, self.cursor, self.step = int(state["epoch"]), int(state["cursor"]), int(state["step"])
        s = dict(state.get("stats", {}))
        s["kind_counts"] = tuple(s.get("kind_counts", PackStats().kind_counts))
        self.stats = PackStats(**s)
