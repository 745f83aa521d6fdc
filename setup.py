"""Install mmddp_hooks: MMEngine hooks and model wrappers that make DDP training correct and fast."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION_PY = (HERE / 'mmddp_hooks' / 'version.py').read_text()
VERSION = re.search(r"__version__ = '([^']+)'", VERSION_PY).group(1)
LO_MAJ, LO_MIN, HI_MAJ, HI_MIN = re.search(
    r'TORCH_MIN, TORCH_MAX = \((\d+), (\d+)\), \((\d+), (\d+)\)', VERSION_PY).groups()
TORCH = f'torch>={LO_MAJ}.{LO_MIN},<{HI_MAJ}.{int(HI_MIN) + 1}'
MMENGINE = 'mmengine>={},<{}'.format(*re.search(
    r"MMENGINE_MIN, MMENGINE_BELOW = '([^']+)', '([^']+)'", VERSION_PY).groups())

setup(
    name='mmddp_hooks',
    version=VERSION,
    description='Named unused parameters and the fastest correct DDP settings for MMEngine runners',
    long_description=(HERE / 'README.md').read_text(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['mmddp_hooks', 'mmddp_hooks.*']),
    python_requires='>=3.9',
    # torch 2.1 .. 2.15 and mmengine 0.7.1 .. <1.0 (version.py): ranges, so `pip install .` keeps
    # the torch, mmengine and mmcv a working OpenMMLab environment already has (and never replaces
    # a local CPU torch with a CUDA build).
    install_requires=[TORCH, MMENGINE, 'numpy'],
    extras_require={
        'mmseg': ['mmcv==2.1.0', 'mmsegmentation==1.2.2', 'ftfy', 'regex'],
        'mmdet': ['mmcv==2.1.0', 'mmdet==3.3.0'],
        'mmpretrain': ['mmcv==2.1.0', 'mmpretrain==1.2.0'],
        'test': ['pytest>=7', 'pytest-xdist>=3', 'ruff', 'matplotlib'],
    },
)
