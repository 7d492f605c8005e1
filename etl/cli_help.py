"""What every ctrflow command line shares: ``--help`` that shows each default, and a usage line that
names the command the user typed (``ctrflow-fit``, ``python -m ctrflow.serve``, ``etl/run.py``)."""

from __future__ import annotations

import argparse
import os
import sys


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and appends ``(default: X)`` to every option with a real default
    its help does not state already; lists show as typed (``512,256``). None, False and ``[]`` are left
    to the help text, which says what leaving the option out does (argparse would print "None")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, d = action.help or "", action.default
        unset = d is None or d is False or d is argparse.SUPPRESS or (isinstance(d, list) and not d)
        if "%(default)" in text or "(default:" in text or "(default " in text or unset or not action.option_strings:
            return text
        shown = ",".join(map(str, d)) if isinstance(d, (list, tuple)) else str(d).replace("%", "%%")
        return f"{text} (default: {shown})"


def usage_name(console_script: str, module: str, script: str, argv0: str | None = None,
               orig_argv: list[str] | None = None) -> str:
    """The command the user typed, for the usage line.

    Args:
        console_script: the ``[project.scripts]`` name (``ctrflow-etl``).
        module: the module for ``python -m`` (``ctrflow.etl.run``).
        script: the script path from the repository root (``etl/run.py``).
        argv0: ``sys.argv[0]`` (default: the running one).
        orig_argv: the interpreter's own argv (default: ``sys.orig_argv``), to recognise ``python -m``.

    Returns:
        The console script, ``python -m MODULE``, the script path as typed, or ``script`` when called
        from other code (tests, notebooks).
    """
    argv0 = (sys.argv[0] if sys.argv else "") if argv0 is None else argv0
    orig = list(getattr(sys, "orig_argv", [])) if orig_argv is None else orig_argv
    name = os.path.basename(argv0)
    if name.startswith(console_script):  # ctrflow-etl, ctrflow-etl.exe, ctrflow-etl-script.py
        return console_script
    if "-m" in orig and orig.index("-m") + 1 < len(orig) and orig[orig.index("-m") + 1].startswith(module):
        return f"python -m {orig[orig.index('-m') + 1]}"
    if argv0 and argv0.replace(os.sep, "/").endswith(script.split("/")[-1]) and name != "__main__.py":
        return argv0
    return script
