"""Turn DDP's error messages into parameter names and the fixes that apply.

DDP lists unused parameters by reducer index ("Parameter indices which did not receive grad for rank
0: 2 217 394"), cut after 100 entries with "...". :func:`mmddp_hooks.reducer_params.reducer_params`
reproduces the reducer's order, so an index is a name. Also recognised: "marked ready twice", "did not
find any unused parameters" and "Grad strides do not match bucket view strides".
"""
import re
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

from .reducer_params import ReducerParam

UNUSED_MARKER = 'Expected to have finished reduction in the prior iteration'
_INDICES = re.compile(r'Parameter indices which did not receive grad for rank (\d+):[ \t]*'
                      r'([\d \t]*)(\.\.\.)?')
DDP_LIST_CAP = 100

OTHER_MESSAGES = {
    'marked_ready_twice': (
        re.compile(r'Expected to mark a variable ready only once|marked as ready twice'),
        'a parameter produced two gradients in one iteration: reentrant activation checkpointing '
        '(use torch.utils.checkpoint with use_reentrant=False, or static_graph=True in '
        'model_wrapper_cfg if the graph is fixed), or a module called twice together with '
        'find_unused_parameters=True (drop the flag: DDPAutoTuneHook tells whether it is needed)'),
    'find_unused_not_needed': (
        re.compile(r'find_unused_parameters=True was specified in DDP constructor, but did not '
                   r'find any unused parameters'),
        'nothing was unused, so the flag only costs time every step: set '
        'model_wrapper_cfg=dict(find_unused_parameters=False), or add DDPAutoTuneHook, which '
        'switches it off after measuring'),
    'grad_strides': (
        re.compile(r'Grad strides do not match bucket view strides'),
        "a parameter's memory layout changed after DDP built its buckets (typically "
        'model.to(memory_format=torch.channels_last) after wrapping, or non-contiguous '
        'parameters): convert the model before wrapping it, make parameters contiguous, or set '
        'gradient_as_bucket_view=True so gradients take the bucket layout'),
}


@dataclass
class UnusedLine:
    rank: int
    indices: List[int]
    truncated: bool


@dataclass
class NamedIndex:
    index: int
    name: str
    aliases: List[str]
    numel: int
    module: str
    branch: Optional[str] = None  # the declared config branch that owns it, with its flag


@dataclass
class RankExplanation:
    rank: int
    truncated: bool
    params: List[NamedIndex] = field(default_factory=list)
    unknown_indices: List[int] = field(default_factory=list)


def parse_unused_lines(text: str) -> List[UnusedLine]:
    """Every "Parameter indices ... for rank N:" line, in order, duplicates dropped."""
    out: List[UnusedLine] = []
    for m in _INDICES.finditer(text):
        line = UnusedLine(rank=int(m.group(1)),
                          indices=[int(tok) for tok in m.group(2).split()],
                          truncated=m.group(3) is not None)
        if line not in out:
            out.append(line)
    return out


def _module_of(name: str) -> str:
    return name.rsplit('.', 1)[0] if '.' in name else '(root)'


def name_indices(line: UnusedLine, params: Sequence[ReducerParam],
                 owners: Optional[Mapping[str, str]] = None) -> RankExplanation:
    """Name every index; ``owners`` maps parameter names to a declared branch label."""
    exp = RankExplanation(rank=line.rank, truncated=line.truncated)
    for i in line.indices:
        if 0 <= i < len(params):
            rp = params[i]
            exp.params.append(NamedIndex(index=i, name=rp.name, aliases=rp.aliases[1:],
                                         numel=rp.numel, module=_module_of(rp.name),
                                         branch=(owners or {}).get(rp.name)))
        else:
            exp.unknown_indices.append(i)
    return exp


def describe_rank(exp: RankExplanation) -> List[str]:
    n = len(exp.params) + len(exp.unknown_indices)
    head = f'rank {exp.rank}: {n} parameter{"s" if n != 1 else ""} did not receive a gradient'
    if exp.truncated:
        head += (f' (DDP cut its list after {DDP_LIST_CAP} entries: there are more; '
                 'DDPAutoTuneHook or tools/ddp_doctor.py measure the full set)')
    lines = [head]
    by_module: Dict[str, List[NamedIndex]] = {}
    for p in exp.params:
        by_module.setdefault(p.module, []).append(p)
    for module, items in by_module.items():
        elems = sum(p.numel for p in items)
        branches = sorted({p.branch for p in items if p.branch})
        owned = f' (config branch {", ".join(branches)})' if branches else ''
        lines.append(f'  {module}: {len(items)} param{"s" if len(items) != 1 else ""}, '
                     f'{elems} elems{owned}')
        for p in items:
            alias = f' (also {", ".join(p.aliases)})' if p.aliases else ''
            lines.append(f'    {p.index:>5} -> {p.name}{alias} ({p.numel} elems)')
    if exp.unknown_indices:
        lines.append(f'  indices {exp.unknown_indices[:10]} are past the end of the reducer list '
                     f'({len(exp.params)} known): the model differs from the one that raised '
                     '(config options, frozen stages, ignored parameters?)')
    return lines


UNUSED_FIXES = [
    'make every parameter reach the loss on every rank (or do not build switched-off branches)',
    'add DDPAutoTuneHook: it names these in the log and picks ignore/zero-fill/'
    'find_unused_parameters=True only where needed',
    'or set model_wrapper_cfg=dict(find_unused_parameters=True), which costs every step',
]


def explain_unused_error(text: str, params: Sequence[ReducerParam]) -> str:
    """DDP's text followed by every index it names, as parameter names, and the fixes."""
    lines = parse_unused_lines(text)
    if not lines:
        return text
    out = [text.rstrip(), '', '[mmddp_hooks] the indices above, by name:']
    for line in lines:
        out.extend(describe_rank(name_indices(line, params)))
    out.append('Fixes:')
    out.extend(f'  - {fix}' for fix in UNUSED_FIXES)
    return '\n'.join(out)


def other_messages(text: str) -> List[Dict[str, str]]:
    """The other DDP messages found in ``text``, each with the fix that applies."""
    return [{'message': key, 'fix': fix} for key, (pattern, fix) in OTHER_MESSAGES.items()
            if pattern.search(text)]


def explain_text(text: str, params: Sequence[ReducerParam],
                 owners: Optional[Mapping[str, str]] = None) -> dict:
    """Everything recognised in ``text`` (a log or a pasted message), as plain data."""
    ranks = [asdict(name_indices(line, params, owners)) for line in parse_unused_lines(text)]
    return {'n_reducer_params': len(params), 'unused': ranks,
            'fixes': UNUSED_FIXES if ranks else [], 'other': other_messages(text)}
