'''mmdetection helpers (needs the ``[mmdet]`` extra): synthetic detection and instance-segmentation data.

Import it from a config: ``custom_imports = dict(imports=['mmddp_hooks', 'mmddp_hooks.mmdet'])``.
'''
from .synthetic import SyntheticDetDataset, use_synthetic_det_data

__all__ = ['SyntheticDetDataset', 'use_synthetic_det_data']
