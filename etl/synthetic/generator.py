"""Criteo-shaped synthetic click logs with a known click probability (the embedded default data set).

``python etl/run.py`` without ``--input`` calls :func:`generate`: ``label`` (int8), ``I1..I13``
(int64 heavy-tailed counts with nulls; I2 has negatives), ``C1..C26`` (8-char hex strings,
dictionary-encoded, with nulls; cardinalities 10 to 1,000,000, Zipf frequencies). Validation is the
last ``valid_fraction`` of the rows. Labels are Bernoulli draws from a known probability, so
``synthetic.json`` records the **oracle**: AUC and logloss of the true probabilities on each split,
what a perfect model would score; a model's AUC minus the oracle's is the signal it missed.

The click model (its terms, parameters and the row draw) is :mod:`ctrflow.etl.synthetic.model`;
nothing else carries signal, so every term is learnable from what the standard Criteo ETL keeps.
``generate(..., sequences=True)`` (``etl/run.py --with-sequences``) adds a candidate ``item_id``, a
newest-first click history ``hist_items`` and weighted ``tags`` whose overlap with the candidate adds
to the logit (:mod:`ctrflow.etl.synthetic.sequences`); every other column stays byte-identical.
With the defaults (2M rows, seed 0) the oracle validation AUC is about 0.78 at a click rate near 25%.
The data depends on ``seed``, ``rows`` and ``valid_fraction``, not ``part_rows``, and equal arguments
give identical bytes. This module turns the drawn rows into parquet parts and ``synthetic.json``.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ctrflow.etl.atomic import remove_stale, temp_path
from ctrflow.etl.synthetic import sequences as seqs
from ctrflow.etl.synthetic.model import CATEGORICAL, CATS, CONTS, ClickModel, draw_rows
from ctrflow.etl.synthetic.oracle import auc, finite, logloss

__all__ = ["GENERATOR", "VERSION", "generate"]

GENERATOR = "ctrflow.synthetic"
VERSION = 3  # bump whenever the data for a given seed changes (caches key on it); 3: centred effects, BIAS -1.33
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def _hex(ids: np.ndarray, salt: int) -> pa.Array:
    """Distinct 8-char lowercase hex strings for distinct ids (a bijective 32-bit mix)."""
    x = seqs.mix32(ids, salt)
    nibbles = (x[:, None] >> np.arange(28, -1, -4, dtype=np.uint32)) & np.uint32(15)
    data = _HEX[nibbles].tobytes()
    offsets = np.arange(0, 8 * (len(ids) + 1), 8, dtype=np.int32)
    return pa.StringArray.from_buffers(len(ids), pa.py_buffer(offsets), pa.py_buffer(data))


def _table(model: ClickModel, part: dict) -> pa.Table:
    """One part as a table: C columns as DictionaryArrays over the ids this part uses."""
    arrays = [pa.array(part["label"])]
    for j in range(len(CONTS)):
        arrays.append(pa.array(part["ints"][j], mask=part["missing"][j]))
    for c, name in enumerate(CATS):
        ids = part["cats"][c]
        used = np.zeros(len(model.effect[name]), dtype=bool)
        used[ids[ids >= 0]] = True
        remap = (np.cumsum(used) - 1).astype(np.int32)
        idx = pa.array(remap[ids], mask=ids < 0, type=pa.int32())
        arrays.append(pa.DictionaryArray.from_arrays(idx, _hex(np.flatnonzero(used), model.salt[name])))
    seq = model.seq.arrays(part) if model.seq is not None else {}
    return pa.Table.from_arrays(arrays + list(seq.values()), names=["label", *CONTS, *CATS, *seq])


def _split_sizes(n: int, part_rows: int) -> list[int]:
    """Near-equal part sizes, none above ``part_rows``."""
    parts = max(1, -(-n // part_rows))
    return [n // parts + (i < n % parts) for i in range(parts)]


def generate(
    output_dir: str,
    rows: int = 2_000_000,
    seed: int = 0,
    valid_fraction: float = 0.1,
    part_rows: int = 500_000,
    sequences: bool = False,
) -> dict:
    """Writes output_dir/train/part-00000.parquet..., output_dir/valid/part-*.parquet and
    output_dir/synthetic.json; returns the metadata dict.

    Everything is written into a temporary directory next to ``output_dir`` that replaces it when
    complete, so a crash leaves no half-written data set.

    Args:
        output_dir: destination directory (replaced if it exists).
        rows: total rows, training plus validation.
        seed: the data (and the click model) are a pure function of ``seed``, ``rows``, ``valid_fraction``.
        valid_fraction: share of rows, taken from the end, that form the validation split.
        part_rows: at most this many rows per parquet file (one row group per file).
        sequences: add ``item_id``, ``hist_items``, ``tags`` and ``tags_weights`` and their click
            effect (:mod:`ctrflow.etl.synthetic.sequences`); the other columns stay byte-identical.

    Returns:
        The metadata written to ``synthetic.json``: generator, seed, row counts, columns,
        cardinalities, click rates, unseen-category shares and the ``oracle`` metrics.
    """
    valid_rows = int(round(rows * valid_fraction))
    train_rows = rows - valid_rows
    if train_rows < 1 or valid_rows < 1 or part_rows < 1 or seed < 0:
        raise ValueError(
            f"need at least one training and one validation row, part_rows >= 1 and seed >= 0 "
            f"(rows={rows}, valid_fraction={valid_fraction}, part_rows={part_rows}, seed={seed})"
        )
    model = ClickModel(seed, sequences)
    out = os.path.abspath(output_dir)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    remove_stale(out)  # what a killed run of this output left behind
    tmp = temp_path(out)
    os.mkdir(tmp)
    try:
        splits = {"train": _split_sizes(train_rows, part_rows), "valid": _split_sizes(valid_rows, part_rows)}
        files, y, p, tally = _write_parts(model, tmp, rows, train_rows, splits)
        seq_rows = tally.pop("_seq_rows", None)
        meta = {
            "generator": GENERATOR, "version": VERSION, "seed": seed, "rows": rows,
            "train_rows": train_rows, "valid_rows": valid_rows, "valid_fraction": valid_fraction,
            "columns": {"label": "label", "continuous": CONTS, "categorical": CATS},
            "cardinalities": {name: CATEGORICAL[name][0] for name in CATS},
            **tally,
            "ctr": {s: float(y[s].mean()) for s in y},
            "oracle": {f"{s}_{m}": finite(f(y[s], p[s])) for s in ("valid", "train")
                       for m, f in (("auc", auc), ("logloss", logloss))},
            "files": files,
        }
        if model.seq is not None:
            meta["columns"].update(item=seqs.COLUMNS["item"], lists=[seqs.COLUMNS["history"], seqs.COLUMNS["tags"]],
                                   weights={seqs.COLUMNS["tags"]: seqs.COLUMNS["weights"]})
            meta["sequences"] = {**seqs.meta(model.seq), "oracle_no_sequence": seqs.no_sequence_oracle(y, p, seq_rows)}
        with open(os.path.join(tmp, "synthetic.json.tmp"), "w") as f:
            json.dump(meta, f, indent=2)
        os.replace(os.path.join(tmp, "synthetic.json.tmp"), os.path.join(tmp, "synthetic.json"))
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _write_parts(model: ClickModel, tmp: str, rows: int, train_rows: int, splits: dict[str, list[int]]):
    """Writes every part under ``tmp``; returns (file names, labels, probabilities) per split and the
    count of distinct training values and share of validation values unseen in training per column.

    Parquet encoding runs on one helper thread (pyarrow releases the GIL) while the next part is
    drawn, with at most one write in flight.
    """
    seen = {name: np.zeros(len(model.effect[name]), dtype=bool) for name in CATS}
    unseen, valid = np.zeros(len(CATS)), np.zeros(len(CATS))
    files: dict[str, list[str]] = {s: [] for s in splits}
    labels: dict[str, list] = {s: [] for s in splits}
    probs: dict[str, list] = {s: [] for s in splits}
    seq_rows: dict[str, list] = {s: [] for s in splits}
    stream = draw_rows(model, rows, train_rows, [n for sizes in splits.values() for n in sizes])
    pending = None
    with ThreadPoolExecutor(max_workers=1) as pool:
        for split, sizes in splits.items():
            os.makedirs(os.path.join(tmp, split))
            for i in range(len(sizes)):
                part = next(stream)
                for c, name in enumerate(CATS):
                    ids = part["cats"][c][part["cats"][c] >= 0]
                    if split == "train":
                        seen[name][ids] = True
                    else:
                        unseen[c] += np.count_nonzero(~seen[name][ids])
                        valid[c] += len(ids)
                labels[split].append(part["label"])
                probs[split].append(part["prob"])
                if model.seq is not None:  # for the sequence-free oracle
                    seq_rows[split].append(np.stack([part["seq_term"], part["seq_item_term"], part["seq_item"]]))
                files[split].append(f"{split}/part-{i:05d}.parquet")
                table = _table(model, part)
                if pending is not None:
                    pending.result()
                pending = pool.submit(
                    pq.write_table, table, os.path.join(tmp, files[split][-1]),
                    row_group_size=len(table), dictionary_pagesize_limit=16 << 20,
                    write_statistics=["label", *CONTS],  # min/max of hex strings: slow and useless
                )
        if pending is not None:
            pending.result()
    y = {s: np.concatenate(v) for s, v in labels.items()}
    p = {s: np.concatenate(v) for s, v in probs.items()}
    tally = {
        "train_unique": {name: int(seen[name].sum()) for name in CATS},
        "valid_unseen_share": {name: float(unseen[c] / max(1, valid[c])) for c, name in enumerate(CATS)},
    }
    if model.seq is not None:
        tally["_seq_rows"] = {s: np.concatenate(v, axis=1) for s, v in seq_rows.items()}
    return files, y, p, tally


def _swap_in(tmp: str, out: str) -> None:
    """Rename the finished ``tmp`` to ``out``, moving an existing ``out`` aside first."""
    if not os.path.exists(out):
        os.rename(tmp, out)
        return
    old = temp_path(out, "old")
    os.mkdir(old)
    os.rename(out, os.path.join(old, "d"))
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
