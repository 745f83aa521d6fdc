"""Install mmddp_hooks: MMEngine hooks and model wrappers that make DDP training correct and fast."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r"__version__ = '([^']+)'",
                    (HERE / 'mmddp_hooks' / 'version.py').read_text()).group(1)

setup(
    name='mmddp_hooks',
    version=VERSION,
    description='Named unused parameters and the fastest correct DDP settings for MMEngine runners',
    long_description=(HERE / 'README.md').read_text(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['mmddp_hooks', 'mmddp_hooks.*']),
    python_requires='>=3.9',
    # The range admits the local CPU wheel (torch==2.13.0) so pip never pulls a CUDA build for it.
    install_requires=['torch>=2.1,<=2.14.1', 'mmengine==0.10.7', 'numpy'],
    extras_require={
        'mmseg': ['mmcv==2.1.0', 'mmsegmentation==1.2.2', 'ftfy', 'regex'],
        'test': ['pytest>=7', 'ruff', 'matplotlib'],
    },
)
