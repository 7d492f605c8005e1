"""The installed environment is one that works: dask and distributed are a matching release.

pip resolved ``dask`` 2026.11.0 with ``distributed`` 2021.4.1 on a fresh machine once (the newest
distributed lagged dask's release), and the suite died at import. ctrflow declares
``dask[dataframe,distributed]`` so that dask's own extra pins the matching distributed; this test fails
whenever an environment pairs them otherwise.
"""

from __future__ import annotations

import importlib.metadata as md

import pytest
from packaging.requirements import Requirement


def test_dask_and_distributed_are_one_release():
    dask, distributed = md.version("dask"), md.version("distributed")
    assert dask == distributed, f"dask {dask} with distributed {distributed}: reinstall with 'dask[distributed]'"


@pytest.mark.parametrize("dist", ["ctrflow", "dask", "distributed"])
def test_installed_requirements_are_satisfied(dist):
    # `pip check` for the packages ctrflow runs on: every unconditional requirement installed and in range.
    broken = []
    for text in md.requires(dist) or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            broken.append(f"{req} (missing)")
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            broken.append(f"{req} (have {have})")
    assert not broken, f"{dist}: {broken}"


def test_the_cluster_module_imports():
    from distributed import Client, LocalCluster  # noqa: F401 - the import itself is the check
