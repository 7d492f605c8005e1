"""ETL ops, one per file (NVTabular's contract: ``cols >> Op(...)``)."""

from ctrflow.etl.ops.base import ColumnOp, Operator, OpNotFittedError
from ctrflow.etl.ops.bucketize import Bucketize
from ctrflow.etl.ops.categorify import Categorify
from ctrflow.etl.ops.clip import Clip
from ctrflow.etl.ops.fill_missing import FillMissing
from ctrflow.etl.ops.hash_bucket import HashBucket
from ctrflow.etl.ops.hashed_cross import HashedCross
from ctrflow.etl.ops.label import Label, LabelError
from ctrflow.etl.ops.list_pad import ListPad
from ctrflow.etl.ops.list_truncate import ListTruncate
from ctrflow.etl.ops.logop import LogOp
from ctrflow.etl.ops.normalize import Normalize
from ctrflow.etl.ops.normalize_minmax import NormalizeMinMax
from ctrflow.etl.ops.quantile_bucketize import QuantileBucketize
from ctrflow.etl.ops.rename import Rename

__all__ = [
    "Bucketize", "Categorify", "Clip", "ColumnOp", "FillMissing", "HashBucket", "HashedCross", "Label",
    "LabelError", "ListPad", "ListTruncate", "LogOp", "Normalize", "NormalizeMinMax", "OpNotFittedError", "Operator",
    "QuantileBucketize", "Rename",
]
