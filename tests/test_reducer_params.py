"""The reducer order and names, checked against DDP's own list on a 1-rank gloo group."""
import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mmddp_hooks.explain import UnusedLine, explain_unused_error, parse_unused_lines
from mmddp_hooks.ranks import run_distributed
from mmddp_hooks.reducer_params import ignore_keys_for, reducer_params


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.enc = nn.Linear(3, 3)
        self.frozen = nn.Linear(3, 3).requires_grad_(False)
        self.dec = nn.Linear(3, 3)
        self.dec.weight = self.enc.weight
        self.alias = self.dec
        self.tail = nn.Linear(3, 1)


def test_names_aliases_and_keys():
    params = reducer_params(Tied())
    assert [rp.name for rp in params] == ['scale', 'enc.weight', 'enc.bias', 'dec.bias',
                                          'tail.weight', 'tail.bias']
    assert params[1].aliases == ['enc.weight', 'dec.weight', 'alias.weight']
    assert params[0].ignore_keys == ['.scale']
    assert ignore_keys_for(Tied(), ['dec.weight', 'scale']) == [
        'enc.weight', 'dec.weight', 'alias.weight', '.scale']
    with pytest.raises(KeyError, match="no parameter named 'nope'"):
        ignore_keys_for(Tied(), ['nope'])


def test_ignored_params_leave_the_list():
    m = Tied()
    ignored = ignore_keys_for(m, ['enc.weight', 'scale'])
    assert [rp.name for rp in reducer_params(m, ignored)] == ['enc.bias', 'dec.bias',
                                                             'tail.weight', 'tail.bias']


def _compare_with_ddp():
    out = []
    for ignore in ([], ['enc.weight', 'scale']):
        m = Tied()
        keys = ignore_keys_for(m, ignore)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(m, keys)
        ddp = DistributedDataParallel(m)
        truth = [id(p) for p in ddp._build_params_for_reducer()[0]]
        out.append(truth == [id(rp.param) for rp in reducer_params(m)])
    return out


@pytest.mark.dist
def test_order_equals_ddp_reducer_order():
    assert run_distributed(_compare_with_ddp, 1, timeout=60) == [[True, True]]


def test_parse_and_explain_indices():
    text = ('Parameter indices which did not receive grad for rank 0: 1 3\n'
            'Parameter indices which did not receive grad for rank 1: 5')
    assert parse_unused_lines(text) == [UnusedLine(0, [1, 3], False), UnusedLine(1, [5], False)]
    assert parse_unused_lines('... for rank 2: 7 8 ...') == []  # not DDP's line
    cut = parse_unused_lines('Parameter indices which did not receive grad for rank 2: 7 8 ...')
    assert cut == [UnusedLine(2, [7, 8], True)]
    explained = explain_unused_error(text, reducer_params(Tied()))
    assert explained.startswith(text)
    assert '1 -> enc.weight (also dec.weight, alias.weight) (9 elems)' in explained
    assert '5 -> tail.bias (1 elems)' in explained
