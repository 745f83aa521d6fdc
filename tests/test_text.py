"""The shared text helpers: which frame is the user's, and lists cut to a readable length."""
import os
import sysconfig

import mmengine
import torch

from mmddp_hooks import text


def test_library_code_is_python_s_the_installed_packages_the_openmmlab_libraries_and_ours():
    assert text.is_library('<frozen runpy>')
    assert text.is_library(os.path.join(sysconfig.get_paths()['stdlib'], 'threading.py'))
    assert text.is_library('/opt/env/lib/python3.11/site-packages/mmdet/models/roi_extractor.py')
    assert text.is_library('/usr/lib/python3/dist-packages/yaml/__init__.py')
    assert text.is_library(torch.nn.functional.__file__) and text.is_library(mmengine.__file__)
    assert text.is_library(text.__file__)
    here = os.path.dirname(os.path.abspath(__file__))
    assert not text.is_library(__file__)
    assert not text.is_library(os.path.join(here, '..', 'projects', 'two_kinds', 'models.py'))
    assert not text.is_library('model.py')


def test_the_innermost_user_frame_is_the_last_one_outside_the_library():
    user = os.path.abspath('train_net.py')
    paths = ['<frozen runpy>', user, torch.__file__, os.path.abspath('my_head.py'), text.__file__,
             mmengine.__file__]
    assert text.innermost_user(paths) == 3
    assert text.innermost_user(paths[:3]) == 1
    assert text.innermost_user([torch.__file__, mmengine.__file__]) is None
    # a narrower library: only torch is skipped, so MMEngine's own frame counts
    assert text.innermost_user(paths, lambda p: p.startswith(os.path.dirname(torch.__file__))) == 5


def test_a_code_line_names_the_file_relative_to_here_with_its_code():
    line = text.code_line(__file__, 1)
    assert line == f'{os.path.relpath(__file__)}:1: """The shared text helpers: which frame is the ' \
        "user's, and lists cut to a readable length.\"\"\""
    assert text.code_line('/nonexistent/x.py', 3) == '/nonexistent/x.py:3'


def test_names_cut_a_list_and_say_so():
    five = ['a', 'b', 'c', 'd', 'e']
    assert text.names(five, 5) == 'a, b, c, d, e'
    assert text.names(five, 3) == 'a, b, c ...'
    assert text.names(five, 3, text.AND_MORE) == 'a, b, c and 2 more'
    assert text.names(five, 2, '') == 'a, b'
    assert text.names(five, 2, sep='; ') == 'a; b ...'
    assert text.names([], 3) == ''
