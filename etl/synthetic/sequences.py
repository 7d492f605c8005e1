"""The generator's optional sequence features (``python etl/run.py --with-sequences``).

Adds four columns to the Criteo-shaped rows of :mod:`ctrflow.etl.synthetic`:

* ``item_id`` (int64): the candidate item shown, one of ``N_ITEMS`` items;
* ``hist_items`` (``list<int64>``): the user's past clicks, **newest first**, ids from the same item
  space, length ``min(MAX_HIST, geometric - 1)`` (mean ~20, max 100, ~5% empty);
* ``tags`` (``list<int64>``) and ``tags_weights`` (``list<float32>``, same lengths): the user's
  interest tags (one tag per item cluster) with strengths in (0, 1].

Click model: every item belongs to one of ``N_CLUSTERS`` clusters. A row's user likes
``USER_CLUSTERS`` clusters; 70% of the history comes from them, the rest from global popularity;
15% of candidates are an item of the row's own history (recent ones more often: re-engagement),
35% of the others come from the user's clusters. The logit gains

    SEQ_A * tanh(sum_j DECAY**j * (1[h_j == item] + SIMILAR * 1[cluster(h_j) == cluster(item)]) / SEQ_SCALE)
    + TAG_B * sum_j w_j * 1[tag_j == tag(cluster(item))]
    + the candidate's own (faded, centred) popularity effect,

minus a constant that keeps the mean logit where it was (the click rate rises to ~26.5% with the
wider spread of logits): recent clicks on the same item or on a
similar item (same cluster) raise the click probability, more when they are recent. All draws come
from generators seeded by ``(seed, 10 + k, block)``, so the base columns are byte-identical to a run
without sequences; only the labels change (their probability includes these terms). A sequence-free
model can still learn the candidate's average effect: ``oracle_no_sequence`` (AUC of the true logit
minus the sequence terms plus their per-item mean) approximates what it can reach. With 1M rows,
seed 0: oracle valid AUC 0.820, sequence-free oracle ~0.759.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from ctrflow.etl.synthetic.oracle import auc, finite, logloss

VERSION = 1  # bump whenever the sequence data for a given seed changes (etl/run.py's cache keys on it)
N_ITEMS = 20_000
N_CLUSTERS = 100
USER_CLUSTERS = 3
MAX_HIST = 100
MEAN_HIST = 20
MAX_TAGS = 30
IN_CLUSTER_HIST = 0.7  # share of history drawn from the user's clusters
IN_CLUSTER_CAND = 0.35  # share of candidates from the user's clusters
REPEAT_CAND = 0.15  # share of candidates taken from the row's own history (recent ones more often)
DECAY = 0.9  # recency weight of history position j (0 = newest)
SIMILAR = 0.3  # weight of a same-cluster history item relative to the same item
SEQ_A, SEQ_SCALE = 2.0, 1.5
TAG_B = 1.0
ITEM_A, ITEM_S = 0.3, 1.05
COLUMNS = {"item": "item_id", "history": "hist_items", "tags": "tags", "weights": "tags_weights"}
SHIFT_ROWS = 1 << 16  # rows drawn once to centre the sequence terms


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(key))))


def _zipf_rank(u: np.ndarray, k: Any, s: float) -> np.ndarray:
    """Inverse CDF of the density ~x^-s on [1, k+1) (``k`` scalar or per row): ranks in [0, k)."""
    e = 1.0 - s
    x = (1.0 + u * ((k + 1.0) ** e - 1.0)) ** (1.0 / e)
    return np.minimum(x.astype(np.int64) - 1, np.asarray(k) - 1)


def mix32(x: np.ndarray, salt: int) -> np.ndarray:
    """A bijective 32-bit mix of ``x + salt`` (uint32): distinct inputs give distinct, scattered outputs.

    Also the base generator's hex-string ids (``synthetic._hex``).
    """
    x = (x.astype(np.uint64) + np.uint64(salt)).astype(np.uint32)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint32(16)
        x *= np.uint32(0x7FEB352D)
        x ^= x >> np.uint32(15)
        x *= np.uint32(0x846CA68B)
        x ^= x >> np.uint32(16)
    return x


def _mix(x: np.ndarray, salt: int) -> np.ndarray:
    """Item / tag ranks -> scattered positive int64 ids."""
    return mix32(x, salt).astype(np.int64)


class SequenceModel:
    """Item clusters, popularity effects and id salts drawn from the seed."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        rng = _rng(seed, 10)
        self.cluster = rng.integers(0, N_CLUSTERS, N_ITEMS)  # of item rank r (0 = most popular)
        order = np.argsort(self.cluster, kind="stable")  # items grouped by cluster, popular first
        self.members = order
        self.size = np.bincount(self.cluster, minlength=N_CLUSTERS)
        self.start = np.concatenate([[0], np.cumsum(self.size)[:-1]])
        q = np.diff(np.arange(1, N_ITEMS + 2, dtype=np.float64) ** (1 - ITEM_S))
        q /= q.sum()
        eff = ITEM_A * rng.standard_normal(N_ITEMS) * q / (q + 5e-3)
        self.item_effect = eff - q @ eff
        self.item_salt, self.tag_salt = (int(v) for v in rng.integers(0, 2**32, 2))
        self.shift = 0.0
        self.shift = float(self.draw(_rng(seed, 11), SHIFT_ROWS)["term"].mean())

    def _in_clusters(self, rng: np.random.Generator, clusters: np.ndarray) -> np.ndarray:
        """An item of each given cluster, by popularity within the cluster."""
        k = self.size[clusters]
        return self.members[self.start[clusters] + _zipf_rank(rng.random(clusters.shape), k, ITEM_S)]

    def draw(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        """Sequence features of ``n`` rows as padded arrays, plus their logit term [n].

        Elements are drawn flat (``sum(lengths)`` of them, not ``n * MAX_HIST``), then scattered
        into the padded layout the generator slices by rows.

        Returns:
            ``item`` [n], ``hist`` [n, MAX_HIST] and ``hist_len`` [n], ``tags`` [n, MAX_TAGS],
            ``tag_w`` [n, MAX_TAGS] and ``tag_len`` [n] (ranks; positions past the length are 0),
            ``term`` [n] and ``item_term`` [n] (the candidate's popularity effect alone).
        """
        user = rng.integers(0, N_CLUSTERS, (n, USER_CLUSTERS))
        cand_cluster = user[np.arange(n), rng.integers(0, USER_CLUSTERS, n)]
        item = np.where(rng.random(n) < IN_CLUSTER_CAND, self._in_clusters(rng, cand_cluster),
                        _zipf_rank(rng.random(n), N_ITEMS, ITEM_S))
        # History, flat: element e belongs to row[e] at position pos[e] (0 = newest).
        hist_len = np.minimum(rng.geometric(1.0 / (MEAN_HIST + 1), n) - 1, MAX_HIST)
        row, pos = _rows_positions(hist_len)
        mine = rng.random(len(row)) < IN_CLUSTER_HIST
        hist = np.empty(len(row), dtype=np.int64)
        hist[mine] = self._in_clusters(rng, user[row[mine], rng.integers(0, USER_CLUSTERS, int(mine.sum()))])
        hist[~mine] = _zipf_rank(rng.random(len(row) - int(mine.sum())), N_ITEMS, ITEM_S)
        # Re-engagement: some candidates are an item of the row's own history, recent ones more often.
        again = (rng.random(n) < REPEAT_CAND) & (hist_len > 0)
        back = np.minimum(rng.geometric(0.3, n) - 1, np.maximum(hist_len - 1, 0))
        item = np.where(again, hist[np.minimum(np.cumsum(hist_len) - hist_len + back, max(len(hist) - 1, 0))]
                        if len(hist) else item, item)
        match = (hist == item[row]) + SIMILAR * (self.cluster[hist] == self.cluster[item][row])
        s = np.bincount(row, weights=match * (DECAY ** np.arange(MAX_HIST))[pos], minlength=n)
        # Tags: the user's clusters with strong weights, then random ones with weak weights, shuffled.
        tag_len = np.minimum(USER_CLUSTERS + rng.poisson(5.0, n), MAX_TAGS)
        trow, tpos = _rows_positions(tag_len)
        mine = tpos < USER_CLUSTERS
        tags = np.where(mine, user[trow, np.minimum(tpos, USER_CLUSTERS - 1)], rng.integers(0, N_CLUSTERS, len(trow)))
        tag_w = np.where(mine, rng.uniform(0.5, 1.0, len(trow)), rng.uniform(0.0, 0.5, len(trow))).astype(np.float32)
        order = np.argsort(trow + rng.random(len(trow)))  # a random order within each row
        tags, tag_w = tags[order], tag_w[order]
        on = tags == self.cluster[item][trow]
        item_term = self.item_effect[item]
        term = (SEQ_A * np.tanh(s / SEQ_SCALE) + TAG_B * np.bincount(trow, weights=tag_w * on, minlength=n)
                + item_term - self.shift)
        return {"item": item, "hist": _padded(hist, row, pos, MAX_HIST, n), "hist_len": hist_len,
                "tags": _padded(tags, trow, tpos, MAX_TAGS, n), "tag_w": _padded(tag_w, trow, tpos, MAX_TAGS, n),
                "tag_len": tag_len, "term": term, "item_term": item_term}

    def block(self, b: int, n: int) -> dict[str, np.ndarray]:
        """Block ``b``'s rows (the layout of :meth:`draw`, leading axis last for concatenation)."""
        d = self.draw(_rng(self.seed, 12, b), n)
        for k in ("hist", "tags"):  # ranks < 65,536: a part of 500k rows holds 100 MB of padded history
            d[k] = d[k].astype(np.uint16)
        return {f"seq_{k}": (v.T if v.ndim == 2 else v) for k, v in d.items()}

    def arrays(self, part: dict[str, np.ndarray]) -> dict[str, pa.Array]:
        """The four output columns of a part (``seq_*`` arrays of :meth:`block`, concatenated)."""
        return {
            COLUMNS["item"]: pa.array(_mix(part["seq_item"], self.item_salt)),
            COLUMNS["history"]: _ragged(part["seq_hist"].T, part["seq_hist_len"], lambda r: _mix(r, self.item_salt)),
            COLUMNS["tags"]: _ragged(part["seq_tags"].T, part["seq_tag_len"], lambda r: _mix(r, self.tag_salt)),
            COLUMNS["weights"]: _ragged(part["seq_tag_w"].T, part["seq_tag_len"]),
        }


def _rows_positions(lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row [T] and position within the row [T] of every element of lists with lengths [n]."""
    row = np.repeat(np.arange(len(lens)), lens)
    starts = np.cumsum(lens) - lens
    return row, np.arange(len(row)) - starts[row]


def _padded(flat: np.ndarray, row: np.ndarray, pos: np.ndarray, width: int, n: int) -> np.ndarray:
    out = np.zeros((n, width), dtype=flat.dtype)
    out[row, pos] = flat
    return out


def _ragged(padded: np.ndarray, lens: np.ndarray, fn: Any = None) -> pa.Array:
    """A list array from a padded [n, L] array and lengths [n] (row-major, no Python loop), with
    ``fn`` applied to the kept elements only."""
    keep = np.arange(padded.shape[1])[None, :] < lens[:, None]
    offsets = np.zeros(len(lens) + 1, dtype=np.int32)
    np.cumsum(lens, out=offsets[1:])
    flat = padded[keep]
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(fn(flat) if fn is not None else flat))


def meta(model: SequenceModel) -> dict[str, Any]:
    """The ``sequences`` entry of ``synthetic.json`` (without the oracle, added by the generator)."""
    return {"version": VERSION, "columns": dict(COLUMNS), "items": N_ITEMS, "clusters": N_CLUSTERS,
            "max_hist": MAX_HIST, "mean_hist": MEAN_HIST, "max_tags": MAX_TAGS, "order": "newest first"}


def no_sequence_logit(logit: np.ndarray, term: np.ndarray, item_term: np.ndarray, item: np.ndarray,
                      population: np.ndarray) -> np.ndarray:
    """The logit a model without the lists could at best learn, approximately.

    Args:
        logit, term, item_term, item: [n] true logits, sequence terms, the candidate's own effect
            and the candidate's rank of the rows scored.
        population: [3, m] ``(term, item_term, item)`` of the rows whose per-item means are used.

    Returns:
        [n] the true logit minus the list terms plus their mean for the row's candidate item.
    """
    seq_all = population[0] - population[1]
    it = population[2].astype(np.int64)
    mean = np.bincount(it, weights=seq_all, minlength=N_ITEMS) / np.maximum(np.bincount(it, minlength=N_ITEMS), 1)
    return logit - (term - item_term) + mean[item]


def no_sequence_oracle(y: dict, p: dict, rows: dict) -> dict:
    """AUC / logloss of the best sequence-free scores (approximately: :func:`no_sequence_logit`, with
    the per-item means taken over both splits).

    Args:
        y, p: ``{split: labels [n]}``, ``{split: true probabilities [n]}``.
        rows: ``{split: [3, n] (term, item_term, item)}``.
    """
    out = {}
    both = np.concatenate([rows["train"], rows["valid"]], axis=1)
    for s in ("valid", "train"):
        term, item_term, item = rows[s]
        logit = np.log(np.clip(p[s], 1e-300, None)) - np.log1p(-np.clip(p[s], None, 1 - 1e-16))
        q = 1.0 / (1.0 + np.exp(-no_sequence_logit(logit, term, item_term, item.astype(np.int64), both)))
        out[f"{s}_auc"], out[f"{s}_logloss"] = finite(auc(y[s], q)), finite(logloss(y[s], q))
    return out
