"""The click model of the synthetic data set (:mod:`ctrflow.etl.synthetic`): column parameters and the draw.

Click model, ``logit = BIAS + the terms below``, ``p = sigmoid(logit)``:

* **Categorical main effects.** Column c draws a rank r from a Zipf law (exponent ``s_c``, ``K_c``
  values) or null. Effect ``a_c * z_c[r] * q_r / (q_r + Q0)``, ``z_c[r] ~ N(0, 1)``, ``q_r`` the
  rank's row frequency, ``Q0 = 5e-3``: values seen in more than ~1 row in 200 carry their effect,
  rarer ones fade to none, so the signal sits where ~1.8M rows teach it in one epoch and the long
  tail (and any value unseen in training) is noise. Null is one more value with its own effect.
  Each column's effects are then centred (row-weighted mean 0; the tail and unseen values share
  the small constant left), so the click rate stays near 25% whatever the seed. C12, C15, C18, C21
  and C26 are uninformative (``a_c = 0``).
* **One pairwise interaction** C1 x C6: ``0.5 * <u[r1], v[r6]> / 2`` with 4-dim N(0, 1) factors
  faded and centred the same way (the dot-product interaction DLRM models).
* **Continuous effects** of ``t_j = log1p(max(I_j, 0))``, missing read as ``t_j = 0`` (exactly what
  FillMissing(0) -> Clip(0) -> LogOp leaves): ``beta_j * tanh((t_j - m_j) / w_j)``, or a bump
  ``beta_j * exp(-((t_j - m_j) / w_j)^2 / 2)`` for I3 and I7. Missingness thus carries the signal of
  ``t = 0``; I2's negative values none of their own.
* **Drift.** In validation rows, 2-5% of the values of the columns with K >= 2,000 come from a fresh
  id range never seen in training (no effect); with the Zipf tails, 9-13% of the validation values of
  the six columns with K >= 286,181 are unseen in training.

The I columns share a latent "activity" factor; I3/I4/I6/I13 and I1/I10 go missing together. Rows
are drawn in blocks of 65,536 from generators seeded by ``(seed, block)`` (:func:`draw_rows`), so the
data depends on ``seed``, ``rows`` and ``valid_fraction`` only. Anything changed here changes the data
of a seed: bump ``ctrflow.etl.synthetic.VERSION`` (caches key on it).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ctrflow.etl.synthetic.sequences import SequenceModel

BLOCK_ROWS = 1 << 16
Q0 = 5e-3  # row frequency at which a category carries half of its effect
BIAS = -1.33  # sets the click rate near Criteo's ~25%
INTERACTION = ("C1", "C6", 0.5, 4)  # columns, weight b, factor dim

# name: (cardinality K, Zipf exponent s, null rate, effect scale a, validation drift share)
CATEGORICAL = {
    "C1": (1_460, 1.10, 0.0, 0.52, 0.0),
    "C2": (583, 1.05, 0.0, 0.40, 0.0),
    "C3": (1_000_000, 1.10, 0.034, 0.52, 0.05),
    "C4": (500_000, 1.10, 0.034, 0.40, 0.05),
    "C5": (305, 1.30, 0.0, 0.29, 0.0),
    "C6": (24, 0.90, 0.04, 0.35, 0.0),
    "C7": (12_517, 1.10, 0.0, 0.35, 0.02),
    "C8": (633, 1.20, 0.0, 0.23, 0.0),
    "C9": (10, 1.50, 0.0, 0.23, 0.0),
    "C10": (93_145, 1.05, 0.0, 0.35, 0.03),
    "C11": (5_683, 1.10, 0.0, 0.29, 0.02),
    "C12": (800_000, 1.10, 0.034, 0.00, 0.05),
    "C13": (3_194, 1.10, 0.0, 0.23, 0.02),
    "C14": (27, 0.80, 0.0, 0.29, 0.0),
    "C15": (14_992, 1.05, 0.0, 0.00, 0.02),
    "C16": (400_000, 1.10, 0.034, 0.29, 0.05),
    "C17": (10, 0.70, 0.0, 0.35, 0.0),
    "C18": (5_652, 1.10, 0.0, 0.00, 0.02),
    "C19": (2_173, 1.20, 0.44, 0.23, 0.02),
    "C20": (12, 0.60, 0.44, 0.35, 0.0),
    "C21": (700_000, 1.10, 0.034, 0.00, 0.05),
    "C22": (18, 1.01, 0.76, 0.29, 0.0),
    "C23": (15, 0.90, 0.0, 0.35, 0.0),
    "C24": (286_181, 1.10, 0.034, 0.29, 0.05),
    "C25": (105, 1.20, 0.44, 0.29, 0.0),
    "C26": (142_572, 1.10, 0.44, 0.00, 0.05),
}
# name: (mu, sigma of log count, corr. with activity, missing rate, missing group, shape, beta, width)
# missing group 0 = independent; rows share a draw within groups 1 and 2.
CONTINUOUS = {
    "I1": (0.7, 1.2, 0.5, 0.45, 2, "tanh", 0.35, 1.0),
    "I2": (1.4, 1.8, 0.3, 0.0, 0, "tanh", -0.25, 1.5),
    "I3": (2.0, 1.3, 0.6, 0.21, 1, "bump", 0.30, 1.5),
    "I4": (1.6, 1.0, 0.6, 0.22, 1, "tanh", 0.20, 1.0),
    "I5": (7.9, 1.8, 0.4, 0.026, 0, "tanh", -0.30, 2.0),
    "I6": (3.6, 1.5, 0.5, 0.22, 1, "tanh", 0.20, 1.5),
    "I7": (1.6, 1.4, 0.7, 0.04, 0, "bump", -0.25, 1.5),
    "I8": (2.2, 1.0, 0.3, 0.0005, 0, "tanh", 0.15, 1.0),
    "I9": (3.7, 1.2, 0.6, 0.04, 0, "tanh", 0.0, 1.0),
    "I10": (0.5, 0.7, 0.4, 0.45, 2, "tanh", 0.35, 0.6),
    "I11": (0.7, 1.0, 0.7, 0.04, 0, "tanh", 0.30, 0.8),
    "I12": (0.0, 1.0, 0.3, 0.77, 0, "tanh", 0.20, 0.8),
    "I13": (1.6, 1.2, 0.6, 0.22, 1, "bump", 0.0, 1.0),
}
CATS = list(CATEGORICAL)
CONTS = list(CONTINUOUS)


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(key))))


def _zipf_rank(u: np.ndarray, k: int, s: float) -> np.ndarray:
    """Inverse CDF of the density ~x^-s on [1, k+1): uniform [n] -> ranks [n] in [0, k)."""
    e = 1.0 - s
    x = (1.0 + u * ((k + 1.0) ** e - 1.0)) ** (1.0 / e)
    return np.minimum(x.astype(np.int64) - 1, k - 1)


def _zipf_freq(k: int, s: float) -> np.ndarray:
    """Exact probability of each rank [k] under :func:`_zipf_rank`."""
    e = 1.0 - s
    edges = np.arange(1, k + 2, dtype=np.float64) ** e
    return np.diff(edges) / ((k + 1.0) ** e - 1.0)


def _fresh(k: int) -> int:
    """Size of the validation-only id range of a column of cardinality ``k``."""
    return max(1, k // 10)


def _weights(name: str) -> np.ndarray:
    """Training row share [K + fresh + 1] of each id of column ``name`` (fresh ids 0, null last)."""
    k, s, null = CATEGORICAL[name][:3]
    return np.concatenate([(1.0 - null) * _zipf_freq(k, s), np.zeros(_fresh(k)), [null]])


class ClickModel:
    """Per-column parameters drawn from the seed: effect tables, interaction factors, hex salts."""

    def __init__(self, seed: int, sequences: bool = False) -> None:
        self.seed = seed
        self.seq = SequenceModel(seed) if sequences else None  # etl/synthetic/sequences.py
        self.effect: dict[str, np.ndarray] = {}  # [K + fresh + 1]; the last entry is null's effect
        self.salt: dict[str, int] = {}
        for c, name in enumerate(CATS):
            k, s, null, a, _ = CATEGORICAL[name]
            rng = _rng(seed, 1, c)
            self.salt[name] = int(rng.integers(0, 2**32))
            q = (1.0 - null) * _zipf_freq(k, s)
            eff = np.zeros(k + _fresh(k) + 1)
            eff[:k] = a * rng.standard_normal(k) * q / (q + Q0)
            eff[-1] = a * rng.standard_normal() if null > 0 else 0.0
            self.effect[name] = eff - _weights(name) @ eff  # centred: the click rate barely moves with seed
        c1, c2, _, dim = INTERACTION
        rng = _rng(seed, 2)
        self.factors = []
        for name in (c1, c2):
            k, s, null = CATEGORICAL[name][:3]
            f = np.zeros((k + _fresh(k) + 1, dim))
            q = (1.0 - null) * _zipf_freq(k, s)
            f[:k] = rng.standard_normal((k, dim)) * (q / (q + Q0))[:, None]
            self.factors.append(f - _weights(name) @ f)

    def logit(self, cats: np.ndarray, t: np.ndarray) -> np.ndarray:
        """True logits [n] from category ids [26, n] (-1 = null) and ``t = log1p(max(I, 0))`` [13, n]."""
        z = np.full(cats.shape[1], BIAS)
        for c, name in enumerate(CATS):
            if CATEGORICAL[name][3]:
                z += self.effect[name][cats[c]]
        c1, c2, b, dim = INTERACTION
        u = self.factors[0][cats[CATS.index(c1)]]
        v = self.factors[1][cats[CATS.index(c2)]]
        z += (b / np.sqrt(dim)) * np.einsum("nd,nd->n", u, v)
        for j, name in enumerate(CONTS):
            _, _, _, _, _, shape, beta, width = CONTINUOUS[name]
            if beta:
                x = (t[j] - CONTINUOUS[name][0]) / width
                z += beta * (np.tanh(x) if shape == "tanh" else np.exp(-0.5 * x * x))
        return z

    def block(self, b: int, n: int, train_rows: int) -> dict[str, np.ndarray]:
        """Rows ``[b * BLOCK_ROWS, b * BLOCK_ROWS + n)``: label, ints, int mask, category ids, prob."""
        rng = _rng(self.seed, 3, b)
        # Continuous: a shared activity factor, lognormal-ish counts, grouped missingness.
        act = rng.standard_normal(n)
        eps = rng.standard_normal((len(CONTS), n))
        miss_u = rng.random((len(CONTS) + 2, n))  # own draws, then groups 1 and 2
        ints = np.empty((len(CONTS), n), dtype=np.int64)
        missing = np.empty((len(CONTS), n), dtype=bool)
        for j, name in enumerate(CONTS):
            mu, sigma, rho, rate, group = CONTINUOUS[name][:5]
            lat = mu + sigma * (rho * act + np.sqrt(1.0 - rho * rho) * eps[j])
            ints[j] = np.floor(np.exp(np.minimum(lat, 20.0)))
            missing[j] = miss_u[j if group == 0 else len(CONTS) + group - 1] < rate
        # I2 is "count - 1" with a few -2/-3, like Criteo's.
        j2 = CONTS.index("I2")
        ints[j2] -= 1 + (eps[j2] > 2.8) + (eps[j2] > 3.1)
        t = np.where(missing, 0.0, np.log1p(np.maximum(ints, 0)))
        # Categorical: one uniform decides null or a Zipf rank.
        u = rng.random((len(CATS), n))
        cats = np.empty((len(CATS), n), dtype=np.int32)
        for c, name in enumerate(CATS):
            k, s, null = CATEGORICAL[name][:3]
            cats[c] = np.where(u[c] < null, -1, _zipf_rank(np.maximum(u[c] - null, 0.0) / (1.0 - null), k, s))
        start = b * BLOCK_ROWS
        if start + n > train_rows:  # drift: validation rows take some ids from a fresh range
            drng = _rng(self.seed, 4, b)
            valid = np.arange(start, start + n) >= train_rows
            for c, name in enumerate(CATS):
                k, s, _, _, share = CATEGORICAL[name]
                if share:
                    dd = drng.random(n)
                    new = valid & (dd < share) & (cats[c] >= 0)
                    cats[c, new] = k + _zipf_rank(dd[new] / share, _fresh(k), s)
        z = self.logit(cats, t)
        seq = {} if self.seq is None else self.seq.block(b, n)  # own generators: base columns unchanged
        if seq:
            z = z + seq["seq_term"]
        prob = 1.0 / (1.0 + np.exp(-z))
        label = (rng.random(n) < prob).astype(np.int8)
        return {"label": label, "ints": ints, "missing": missing, "cats": cats, "prob": prob, **seq}


def draw_rows(model: ClickModel, rows: int, train_rows: int, sizes: list[int]) -> Iterator[dict]:
    """Yields consecutive row ranges of the given sizes, generating each block once."""
    pending: list[dict] = []
    have = 0
    b = 0
    for size in sizes:
        while have < size:
            n = min(BLOCK_ROWS, rows - b * BLOCK_ROWS)
            pending.append(model.block(b, n, train_rows))
            have += n
            b += 1
        out = {k: np.concatenate([p[k] for p in pending], axis=-1) for k in pending[0]}
        head = {k: v[..., :size] for k, v in out.items()}
        rest = {k: v[..., size:] for k, v in out.items()}
        pending, have = ([rest], have - size) if have > size else ([], 0)
        yield head
