"""Large-batch scaling rules: what the learning rates, warm-up and embedding regularisation become
when the batch grows past the one the defaults were tuned at (:data:`REFERENCE_BATCH`).

The rule follows CowClip (Zheng et al., AAAI 2023, "CowClip: Reducing CTR Prediction Model Training
Time from 12 hours to 10 minutes on 1 GPU"), which trained DeepFM on Criteo from batch 1K to 128K
with no loss of AUC using, for a batch ``k`` times the reference:

* the dense (MLP) learning rate times ``sqrt(k)``, reached by a linear warm-up (their table: 8e-4 at
  1K, 90.5e-4 at 128K, one warm-up epoch); here, above 16x, times a boost that ramps up to 2 at 128x,
  together with a clip of the MLPs' gradient norm (see :data:`GRAD_CLIP`);
* the embedding learning rate unchanged;
* the embedding L2 weight times ``k`` (1e-5 at 1K to 128e-5 at 128K), so the decay per *epoch*
  stays the same although there are ``k`` times fewer steps (here: ramped in from 0 at 16x, since the
  batch-512 defaults have no L2; see :func:`embedding_l2`);
* adaptive column-wise clipping of each id's embedding gradient: the gradient of row ``j`` is
  clipped to ``r * cnt_j * max(||w_j||, zeta)`` where ``cnt_j`` is the number of times the batch
  looked the id up (``r = 1``, ``zeta = 1e-5 * sqrt(D)`` for Criteo), so an id seen thousands of
  times in one huge batch cannot take a step out of proportion to its own weights. That limit is in
  the units of a per-row (summed-loss) gradient; ctrflow's loss is the batch *mean*, so the optimizers
  clip to ``r * cnt_j / B * max(||w_j||, zeta)`` with ``B`` the rows behind the step (batch x
  accumulation x ranks; the trainer sets it each step, :func:`ctrflow.train.optim.set_step_rows`).

ctrflow's row-sparse optimizers (:mod:`ctrflow.train.optim`) apply the clipping and the L2 to the rows
a batch touched only (O(rows touched), never a pass over the table). At or below the reference batch
the rule changes nothing, so the tuned defaults stay exactly as they were. ``TrainConfig(batch_scaling=
False)`` / ``fit.py --no-batch-scaling`` turns it off for comparison.

The rule answers a lack of optimizer steps, not the batch as such: when the run's length is known
(``steps``, fit.py passes it), the rule is applied in full up to :data:`FULL_RULE_STEPS` steps and fades
out by :data:`NO_RULE_STEPS` (:func:`step_strength`): a run with that many steps gets the batch-512
defaults at any batch, because there they measured better than the rule (see the constants). Lazy Adam's
per-row warm-up (:data:`ctrflow.train.config.ROW_WARMUP`) goes down as the rule comes in, to none at
:data:`MAX_SCALE` (:func:`row_warmup_factor`): a run of ~100 large steps cannot spare its rows' few updates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

REFERENCE_BATCH = 512  # the batch size the defaults (ctrflow.train.config.LR ...) were tuned at
EMBEDDING_L2_PER_REFERENCE = 5e-6  # CowClip's 1e-5 per 1K rows of batch, per 512
# The L2 ramps in from 0 at k = L2_FROM_SCALE to CowClip's value at MAX_SCALE. CowClip keeps its base batch's
# L2 per epoch, and the batch-512 defaults have none; the measurements support an L2 only for large k (few
# steps per epoch): at k = 128 (55 steps) it gained +0.0026 AUC, at k = 2 (1024 rows, 3,516 steps) CowClip's
# 1e-5 lost 0.0014 (0.77414 vs 0.77545 without the rule, 0.77539 with the rule but no L2; bench/RESULTS.md
# "Large batches (#16)").
L2_FROM_SCALE = 16.0
# (bench/RESULTS.md "Large batches (#16)": at 65536 rows, 0 lost 0.0026 AUC and 2x lost 0.0034 against this.)
# CowClip's r, in mean-loss units (limit r * cnt / B * max(||w||, zeta)): at 65536 rows it clips ~half the
# lookups, and r = 0.5 / 1 / 2 were within 0.0003 AUC (bench/RESULTS.md "Large batches (#16)").
CLIP_RATIO = 1.0
CLIP_FLOOR_PER_SQRT_DIM = 1e-5  # CowClip's zeta / sqrt(D) on Criteo
MAX_WARMUP_SHARE = 0.25  # never spend more than this share of the run warming up
# The rule's factors stop growing at this k: CowClip verified it up to 128x its base batch, and here it
# helped at k = 128 (65536 rows: AUC 0.76816 vs 0.76125 without) but the uncapped extrapolation to
# k = 781 (400000 rows, 90 steps on 36M rows) gave 0.76586, below the 0.77030 measured there without
# the rule (issue #16). Beyond 128x the 128x values are used; unmeasured at 400000 since.
MAX_SCALE = 128.0
# The few-step regime (k = 128, ~100 steps an epoch): Adam's second moment (beta2 = 0.999) keeps the large
# gradients of the first steps for the whole run, so the later steps are small, and a higher dense lr is
# unstable without a clip (1.5x and 3x diverged, 2x gained). Clipping the MLPs' global gradient norm to
# GRAD_CLIP makes the steps even and 2x sqrt(k) stable: DLRM, 7.2M rows, batch 65536 (110 steps), valid AUC
# 0.76676 -> 0.76948 with the clip, 0.77207 with the clip and 2x the lr (clip 0.01 / 0.03 / 0.1 with 2x:
# 0.77048 / 0.77181 / 0.77150; 3x with 0.1: 0.77001); at k = 16 (880 steps) neither helped (0.77333 ->
# 0.77310 clipped, 0.77282 with 2x). So both start above GRAD_CLIP_FROM_SCALE, the boost growing with log k
# up to DENSE_LR_BOOST at MAX_SCALE (bench/RESULTS.md "Large batches (#16)": "The clipped few-step rule").
# At 40.5M rows the same change moved AUC by only +0.0002 (65536, 618 steps) and +0.0001 (400000, 102 steps)
# (RESULTS "The bench at full size, all six runs"): it matters where data, not only steps, is short.
GRAD_CLIP = 0.05
GRAD_CLIP_FROM_SCALE = 16.0
DENSE_LR_BOOST = 2.0
# How long a run must be for the batch-512 defaults to need no help. On 40.5M rows at batch 65536 (k = 128, 618
# steps) the defaults gave 0.77534 valid AUC and the rule 0.77477; no single part of the rule explained the gap
# (dense lr 11.3x or 4x without the MLP clip: 0.77472 / 0.77465; the base warm-up: 0.77474; without CowClip:
# 0.77427). With fewer steps the rule gained: +0.0058 at 102 steps (400,000 rows, same data), +0.0069 at 55
# steps and +0.0008 at 440 (k = 16), both on 3.6M rows (bench/RESULTS.md "Large batches (#16)" and "A rule
# that looks at the run's length"). So the rule holds in full up to FULL_RULE_STEPS and fades out, linearly in
# log steps, by NO_RULE_STEPS.
FULL_RULE_STEPS = 150
NO_RULE_STEPS = 600
# Lazy Adam's per-row warm-up (n / (n + W) of a row's step, n its lookups so far) is a prior for long runs: at
# 400,000 rows (102 steps, the full rule) W = 256 gave 0.77151, the default W = 16 0.77364 and W = 0 0.77400
# (bench/RESULTS.md "A rule that looks at the run's length"). So the rule takes it down with log k, to 0 at
# MAX_SCALE (:func:`row_warmup_factor`).


@dataclass(frozen=True)
class BatchScaling:
    """What the rule sets for one batch size (see the module docstring).

    Attributes:
        k: batch size / reference batch size (values below 1 count as 1: no change; the factors use
            ``min(k, MAX_SCALE)``).
        lr_factor: multiplier of the dense learning rate (``sqrt(k)`` times :func:`dense_lr_boost`).
        embedding_lr_factor: multiplier of the embedding learning rate (1: unchanged).
        embedding_l2: L2 weight on the embedding rows a batch touches (0 at or below the reference).
        clip_ratio: CowClip's ``r`` (0: no clipping, at or below the reference).
        warmup_share: the least share of the run spent warming the learning rates up.
        grad_clip: largest global L2 norm of the MLPs' gradient per step (0: no clipping).
        row_warmup_factor: multiplier of lazy Adam's per-row warm-up (:data:`ctrflow.train.config.ROW_WARMUP`):
            1 at the reference, falling linearly in ``log k`` to 0 at ``MAX_SCALE`` (:func:`row_warmup_factor`).
        strength: the share of the rule the run's length called for (:func:`step_strength`; 1: all of it):
            the factors are those of ``min(k, MAX_SCALE) ** strength``.
    """

    k: float
    lr_factor: float
    embedding_lr_factor: float
    embedding_l2: float
    clip_ratio: float
    warmup_share: float
    grad_clip: float = 0.0
    row_warmup_factor: float = 1.0
    strength: float = 1.0


def batch_scaling(batch_size: int, reference: int = REFERENCE_BATCH, steps: int | None = None) -> BatchScaling:
    """The scaling rule's values for ``batch_size`` rows per optimizer step.

    Args:
        batch_size: rows per optimizer step (the batch times gradient accumulation, times ranks).
        reference: the batch size the defaults were tuned at.
        steps: optimizer steps of the whole run (None: unknown, the rule in full); from
            :data:`NO_RULE_STEPS` on the rule is the identity (:func:`step_strength`).

    Returns:
        A :class:`BatchScaling`; the identity (factors 1, no L2, no clipping, no extra warm-up) when
        ``batch_size <= reference`` or the run is long enough.
    """
    if batch_size < 1 or reference < 1:
        raise ValueError(f"batch sizes must be >= 1, got {batch_size} and reference {reference}")
    k = max(1.0, batch_size / reference)
    strength = step_strength(steps)
    # Beyond MAX_SCALE, the range the rule was verified in, its values are held; a long run takes less of it.
    kk = min(k, MAX_SCALE) ** strength
    if kk <= 1.0:
        return BatchScaling(k, 1.0, 1.0, 0.0, 0.0, 0.0, strength=strength)
    # Warm-up: CowClip warms the dense rate up over one epoch at every large batch; here the share of
    # the run grows with log2(k) (0.05 at 2x, ~0.16 at 128x) and stays <= MAX_WARMUP_SHARE.
    warmup = min(MAX_WARMUP_SHARE, 0.05 + 0.015 * math.log2(kk))
    return BatchScaling(
        k=k,
        lr_factor=math.sqrt(kk) * dense_lr_boost(kk),
        embedding_lr_factor=1.0,
        embedding_l2=embedding_l2(kk),
        clip_ratio=CLIP_RATIO,
        warmup_share=warmup,
        grad_clip=GRAD_CLIP if kk > GRAD_CLIP_FROM_SCALE else 0.0,
        row_warmup_factor=row_warmup_factor(kk),
        strength=strength,
    )


def row_warmup_factor(k: float) -> float:
    """The share of lazy Adam's per-row warm-up the rule keeps at ``k`` (k already capped and faded): 1 at 1x,
    0 at ``MAX_SCALE``, linear in ``log k`` between. In a run of ~100 large steps every row has few updates, and
    damping them costs more than the prior gains (measured: the comment beside ``NO_RULE_STEPS``)."""
    return max(0.0, 1.0 - math.log(max(k, 1.0)) / math.log(MAX_SCALE))


def step_strength(steps: int | None) -> float:
    """The share of the rule a run of ``steps`` optimizer steps takes: 1 up to :data:`FULL_RULE_STEPS`, 0 from
    :data:`NO_RULE_STEPS` on, linear in ``log(steps)`` between (None: 1)."""
    if steps is None or steps <= FULL_RULE_STEPS:
        return 1.0
    if steps >= NO_RULE_STEPS:
        return 0.0
    return math.log(NO_RULE_STEPS / steps) / math.log(NO_RULE_STEPS / FULL_RULE_STEPS)


def embedding_l2(k: float) -> float:
    """The rule's L2 on touched embedding rows for a batch ``k`` times the reference (k already capped).

    0 up to ``L2_FROM_SCALE``, then linear up to CowClip's ``EMBEDDING_L2_PER_REFERENCE * MAX_SCALE`` at
    ``MAX_SCALE`` (held beyond): continuous in ``k``.
    """
    if k <= L2_FROM_SCALE:
        return 0.0
    top = EMBEDDING_L2_PER_REFERENCE * MAX_SCALE
    return top * (min(k, MAX_SCALE) - L2_FROM_SCALE) / (MAX_SCALE - L2_FROM_SCALE)


def dense_lr_boost(k: float) -> float:
    """The dense lr's factor on top of ``sqrt(k)`` (k already capped): 1 up to ``GRAD_CLIP_FROM_SCALE``, then
    growing with ``log k`` to ``DENSE_LR_BOOST`` at ``MAX_SCALE`` (the range where the clip holds it stable)."""
    if k <= GRAD_CLIP_FROM_SCALE:
        return 1.0
    frac = math.log(min(k, MAX_SCALE) / GRAD_CLIP_FROM_SCALE) / math.log(MAX_SCALE / GRAD_CLIP_FROM_SCALE)
    return DENSE_LR_BOOST**frac


def clip_floor(dim: int) -> float:
    """CowClip's ``zeta`` for rows of ``dim`` elements: the norm below which a row counts as this small."""
    return CLIP_FLOOR_PER_SQRT_DIM * math.sqrt(max(1, dim))
