"""Synthetic detection data on real mmdet configs: what the generator picks, and one real CPU step.

Single process. Each model is cut down for CPU (ResNet-18 instead of 50, no pretrained download) and
trained one forward/backward on a batch of an annotated and an empty 128x128 image.
"""
import math
import os.path as osp

import pytest
import torch

mmdet = pytest.importorskip('mmdet')

from mmdet.structures.bbox import HorizontalBoxes  # noqa: E402
from mmdet.structures.mask import BitmapMasks  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.dataset import pseudo_collate  # noqa: E402
from mmengine.registry import DATASETS, init_default_scope  # noqa: E402

from mmddp_hooks.model_from_config import build_model  # noqa: E402
from mmddp_hooks.synthetic import SyntheticDataUnsupported, use_synthetic  # noqa: E402

pytestmark = pytest.mark.mmdet

MMDET_CONFIGS = osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs')
REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
SIZE = (128, 128)
RESNET18 = {'model.backbone.depth': 18, 'model.backbone.init_cfg': None}
# config, CPU cut-down, what the generator reads from the full config: (H, W), classes, masks, batch
CASES = {
    'retinanet': ('retinanet/retinanet_r50_fpn_1x_coco.py',
                  dict(RESNET18, **{'model.neck.in_channels': [64, 128, 256, 512]}),
                  ((800, 1333), 80, False, 2)),
    'mask-rcnn': ('mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py',
                  dict(RESNET18, **{'model.neck.in_channels': [64, 128, 256, 512]}),
                  ((800, 1333), 80, True, 2)),
    'detr': ('detr/detr_r50_8xb2-150e_coco.py',
             dict(RESNET18, **{'model.neck.in_channels': [512]}),  # out_indices=(3,): stage 4 only
             ((800, 1333), 80, False, 2)),
    'yolov3': ('yolo/yolov3_mobilenetv2_8xb24-ms-416-300e_coco.py',
               {'model.backbone.init_cfg': None},
               ((416, 416), 80, False, 24)),
}


def load(name: str, cut_down: bool = True) -> Config:
    path, options, _ = CASES[name]
    cfg = Config.fromfile(osp.join(MMDET_CONFIGS, path))
    if cut_down:
        cfg.merge_from_dict(options)
    return cfg


@pytest.mark.parametrize('name', list(CASES))
def test_generator_reads_the_config(name):
    cfg = load(name, cut_down=False)
    use_synthetic(cfg, max_iters=3)
    size, num_classes, with_mask, batch_size = CASES[name][2]
    loader = cfg.train_dataloader
    assert loader.dataset == dict(type='SyntheticDetDataset', num_samples=32, img_size=size,
                                  num_classes=num_classes, with_mask=with_mask)
    assert loader.batch_size == batch_size and loader.num_workers == 0
    assert loader.sampler.type == 'InfiniteSampler' and loader.collate_fn.type == 'pseudo_collate'
    assert cfg.train_cfg == dict(type='IterBasedTrainLoop', max_iters=3)
    assert cfg.val_dataloader is None and cfg.test_dataloader is None
    assert 'size' not in cfg.model.data_preprocessor  # DetDataPreprocessor pads; it takes no size


@pytest.mark.parametrize('path, size, with_mask', [
    ('rtmdet/rtmdet_tiny_8xb32-300e_coco.py', (640, 640), False),  # Resize 1280, then RandomCrop 640
    ('cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py', (800, 1333), True),  # heads in lists
])
def test_generator_reads_more_configs(path, size, with_mask):
    cfg = Config.fromfile(osp.join(MMDET_CONFIGS, path))
    use_synthetic(cfg, max_iters=1)
    dataset = cfg.train_dataloader.dataset
    assert (dataset.img_size, dataset.num_classes, dataset.with_mask) == (size, 80, with_mask)


def test_epoch_loop_without_max_iters_gets_a_finite_sampler():
    cfg = load('retinanet', cut_down=False)
    use_synthetic(cfg)
    assert cfg.train_cfg.type == 'EpochBasedTrainLoop'  # an infinite sampler would never end epoch 1
    assert cfg.train_dataloader.sampler.type == 'DefaultSampler'


def check_sample(sample: dict, annotated: bool, num_classes: int, with_mask: bool) -> None:
    h, w = SIZE
    image, data_sample = sample['inputs'], sample['data_samples']
    assert image.dtype == torch.uint8 and image.shape == (3, h, w)
    gt = data_sample.gt_instances
    n = len(gt.labels)
    assert 1 <= n <= 3 if annotated else n == 0
    assert isinstance(gt.bboxes, HorizontalBoxes) and gt.bboxes.tensor.dtype == torch.float32
    boxes = gt.bboxes.tensor
    assert boxes.shape == (n, 4) and gt.labels.dtype == torch.int64
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert (boxes[:, 2:] - boxes[:, :2] >= 8).all()
    assert ((gt.labels >= 0) & (gt.labels < num_classes)).all()
    if with_mask:
        assert isinstance(gt.masks, BitmapMasks) and gt.masks.masks.shape == (n, h, w)
        assert gt.masks.masks.dtype.name == 'uint8'
        areas = (boxes[:, 2:] - boxes[:, :2]).prod(1)
        assert torch.equal(torch.as_tensor(gt.masks.areas, dtype=areas.dtype), areas)
    else:
        assert 'masks' not in gt
    assert len(data_sample.ignored_instances.labels) == 0
    assert data_sample.img_shape == data_sample.ori_shape == (h, w)
    assert data_sample.scale_factor == (1.0, 1.0) and data_sample.flip is False


@pytest.mark.parametrize('name', list(CASES))
def test_one_training_step(name):
    cfg = load(name)
    use_synthetic(cfg, img_size=SIZE, max_iters=2)
    spec = cfg.train_dataloader.dataset
    init_default_scope(cfg.default_scope)
    ds = DATASETS.build(spec)
    assert len(ds.metainfo['classes']) == spec.num_classes
    check_sample(ds[0], True, spec.num_classes, spec.with_mask)
    check_sample(ds[3], False, spec.num_classes, spec.with_mask)
    assert torch.equal(ds[1]['data_samples'].gt_instances.bboxes.tensor,
                       ds[1]['data_samples'].gt_instances.bboxes.tensor)  # deterministic per index

    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights()  # as the Runner does: heads' prior biases (the backbone's init_cfg is None)
    data = model.data_preprocessor(pseudo_collate([ds[0], ds[3]]), training=True)
    loss, log_vars = model.parse_losses(model(**data, mode='loss'))
    loss.backward()
    print(f'{name}: size={spec.img_size} num_classes={spec.num_classes} '
          f'masks={spec.with_mask} loss={loss.item():.4f}')
    assert math.isfinite(loss.item())
    assert any(p.grad is not None for p in model.parameters())
    if spec.with_mask:
        assert 'loss_mask' in log_vars


def test_unsupported_config_names_the_way_out():
    cfg = Config(dict(model=dict(type='ToyClassifier',
                                 data_preprocessor=dict(type='BaseDataPreprocessor'))))
    with pytest.raises(SyntheticDataUnsupported) as err:
        use_synthetic(cfg)
    message = str(err.value)
    for word in ('ToyClassifier', 'BaseDataPreprocessor', '--real-data', 'without --synthetic'):
        assert word in message


def test_segmentation_config_still_gets_segmentation_data():
    pytest.importorskip('mmseg')
    cfg = Config.fromfile(osp.join(REPO, 'configs', 'mmseg', 'fcn_r18_aux-off.py'))
    use_synthetic(cfg, img_size=(32, 32), max_iters=1)
    assert cfg.train_dataloader.dataset.type == 'SyntheticSegDataset'
    assert cfg.model.data_preprocessor.size == (32, 32)
