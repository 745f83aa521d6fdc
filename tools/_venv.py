"""Imported first by every tool: run under the project's .venv when started with a bare Python.

``python3 tools/X.py`` from a fresh shell finds the system Python, which has no torch. When torch is
missing here and ``make setup`` made ``.venv``, the tool re-executes itself with ``.venv/bin/python``,
so no venv needs activating. A Python that has torch (an activated venv, an explicit interpreter)
is used as it is. Whether this process already runs in ``.venv`` is told by its environment
(``sys.prefix``), not by the executable: a venv made from the same Python (pyenv, a distribution's)
links to the very file ``python3`` is.
"""
import importlib.util
import os
import sys

_VENV = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '.venv')
_VENV_PYTHON = os.path.join(_VENV, 'bin', 'python')

if importlib.util.find_spec('torch') is None:
    if os.path.realpath(sys.prefix) != os.path.realpath(_VENV) and \
            os.access(_VENV_PYTHON, os.X_OK):
        os.execv(_VENV_PYTHON, [_VENV_PYTHON, *sys.argv])
    sys.exit(f'{sys.executable} has no torch: run `make setup` (it makes .venv, which the tools '
             'then use by themselves) or start the tool with a Python that has the project installed')
