"""Where a type that is "not in the registry" is defined: ``class X`` in the repository around the
config, and the ``custom_imports`` line that registers it (research code imports its package in
its own ``tools/train.py``, which the doctor and MMEngine's tools do not run)."""
import os
import re
from typing import Dict, List, Optional, Tuple

from .text import shown

_NOT_REGISTERED = re.compile(r"(\w+) is not in the (\S+) registry")


def class_file(name: str, config: str) -> Optional[Tuple[str, int]]:
    """Where ``class name`` is defined in the repository around ``config``: its folder first, then
    each parent up to the repository root (the first holding ``.git``); never the home folder, the
    filesystem root or site-packages (a packaged config's), nor hidden folders or virtual
    environments."""
    pattern = re.compile(rf'^[ \t]*class[ \t]+{re.escape(name)}\b', re.M)
    stops = {os.path.expanduser('~'), os.path.abspath(os.sep)}
    folder, searched, budget = os.path.dirname(os.path.abspath(config)), set(), [20000]
    while folder not in stops and os.path.basename(folder) not in ('site-packages', 'dist-packages'):
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith(('.', '__'))
                             and d not in ('site-packages', 'node_modules')
                             and os.path.join(root, d) not in searched
                             and not os.path.exists(os.path.join(root, d, 'pyvenv.cfg')))
            for path in (os.path.join(root, f) for f in sorted(files) if f.endswith('.py')):
                budget[0] -= 1
                if budget[0] < 0:
                    return None
                try:
                    text = open(path, errors='replace').read()
                except OSError:
                    continue
                found = pattern.search(text)
                if found:
                    return path, text.count('\n', 0, found.start()) + 1
        searched.add(folder)
        if os.path.exists(os.path.join(folder, '.git')) or os.path.dirname(folder) == folder:
            break
        folder = os.path.dirname(folder)
    return None


def import_name(path: str) -> Tuple[str, str]:
    """The dotted module name of a file, through the packages (``__init__.py``) around it, and
    the folder it imports from."""
    folder, parts = os.path.dirname(path), [os.path.splitext(os.path.basename(path))[0]]
    if parts == ['__init__']:
        parts, folder = [os.path.basename(folder)], os.path.dirname(folder)
    while os.path.exists(os.path.join(folder, '__init__.py')):
        parts.insert(0, os.path.basename(folder))
        folder = os.path.dirname(folder)
    return '.'.join(parts), folder


def not_registered(messages: List[str], config: Optional[str]) -> Optional[Dict[str, str]]:
    """MMEngine's "X is not in the S::model registry", in one of a failure's ``messages`` (its
    exception chain): where ``class X`` is, and the import that registers it."""
    found = next((m for m in map(_NOT_REGISTERED.search, messages) if m), None)
    if found is None:
        return None
    name, registry = found.groups()
    cause = f'{name} is not in the {registry} registry'
    place = class_file(name, config) if config else None
    if place is None:
        return dict(kind='not registered', cause=cause + (
            f' and no `class {name}` is in the repository around {shown(config)}' if config else ''),
            todo='Check the type\'s spelling, or import the package that registers it: '
                 "custom_imports = dict(imports=['<package.module>'], allow_failed_imports=False) "
                 'in the config.')
    module, root = import_name(place[0])
    here = os.path.realpath(os.getcwd()) == os.path.realpath(root)
    return dict(kind='not registered',
                cause=f'{cause}: `class {name}` is in {shown(place[0])}:{place[1]}, which nothing '
                      'imports (a tools/train.py of your own may import it; the config does not)',
                todo=f"Add custom_imports = dict(imports=['{module}'], allow_failed_imports=False) "
                     'to the config' + ('' if here else f', and start the doctor from {shown(root)} '
                     '(it puts the current folder on sys.path)') + '.')
