"""Turn DDP's index-only unused-parameter error into parameter names.

DDP's message lists reducer indices ("Parameter indices which did not receive grad for rank 0: 2 217
394"); :func:`mmddp_hooks.reducer_params.reducer_params` gives the same order, so an index is a name.
"""
import re
from typing import Dict, List, Sequence

from .reducer_params import ReducerParam

_INDICES = re.compile(r'Parameter indices which did not receive grad for rank (\d+):\s*([\d\s,]*)'
                      r'(\.\.\.)?')


def parse_unused_indices(text: str) -> Dict[int, List[int]]:
    """``{rank: [index, ...]}`` for every "Parameter indices ... for rank N:" line in ``text``."""
    out: Dict[int, List[int]] = {}
    for m in _INDICES.finditer(text):
        out.setdefault(int(m.group(1)), []).extend(
            int(tok) for tok in re.split(r'[\s,]+', m.group(2).strip()) if tok)
    return out


def describe_indices(indices: Sequence[int], params: Sequence[ReducerParam]) -> List[str]:
    """One line per index: ``'  217 -> decode_head.conv_seg.weight (1024 elems)'``."""
    lines = []
    for i in indices:
        if 0 <= i < len(params):
            rp = params[i]
            alias = f' (also {", ".join(rp.aliases[1:])})' if len(rp.aliases) > 1 else ''
            lines.append(f'  {i:>5} -> {rp.name}{alias} ({rp.numel} elems)')
        else:
            lines.append(f'  {i:>5} -> (no such reducer index: the model differs from the one '
                         'that raised)')
    return lines


def explain_unused_error(text: str, params: Sequence[ReducerParam]) -> str:
    """DDP's text followed by every index it names, as parameter names."""
    per_rank = parse_unused_indices(text)
    if not per_rank:
        return text
    lines = [text.rstrip(), '', '[mmddp_hooks] the indices above, by name:']
    for rank, indices in sorted(per_rank.items()):
        lines.append(f'rank {rank}:')
        lines.extend(describe_indices(indices, params))
    lines.append('Fix: make every parameter reach the loss on every rank, or set '
                 'find_unused_parameters=True (model_wrapper_cfg), or let DDPAutoTuneHook choose.')
    return '\n'.join(lines)
