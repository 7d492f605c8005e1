"""``Predictor``: a trained run's model behind its fitted workflow, for raw, untransformed rows.

A run directory (``train/fit.py --out RUN``) holds ``checkpoints/ckpt-*.pt`` whose config names the
model class, its constructor arguments and the processed dataset it was trained on; that dataset holds
the fitted ``workflow/`` and ``schema.json``. Raw rows go through the workflow's transform -- planned once
when the predictor loads (:class:`~ctrflow.serve.fast_transform.FastTransform`: each op's array-level
transform, the functions the ETL ran over every partition, so the values are ``Workflow.transform_frame``'s
bit for bit) -- then the model, in batches, under ``torch.inference_mode``. List features (JSON arrays,
or the ETL's delimited strings) reach the model as the loader's jagged values + offsets
(:mod:`ctrflow.serve.list_inputs`).

Example:
    >>> p = Predictor.from_run("runs/dlrm-20261123")                       # doctest: +SKIP
    >>> p.predict(pd.read_parquet("raw/valid/part-00000.parquet"))         # doctest: +SKIP
    array([0.031, 0.244, ...])
    >>> p.rank({"C1": "user-17"}, [{"C2": "item-a", ...}, {"C2": "item-b", ...}])   # doctest: +SKIP
    [(1, 0.61), (0, 0.12)]
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from ctrflow.etl.ops import Categorify, Label
from ctrflow.etl.schema import Schema, SchemaError
from ctrflow.etl.versions import library_versions
from ctrflow.etl.workflow import Workflow, WorkflowError
from ctrflow.serve.fast_transform import Processed, column_numpy, log, plan
from ctrflow.serve.inputs import (
    ServeError,
    arrow_type,
    columns_from_pandas,
    columns_from_records,
    num_rows,
    to_frame,
)
from ctrflow.serve.list_inputs import is_list_target, jagged_inputs, weight_pairs
from ctrflow.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from ctrflow.train.target import predict

DEFAULT_BATCH_SIZE = 65536


class RunError(ServeError):
    """A run directory that cannot be served (missing checkpoint, dataset, workflow...)."""


def model_from_checkpoint(state: Mapping[str, Any], path: str = "checkpoint") -> torch.nn.Module:
    """Rebuild the model a checkpoint was trained with and load its weights.

    Args:
        state: a checkpoint dict (``ctrflow.train.checkpoint.load_checkpoint``); its ``config`` holds
            ``model_class`` (a class in ``ctrflow.models``) and ``model`` (that class's constructor kwargs).
        path: named in error messages.

    Returns:
        The model in eval mode, on the CPU.
    """
    import ctrflow.models as models

    cfg = state.get("config") or {}
    name, kwargs = cfg.get("model_class"), cfg.get("model")
    cls = getattr(models, str(name), None)
    if not isinstance(cls, type) or not issubclass(cls, torch.nn.Module) or not isinstance(kwargs, dict):
        raise RunError(f"{path}: cannot rebuild model class {name!r} from its config (not a ctrflow.models class "
                       "with a recorded `config`); serve it with Predictor(model, workflow, schema) instead")
    try:
        model = cls(**kwargs)
        model.load_state_dict(state["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise RunError(f"{path}: the weights do not fit {name}({kwargs}): {str(e).splitlines()[0]}") from None
    return model.eval()


class Predictor:
    """Scores raw rows with a fitted workflow and a trained model.

    Args:
        model: returns logits ``[B]``, ``[B, 1]`` (or ``[B, 2]`` two-class) from
            ``(categorical [B, n_cat] int, continuous [B, n_cont] float32)``, plus ``lists=`` /
            ``weights=`` (jagged, as ``Batch.lists`` / ``Batch.weights``) when its ``takes_lists``.
        workflow: the fitted workflow that produced the model's training data.
        schema: the processed dataset's schema (its categorical / continuous order is the model's).
        task: ``binary`` (scores are probabilities) or ``regression`` (raw values).
        device: ``None`` / ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda[:i]"``.
        batch_size: rows per model call.
        info: extra metadata shown by :meth:`metadata` (run dir, checkpoint...).
        amp: run the model under bfloat16 autocast (for CUDA, or a CPU with avx512_bf16 / AMX); scores then
            differ from fp32 by ~1e-3. The workflow's transform is unchanged either way.
    """

    def __init__(self, model: torch.nn.Module, workflow: Workflow, schema: Schema, task: str = "binary",
                 device: str | torch.device | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 info: dict[str, Any] | None = None, amp: bool = False) -> None:
        from ctrflow.train.config import resolve_device

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if task not in ("binary", "regression"):
            raise ValueError(f"task must be binary or regression, got {task!r}")
        if not workflow.fitted:
            raise RunError("the workflow is not fitted")
        self.device = resolve_device("auto" if device is None else str(device))
        self.model = model.to(self.device).eval()
        self.amp = bool(amp)  # bf16 autocast of the model only: the transform stays exactly the ETL's
        self.workflow, self.schema, self.task, self.batch_size = workflow, schema, task, int(batch_size)
        self.info = dict(info or {})
        self.categorical, self.continuous = list(schema.categorical), list(schema.continuous)
        # List features the model reads (as train/fit.py loads them) and their weight columns (the loader's).
        self.spec = getattr(getattr(model, "features", None), "spec", None)  # ctrflow.models.features
        self.lists = list(self.spec.lists) if self.spec is not None and getattr(model, "takes_lists", False) else []
        known = {c.name for c in schema.columns}
        missing = [c for c in self.lists if c not in known]
        if missing:
            raise RunError(f"the model reads list feature(s) {missing} that the dataset's schema lacks")
        self.list_weights = {c: schema[c].weights for c in self.lists if schema[c].weights}
        self.list_dtypes = {c: schema[c].dtype for c in [*self.lists, *self.list_weights.values()]}
        produced = set(workflow.output_columns)
        lacking = [c for c in self.categorical + self.continuous + list(self.list_dtypes) if c not in produced]
        if lacking:
            raise RunError(f"the workflow does not produce the model's input column(s) {lacking}")
        self._check_cardinalities()
        # The label is a workflow input the model never sees: filled with 0 so Label's check passes.
        self.label_inputs = [c for n in workflow.output_node.walk() if isinstance(n.op, Label)
                             for c in n.input_columns if c in workflow.input_columns]
        self.required_columns = [c for c in workflow.input_columns if c not in self.label_inputs]
        self.input_types = self._input_types()
        # Columns the ETL split from delimited strings ('--list-cols COL:SEP'): requests may send either form.
        seps = workflow.meta.get("list_separators") or {}
        self.separators = {c: s for c, s in seps.items() if is_list_target(self.input_types.get(c))}
        self.fast = plan(workflow, [*self.categorical, *self.continuous, *self.list_dtypes])  # None: transform_frame

    def _check_cardinalities(self) -> None:
        """Refuse a workflow whose ids outgrew the model's tables (e.g. updated after training)."""
        if self.spec is not None:  # per-feature tables (ctrflow.models.features): categorical and list features
            produced = {c.name: c.cardinality for c in self.workflow.output_schema().columns}
            for f in self.spec.features:
                have = produced.get(f.name)
                if have is not None and have > f.cardinality:
                    raise RunError(f"column {f.name!r}: the workflow now makes {have} ids, the model's feature has "
                                   f"{f.cardinality} (workflow updated after training?): retrain, or serve the "
                                   "matching workflow")
            return
        cfg = getattr(self.model, "config", None) or {}
        cards = cfg.get("cardinalities") or [n for n, _ in cfg.get("emb_szs") or []]
        if len(cards) != len(self.categorical):
            return  # a model that does not say: nothing to compare
        produced = self.workflow.output_schema()
        for name, card in zip(self.categorical, cards, strict=True):
            have = produced[name].cardinality if name in [c.name for c in produced.columns] else None
            if have is not None and have > card:
                raise RunError(f"column {name!r}: the workflow now makes {have} ids, the model's table has {card} "
                               "rows (workflow updated after training?): retrain, or serve the matching workflow")

    def _input_types(self) -> dict[str, pa.DataType | None]:
        """Arrow type of each required input: as recorded at fit time, else from the vocabularies."""
        recorded = getattr(self.workflow, "input_dtypes", None) or {}
        vocab_types = {c: t["value"].type for op in self.workflow.ops if isinstance(op, Categorify)
                       for c, t in op.vocabs.items()}
        out = {}
        for c in self.required_columns:
            if c in recorded:
                out[c] = arrow_type(recorded[c])
            elif c in vocab_types:  # a workflow saved before input dtypes were recorded
                t = vocab_types[c]
                out[c] = pa.string() if pa.types.is_string(t) or pa.types.is_large_string(t) else t
            else:
                out[c] = pa.float64()
        return out

    # ---- loading ------------------------------------------------------------------------------
    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, device: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 checkpoint: str | None = None, data_dir: str | None = None, amp: bool = False) -> Predictor:
        """Load a run directory written by ``train/fit.py``: its best checkpoint (``best.pt``, what the run
        reported) when it kept one, else its newest.

        Args:
            run_dir: the run directory (``--out`` of ``train/fit.py``).
            device, amp: see the class; batch_size: rows per model call.
            checkpoint: a checkpoint file to use instead.
            data_dir: the processed dataset (``workflow/`` + ``schema.json``) when it moved since training;
                by default the one the run recorded.

        Raises:
            RunError: anything missing or inconsistent, in one line.
        """
        run_dir = os.fspath(run_dir)
        if not os.path.isdir(run_dir):
            raise RunError(f"run directory {run_dir} does not exist (train one with `python train/fit.py --out DIR`)")
        best = os.path.join(run_dir, "best.pt")
        path = checkpoint or (best if os.path.isfile(best) else latest_checkpoint(os.path.join(run_dir, "checkpoints")))
        if path is None:
            raise RunError(f"{run_dir} has no checkpoints/ckpt-*.pt: not a finished training run")
        try:
            state = load_checkpoint(path)
        except CheckpointError as e:
            raise RunError(str(e)) from None
        train_cfg = (state.get("config") or {}).get("train") or {}
        data = data_dir or _recorded_data_dir(run_dir, train_cfg)
        if data is None or not os.path.isdir(data):
            raise RunError(f"{run_dir}: its processed dataset {data!r} is gone; pass the ETL output "
                           "as data_dir / --data")
        try:
            schema = Schema.load(data)
            workflow = Workflow.load(os.path.join(data, "workflow"))
        except (SchemaError, WorkflowError) as e:
            raise RunError(str(e)) from None
        model = model_from_checkpoint(state, path)
        info = {"run_dir": os.path.abspath(run_dir), "data_dir": os.path.abspath(data),
                "checkpoint": os.path.abspath(path), "step": state.get("step"),
                "model_class": type(model).__name__, "model_config": getattr(model, "config", None),
                "workflow_versions": _workflow_versions(os.path.join(data, "workflow"))}
        info["target"] = train_cfg.get("target")  # regression: the trainer's output transform
        return cls(model, workflow, schema, train_cfg.get("task", "binary"), device, batch_size, info, amp)

    # ---- scoring ------------------------------------------------------------------------------
    def columns(self, rows: pd.DataFrame | Sequence[Mapping[str, Any]], field: str = "rows") -> dict[str, pa.Array]:
        """Validate raw rows (a DataFrame or a list of dicts) into typed arrow columns (see ``serve.inputs``)."""
        fill = {c: 0.0 for c in self.label_inputs}
        if isinstance(rows, pd.DataFrame):
            return columns_from_pandas(rows, self.input_types, fill, self.separators)
        return columns_from_records(rows, self.input_types, field, fill, self.separators)

    def raw_frame(self, rows: pd.DataFrame | Sequence[Mapping[str, Any]], field: str = "rows") -> pd.DataFrame:
        """Validate raw rows into the frame the workflow reads (as the ETL's reader built it)."""
        return to_frame(self.columns(rows, field))

    def _tensors(self, processed: pd.DataFrame | Processed) -> tuple[torch.Tensor, torch.Tensor]:
        """Processed columns -> (categorical [B, n_cat], continuous [B, n_cont]) column-major views, as the
        loader yields them."""
        n = len(processed)
        cat = np.stack([column_numpy(processed, c) for c in self.categorical]) if self.categorical \
            else np.zeros((0, n), np.int32)
        cont = np.stack([column_numpy(processed, c, np.float32) for c in self.continuous]) if self.continuous \
            else np.zeros((0, n), np.float32)
        return torch.from_numpy(cat).t(), torch.from_numpy(cont).t()

    def _scores(self, logits: torch.Tensor) -> torch.Tensor:
        out = logits.float()
        if out.dim() == 2 and out.shape[1] == 2 and self.task == "binary":
            out = out[:, 1] - out[:, 0]  # two-class softmax == sigmoid of the logit difference (as the trainer)
        out = out.reshape(-1)
        if self.task == "binary":
            return torch.sigmoid(out)
        return predict(out, self.info.get("target"))  # in the target's units, as the trainer reported

    @torch.inference_mode()
    def predict_processed(self, processed: pd.DataFrame | Processed) -> np.ndarray:
        """Scores of already-transformed rows (the ETL's output, or :meth:`transform_columns`'): ``[B]`` float32."""
        out = []
        for lo in range(0, len(processed), self.batch_size):
            part = processed.slice(lo, lo + self.batch_size) if isinstance(processed, Processed) \
                else processed.iloc[lo:lo + self.batch_size]
            cat, cont = self._tensors(part)
            cat, cont = cat.to(self.device, non_blocking=True), cont.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                if self.lists:  # jagged, exactly as the loader reads the ETL's parquet (serve/list_inputs.py)
                    lists, weights = jagged_inputs(part, self.lists, self.list_weights, self.list_dtypes)
                    lists = {k: (v.to(self.device), o.to(self.device)) for k, (v, o) in lists.items()}
                    weights = {k: w.to(self.device) for k, w in weights.items()}
                    logits = self.model(cat, cont, lists=lists, weights=weights)
                else:
                    logits = self.model(cat, cont)
            out.append(self._scores(logits).cpu())
        return torch.cat(out).numpy() if out else np.zeros(0, np.float32)

    def transform(self, raw: pd.DataFrame) -> pd.DataFrame:
        """The workflow applied to a validated raw frame (see :meth:`raw_frame`): ``Workflow.transform_frame``."""
        try:
            return self.workflow.transform_frame(raw)
        except (TypeError, ValueError) as e:  # an op refusing a value the parser let through
            raise ServeError(f"the workflow cannot transform these rows: {e}") from None

    def transform_columns(self, columns: Mapping[str, pa.Array]) -> Processed | pd.DataFrame:
        """The model's input columns of the workflow applied to validated columns (:meth:`columns`), by the
        plan made at load time (:class:`~ctrflow.serve.fast_transform.FastTransform`; the values of
        :meth:`transform` of ``to_frame(columns)``, which runs instead when no plan could be made)."""
        if self.fast is None:
            return self.transform(to_frame(columns))
        try:
            return self.fast(columns)
        except (TypeError, ValueError) as e:  # an op refusing a value the parser let through
            raise ServeError(f"the workflow cannot transform these rows: {e}") from None
        except Exception:  # a fault of the plan, not of the rows: said once, the frame path serves from now on
            log.exception("serving: the planned transform failed; Workflow.transform_frame serves from now on")
            self.fast = None
            return self.transform(to_frame(columns))

    def predict(self, rows: pd.DataFrame | Sequence[Mapping[str, Any]], field: str = "rows") -> np.ndarray:
        """Scores of raw rows: probabilities (binary) or values (regression).

        Args:
            rows: B raw rows, as a DataFrame or a list of ``{column: value}`` holding every column of
                ``required_columns`` (the label is not needed; extra columns are ignored).
            field: how error messages name the rows.

        Returns:
            ``[B]`` float32 scores, in row order.

        Raises:
            ServeError: no rows, a missing column, a value of the wrong type (the message names the field).
        """
        return self.score_columns(self.columns(rows, field))

    def score_columns(self, columns: Mapping[str, pa.Array]) -> np.ndarray:
        """Scores of validated columns (:meth:`columns`): transform and model, ``batch_size`` rows at a time."""
        n = num_rows(columns)
        out = [self.predict_processed(self.transform_columns({c: a.slice(lo, self.batch_size)
                                                              for c, a in columns.items()}))
               for lo in range(0, n, self.batch_size)]
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def rank(self, context: Mapping[str, Any], candidates: Sequence[Mapping[str, Any]]) -> list[tuple[int, float]]:
        """Score each candidate joined with one context (e.g. a user's features) and sort.

        Args:
            context: columns shared by every candidate (a candidate's own value wins on a clash).
            candidates: N objects with the remaining columns (item features).

        Returns:
            ``[(candidate index, score), ...]`` sorted by score, highest first (ties: lower index first).
        """
        scores = self.predict(self.rank_rows(context, candidates), field="candidates")
        return rank_order(scores)

    @staticmethod
    def rank_rows(context: Any, candidates: Any) -> list[Any]:
        """Each candidate joined with the context (checked: an object and a non-empty list)."""
        if not isinstance(context, Mapping):
            raise ServeError(f"context must be an object {{column: value}}, got {type(context).__name__}", "context")
        if not isinstance(candidates, list) or not candidates:
            what = "empty" if isinstance(candidates, list) else f"a {type(candidates).__name__}, not a list"
            raise ServeError(f"candidates is {what}: send a list of at least one object", "candidates")
        return [{**context, **c} if isinstance(c, Mapping) else c for c in candidates]

    def metadata(self) -> dict[str, Any]:
        """Model, schema, versions and workflow columns, list columns included (JSON-safe)."""
        pairs = weight_pairs(self.input_types)
        return {
            "model": {"class": self.info.get("model_class", type(self.model).__name__),
                      "config": self.info.get("model_config", getattr(self.model, "config", None)),
                      "task": self.task, "checkpoint": self.info.get("checkpoint"), "step": self.info.get("step"),
                      "parameters": sum(p.numel() for p in self.model.parameters()),
                      "device": str(self.device), "batch_size": self.batch_size, "amp": self.amp},
            "run_dir": self.info.get("run_dir"), "data_dir": self.info.get("data_dir"),
            "schema": self.schema.to_dict(),
            "workflow": {"input_columns": self.workflow.input_columns, "required_columns": self.required_columns,
                         "label_columns": self.label_inputs,
                         "input_types": {c: str(t) if t is not None else None for c, t in self.input_types.items()},
                         "output_columns": self.workflow.output_columns,
                         "list_columns": {c: {"type": str(t), "separator": self.separators.get(c),
                                              "weights": pairs.get(c),
                                              "weights_of": next((k for k, w in pairs.items() if w == c), None)}
                                          for c, t in self.input_types.items() if is_list_target(t)},
                         "model_inputs": {"categorical": self.categorical, "continuous": self.continuous,
                                          "lists": self.lists, "list_weights": self.list_weights},
                         "meta": self.workflow.meta},
            "versions": {"serving": {**library_versions(), "torch": torch.__version__},
                         "workflow": self.info.get("workflow_versions"),
                         "dataset": self.schema.metadata.get("versions")},
        }


def rank_order(scores: np.ndarray) -> list[tuple[int, float]]:
    """``[(index, score), ...]`` by score, highest first; ties keep the lower index first."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    return [(int(i), float(scores[i])) for i in order]


def _recorded_data_dir(run_dir: str, train_cfg: Mapping[str, Any]) -> str | None:
    """The processed dataset a run trained on: the checkpoint's absolute path, else config.json's argument."""
    data = (train_cfg.get("extra") or {}).get("data")
    if data and os.path.isdir(data):
        return data
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            arg = (json.load(f).get("args") or {}).get("data")
    except (OSError, json.JSONDecodeError):
        return data
    for cand in (arg, os.path.join(run_dir, os.pardir, os.pardir, arg or "")):
        if arg and os.path.isdir(cand):
            return os.path.normpath(cand)
    return data


def _workflow_versions(path: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(path, "workflow.json")) as f:
            return json.load(f).get("versions")
    except (OSError, json.JSONDecodeError):
        return None
