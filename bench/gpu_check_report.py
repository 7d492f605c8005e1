"""The report of ``bench/gpu_check.py``: pytest's counts, issue #18's goals and the one Markdown table."""

from __future__ import annotations

import os
import re
from typing import Any

SECTIONS = ("tests", "data", "loader", "train", "serve")


def parse_pytest(text: str) -> dict[str, Any]:
    """Counts from pytest's last summary line, and the test files skipped because they import Dask."""
    summary = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|deselected|error)", ln)]
    counts: dict[str, Any] = {"passed": 0, "failed": 0, "skipped": 0, "deselected": 0, "errors": 0}
    for n, kind in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)\b", summary[-1] if summary else ""):
        counts["errors" if kind.startswith("error") else kind] = int(n)
    no_dask = re.findall(r"^SKIPPED \[\d+\] (tests/\S+\.py):\d+: .*Dask", text, re.M)
    counts["skipped_without_dask"] = sorted(set(no_dask))
    return counts


def _run(report: dict[str, Any], precision: str, batch: int, mode: str) -> dict[str, Any]:
    runs = (report["sections"].get("train") or {}).get("runs") or []
    return next((r for r in runs if (r["precision"], r["batch"], r["mode"]) == (precision, batch, mode)), {})


def goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue #18's goals against this run's figures (``met`` is None off CUDA or when not measured)."""
    ld = report["sections"].get("loader") or {}
    e2e = _run(report, "bf16", 65536, "loader")
    sv = report["sections"].get("serve") or {}
    un = ld.get("unshuffled_rows_per_s")
    rows = [("loader unshuffled rows/s", un, ">= 100M", lambda v: v >= 100e6),
            ("loader shuffled / unshuffled", ld.get("shuffled_vs_unshuffled"), ">= 0.8", lambda v: v >= 0.8),
            ("DLRM bf16 b65536 samples/s (loader)", e2e.get("samples_per_s"), ">= 4M", lambda v: v >= 4e6),
            ("DLRM bf16 b65536 loader / model-only", e2e.get("vs_model_only"), ">= 0.9", lambda v: v >= 0.9),
            ("serve p99 ms, 256 rows in-process", sv.get("p99_ms"), "< 10", lambda v: v < 10)]
    on_gpu = (report.get("machine") or {}).get("device", "").startswith("cuda")
    return [{"goal": g, "value": v, "target": tgt, "met": (bool(ok(v)) if on_gpu and v is not None else None)}
            for g, v, tgt, ok in rows]


def _f(v: Any, rate: bool = False) -> str:
    """A figure for the table: rates as 1.23M / 456.7k, other floats to 3 significant digits."""
    if v is None:
        return "-"
    if rate:
        for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(v) >= div:
                return f"{v / div:.2f}{suffix}"
        return f"{v:.0f}"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def table(report: dict[str, Any]) -> str:
    """One Markdown table: section | measurement | value | note."""
    m, s = report.get("machine") or {}, report["sections"]
    lines = [f"GPU check, {report['date']}, {m.get('device_name', '?')} ({m.get('device', '?')}), torch "
             f"{m.get('torch', '?')} (CUDA {m.get('torch_cuda', '-')}), {report.get('seconds', 0):.0f}s"
             + (f"; {report['watchdog']}" if report.get("watchdog") else ""), "",
             "| section | measurement | value | note |", "| --- | --- | --- | --- |"]

    def add(sec: str, what: str, value: str, note: str = "") -> None:
        lines.append(f"| {sec} | {what} | {value} | {note.replace('|', '/')} |")

    for name in SECTIONS:
        r = s.get(name)
        if r is None:
            continue
        if r["status"] in ("error", "skipped"):
            add(name, r["status"], "-", f"{r.get('error', '')} ({r.get('seconds', 0)}s)")
            continue
        if name == "tests":
            if "note" in r and "passed" not in r:
                add(name, "pytest -k gpu", "-", r["note"])
            else:
                add(name, "pytest -k gpu", f"{r['passed']} passed, {r['failed']} failed, {r['skipped']} skipped, "
                    f"{r['errors']} errors", "modules skipped for want of Dask: "
                    + (", ".join(os.path.basename(f) for f in r["skipped_without_dask"]) or "none"))
        elif name == "data":
            add(name, "generated + written (ETL writer)", _f(float(r["rows"]), True) + " rows",
                f"{r['bytes'] / 1e9:.2f} GB, {r['files']} files, oracle valid AUC {r['oracle_valid_auc']}")
        elif name == "loader":
            add(name, "host read bound (pyarrow)", _f(r["read_bound_rows_per_s"], True), "rows/s")
            add(name, r["copy_bound_kind"], _f(r["copy_bound_rows_per_s"], True),
                f"rows/s = {r['copy_bound_gb_per_s']:.1f} GB/s at {r['bytes_per_row']} B/row")
            add(name, f"Loader unshuffled, batch {r['batch']}", _f(r["unshuffled_rows_per_s"], True),
                f"{r['unshuffled_vs_read']:.2f}x read bound, {r['unshuffled_vs_copy']:.2f}x copy bound")
            add(name, f"Loader shuffled, batch {r['batch']}", _f(r["shuffled_rows_per_s"], True),
                f"{r['shuffled_vs_unshuffled']:.2f}x unshuffled")
        elif name == "train":
            for t in r.get("runs", []):
                what = f"DLRM {t['precision']} b{t['batch']} {t['mode']}"
                if "error" in t:
                    add(name, what, "-", t["error"])
                    continue
                sp = t.get("split_ms") or {}
                note = (f"{t['ms_per_step']:.2f} ms/step (in {sp.get('input', '-')} / fwd {sp.get('forward', '-')} / "
                        f"bwd {sp.get('backward', '-')} / opt {sp.get('optimizer', '-')} ms)")
                note += f", peak {t['peak_gib']:.2f} GiB" if t.get("peak_gib") is not None else ""
                note += f", AUC {t['auc']:.4f} after {t['steps']} steps" if t.get("auc") is not None else ""
                note += f", {t['vs_model_only']:.2f}x model-only" if t.get("vs_model_only") else ""
                note += ", truncated" if t.get("truncated") else ""
                add(name, what, _f(t["samples_per_s"], True), "samples/s; " + note)
        elif name == "serve":
            add(name, f"{r['request_rows']}-row request p50 / p99", f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f} ms",
                f"{r['mode']}; {r['requests']} requests; {r['model']}")
            add(name, "Predictor (in-process)", "-", r["predictor"])
            add(name, "HTTP", "-", r["http"])
    for g in report.get("goals", []):
        met = {True: "met", False: "NOT met", None: "n/a"}[g["met"]]
        add("goal", g["goal"], _f(g["value"], "/s" in g["goal"]),
            f"{g['target']}: {met}")
    return "\n".join(lines)
