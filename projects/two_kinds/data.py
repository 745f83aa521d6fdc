"""The data: images with either object boxes (``data_tag='det'``) or point prompts and a mask
(``data_tag='sam'``), as an annotation file lists them, and a batch builder for the DDP doctor."""
import json
import os.path as osp
from typing import Any, Dict, List

import numpy as np
import torch
from mmcv.transforms import BaseTransform
from mmengine.dataset import BaseDataset
from mmengine.structures import BaseDataElement

KINDS = ('det', 'sam')


class PromptedImages(BaseDataset):
    """``ann_file``: a JSON list of ``{"img": file, "prompts": file.npz, "data_tag": kind}``."""

    METAINFO = dict(classes=('object',), kinds=KINDS)

    def load_data_list(self) -> List[Dict[str, Any]]:
        with open(self.ann_file) as f:
            records = json.load(f)
        root = self.data_prefix.get('img_path', '')
        return [dict(img_path=osp.join(root, r['img']), prompt_path=osp.join(root, r['prompts']),
                     data_tag=r['data_tag']) for r in records]


class LoadPrompts(BaseTransform):
    """Boxes, or points and a mask, from the sample's ``.npz`` file."""

    def transform(self, results: dict) -> dict:
        with np.load(results['prompt_path']) as f:
            results.update({k: f[k] for k in f.files})
        return results


class PackPromptInputs(BaseTransform):
    """The image as a CHW uint8 tensor, and a data sample carrying the kind and its targets."""

    def transform(self, results: dict) -> dict:
        sample = BaseDataElement(metainfo=dict(data_tag=results['data_tag']))
        if results['data_tag'] == 'det':
            sample.gt_boxes = torch.as_tensor(results['gt_boxes'])
        else:
            sample.points = torch.as_tensor(results['points'])
            sample.gt_mask = torch.as_tensor(results['gt_mask'])
        image = torch.as_tensor(np.ascontiguousarray(results['img'].transpose(2, 0, 1)))
        return dict(inputs=image, data_samples=sample)


def _targets(kind: str, size: int, rng: np.random.RandomState) -> Dict[str, np.ndarray]:
    if kind == 'det':
        xy = rng.randint(0, size // 2, (2, 2))
        return dict(gt_boxes=np.concatenate([xy, xy + size // 2], 1).astype(np.float32))
    return dict(points=rng.randint(0, size, (3, 2)).astype(np.float32),
                gt_mask=(rng.rand(size, size) > 0.5).astype(np.uint8))


def make_batch(index: int, batch_size: int, size: int = 32) -> dict:
    """The DDP doctor's batch builder (``ddp_doctor = dict(synthetic_batch=...)``): a batch as the
    dataloader gives it, all of one kind, ``'det'`` for an even ``index``, ``'sam'`` for an odd one
    (the doctor's sampler draws the indices at random, each rank its own, as a mixing sampler does)."""
    kind = KINDS[index % 2]
    rng = np.random.RandomState(index)
    samples = [PackPromptInputs()(dict(img=rng.randint(0, 256, (size, size, 3), dtype=np.uint8),
                                       data_tag=kind, **_targets(kind, size, rng)))
               for _ in range(batch_size)]
    return dict(inputs=[s['inputs'] for s in samples],
                data_samples=[s['data_samples'] for s in samples])


def write_demo_data(folder: str, n: int = 8, size: int = 32) -> str:
    """``n`` samples on disk, kinds alternating, with their annotation file; returns its path."""
    import cv2

    records = []
    for i in range(n):
        kind, rng = KINDS[i % 2], np.random.RandomState(i)
        cv2.imwrite(osp.join(folder, f'{i}.png'), rng.randint(0, 256, (size, size, 3), np.uint8))
        np.savez(osp.join(folder, f'{i}.npz'), **_targets(kind, size, rng))
        records.append(dict(img=f'{i}.png', prompts=f'{i}.npz', data_tag=kind))
    path = osp.join(folder, 'ann.json')
    with open(path, 'w') as f:
        json.dump(records, f)
    return path
