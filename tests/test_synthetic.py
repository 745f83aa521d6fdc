"""Synthetic data through real configs' own train pipelines and dataset wrappers, single process.

Shipped mmseg 1.2.2, mmdet 3.3.0 and mmpretrain 1.2.0 configs: what the rewrite replaces (the innermost
dataset, the loading steps) and keeps (wrappers, every other transform, the hooks' pipelines), that the
samples come out of the config's own packing step, and one real CPU training step.
"""
import os.path as osp
import random

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DATASETS, init_default_scope

from mmddp_hooks.model_from_config import drop_remote_weights, train_only
from mmddp_hooks.synthetic import (
    SyntheticDataUnsupported,
    SyntheticPipelineError,
    describe,
    local_usage,
    pipeline_errors_named,
    use_synthetic,
)

mmdet = pytest.importorskip('mmdet')
mmseg = pytest.importorskip('mmseg')

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


def shipped(package, path: str) -> Config:
    return Config.fromfile(osp.join(osp.dirname(package.__file__), '.mim', 'configs', path))


def dataset_of(cfg: Config):
    init_default_scope(cfg.default_scope)
    return DATASETS.build(cfg.train_dataloader.dataset)


def step_types(pipeline) -> list:
    return [t['type'] for t in pipeline]


def test_segmentation_pipeline_runs_as_declared_with_only_the_loaders_replaced():
    cfg = shipped(mmseg, 'fcn/fcn_r18-d8_4xb2-80k_cityscapes-512x1024.py')
    original = step_types(cfg.train_dataloader.dataset.pipeline)
    done = use_synthetic(cfg, img_size=(64, 64), max_iters=2)
    inner = cfg.train_dataloader.dataset
    assert inner.type == 'SyntheticRawDataset' and inner.replaces == 'CityscapesDataset'
    assert original[:2] == ['LoadImageFromFile', 'LoadAnnotations']
    assert step_types(inner.pipeline) == ['SyntheticLoadImage', 'SyntheticLoadAnnotations'] + \
        original[2:]  # RandomResize, RandomCrop, RandomFlip, PhotoMetricDistortion, PackSegInputs
    # one factor for every pixel size: crop 512x1024 -> 32x64, the resize and the preprocessor too
    assert done['factor'] == 1 / 16 and done['train_size'] == (32, 64)
    assert tuple(inner.pipeline[2].scale) == (128, 64)
    assert tuple(inner.pipeline[3].crop_size) == (32, 64)
    assert tuple(cfg.model.data_preprocessor.size) == (32, 64)
    assert cfg.train_dataloader.sampler.type == 'InfiniteSampler'
    assert cfg.train_cfg == dict(type='IterBasedTrainLoop', max_iters=2)
    assert cfg.val_dataloader is None and cfg.test_dataloader is None

    ds = dataset_of(cfg)
    assert ds.metainfo['classes'][0] == 'road' and len(ds.metainfo['classes']) == 19
    sample = ds[0]
    image, seg = sample['inputs'], sample['data_samples'].gt_sem_seg.data
    # Cityscapes-shaped raw images (64x128), resized by 0.5-2 to fit 128x64, cropped to 32x64
    assert done['raw_size'] == (64, 128)
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 64)
    labels = set(seg.unique().tolist())
    assert labels <= set(range(19)) and len(labels) > 2
    load = ds.pipeline.transforms[0]  # the raw sample is the same each time: seeded by its index
    assert (load(ds.get_data_info(1))['img'] == load(ds.get_data_info(1))['img']).all()
    assert not (load(ds.get_data_info(1))['img'] == load(ds.get_data_info(2))['img']).all()


def test_generate_edge_of_pidnet_runs_on_the_synthetic_label_map():
    cfg = shipped(mmseg, 'pidnet/pidnet-s_2xb6-120k_1024x1024-cityscapes.py')
    use_synthetic(cfg, img_size=(64, 64), max_iters=1)
    assert 'GenerateEdge' in step_types(cfg.train_dataloader.dataset.pipeline)
    sample = dataset_of(cfg)[0]['data_samples']
    h, w = sample.img_shape  # RandomResize (ratio 0.5-2) then a 64x64 RandomCrop: at most 64x64
    assert sample.gt_edge_map.data.shape == sample.gt_sem_seg.data.shape == (1, h, w)
    assert h <= 64 and w <= 64
    assert 0 < sample.gt_edge_map.data.float().mean() < 1  # region borders, not everywhere


def test_yolox_keeps_its_mix_dataset_and_mosaic():
    cfg = shipped(mmdet, 'yolox/yolox_tiny_8xb8-300e_coco.py')
    use_synthetic(cfg, img_size=(64, 64), max_iters=1)
    wrapper = cfg.train_dataloader.dataset
    assert wrapper.type == 'MultiImageMixDataset'
    assert step_types(wrapper.pipeline)[0] == 'Mosaic'
    assert tuple(wrapper.pipeline[0].img_scale) == (64, 64)  # 640 scaled like the resize
    assert wrapper.dataset.type == 'SyntheticRawDataset' and wrapper.dataset.replaces == 'CocoDataset'
    assert [h for h in cfg.custom_hooks if h.type == 'YOLOXModeSwitchHook']
    ds = dataset_of(cfg)
    # Mosaic and MixUp draw their partner images and RandomAffine its scale (0.1-2) from Python's and
    # NumPy's global generators; 48 of 300 draws left no box in sample 0, so whatever ran earlier in
    # the same pytest worker decided this test. Seeded, it is the same draw every time.
    random.seed(0)
    np.random.seed(0)
    mixed = ds[0]  # Mosaic of 4 images, RandomAffine back to 64x64, MixUp
    assert mixed['inputs'].shape[1:] == (64, 64) and len(mixed['data_samples'].gt_instances) > 0
    ds.update_skip_type_keys(['Mosaic', 'RandomAffine', 'MixUp'])  # what the mode switch calls
    gt = ds[0]['data_samples'].gt_instances
    assert ds[0]['inputs'].shape[1] == 64 and len(gt.labels) > 0 and (gt.labels < 80).all()


@pytest.mark.parametrize('path, masks', [
    ('mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', True),
    ('retinanet/retinanet_r50_fpn_1x_coco.py', False),
])
def test_detection_boxes_and_masks_come_from_the_configs_own_load_annotations(path, masks):
    cfg = shipped(mmdet, path)
    done = use_synthetic(cfg, img_size=(128, 128), max_iters=1)
    assert done['train_size'] == (77, 128)  # (800, 1333) keep_ratio, scaled to fit 128x128
    load = cfg.train_dataloader.dataset.pipeline[1]
    assert load.type == 'SyntheticLoadAnnotations'
    assert load.replaces.get('with_mask', False) is masks
    ds = dataset_of(cfg)
    assert ds.filter_empty_gt  # the config's filter_cfg: every image has instances
    sample = ds[0]['data_samples']
    gt = sample.gt_instances
    assert 1 <= len(gt.labels) <= 3 and type(gt.bboxes).__name__ == 'HorizontalBoxes'
    h, w = sample.img_shape
    boxes = gt.bboxes.tensor
    assert (boxes[:, 2] <= w + 1e-3).all() and (boxes[:, 3] <= h + 1e-3).all()
    assert ('masks' in gt) is masks
    if masks:
        assert type(gt.masks).__name__ == 'BitmapMasks' and gt.masks.masks.shape[1:] == (h, w)


def test_wrappers_keep_their_api_and_the_inner_metainfo():
    cfg = shipped(mmdet, 'retinanet/retinanet_r50_fpn_1x_coco.py')
    inner = cfg.train_dataloader.dataset
    cfg.train_dataloader.dataset = dict(type='ConcatDataset', datasets=[
        dict(type='ClassBalancedDataset', oversample_thr=0.5, dataset=inner),  # by get_cat_ids
        dict(type='RepeatDataset', times=2, dataset=inner)])
    done = use_synthetic(cfg, img_size=(64, 64), max_iters=1)
    assert [where for where, _ in done['datasets']] == [  # one dict in both: replaced once
        'train_dataloader.dataset.datasets[0].dataset']
    concat = dataset_of(cfg)
    balanced, repeated = concat.datasets
    assert type(balanced).__name__ == 'ClassBalancedDataset' and len(repeated) == 64
    assert concat.metainfo['classes'][0] == 'person'  # ConcatDataset compares the parts' metainfo
    assert len(balanced) > 32  # rare classes repeated
    assert len(concat[len(balanced) + 1]['data_samples'].gt_instances) >= 1


def test_a_loader_without_a_stand_in_is_named_with_the_way_out():
    cfg = shipped(mmseg, 'fcn/fcn_r18-d8_4xb2-80k_cityscapes-512x1024.py')
    cfg.train_dataloader.dataset.pipeline.insert(1, dict(type='LoadDepthAnnotation'))
    with pytest.raises(SyntheticDataUnsupported) as err:
        use_synthetic(cfg)
    for word in ('train_dataloader.dataset.pipeline[1]', 'LoadDepthAnnotation', '--real-data',
                 '--cfg-options'):
        assert word in str(err.value)


def test_a_step_that_fails_on_synthetic_data_is_named():
    cfg = shipped(mmseg, 'fcn/fcn_r18-d8_4xb2-80k_cityscapes-512x1024.py')
    # a crop larger than the image with cat_max_ratio fails in mmseg's own RandomCrop
    cfg.train_dataloader.dataset.pipeline[3] = dict(type='RandomRotate', prob=1.0, degree='x')
    use_synthetic(cfg, img_size=(32, 64), max_iters=1)
    with pytest.raises(SyntheticPipelineError) as err, pipeline_errors_named():
        dataset_of(cfg)[0]
    assert 'RandomRotate' in str(err.value) and '--real-data' in str(err.value)


def test_remote_pretrained_weights_are_dropped_local_ones_kept(tmp_path):
    cfg = shipped(mmseg, 'pidnet/pidnet-s_2xb6-120k_1024x1024-cityscapes.py')
    local = tmp_path / 'w.pth'
    local.write_bytes(b'')
    cfg.model.decode_head.init_cfg = dict(type='Pretrained', checkpoint=str(local))
    dropped = drop_remote_weights(cfg)
    assert len(dropped) == 1 and dropped[0].startswith('https://')
    assert cfg.model.backbone.init_cfg is None
    assert cfg.model.decode_head.init_cfg.checkpoint == str(local)


def test_one_training_step_on_a_shipped_detector():
    cfg = shipped(mmdet, 'yolox/yolox_tiny_8xb8-300e_coco.py')
    cfg.train_dataloader.batch_size = 2
    use_synthetic(cfg, img_size=(64, 64), max_iters=1)
    torch.manual_seed(0)
    trainable, used = local_usage(cfg, steps=1)
    assert used and used <= trainable


def test_classification_samples_carry_labels():
    mmpretrain = pytest.importorskip('mmpretrain')
    cfg = shipped(mmpretrain, 'resnet/resnet18_8xb32_in1k.py')
    done = use_synthetic(cfg, img_size=(64, 64), max_iters=1)
    assert done['task'] == 'mmpretrain' and done['train_size'] == (64, 64)
    assert cfg.train_dataloader.dataset.pipeline[1].scale == 64  # RandomResizedCrop(224)
    ds = dataset_of(cfg)
    assert len(ds.metainfo['classes']) == 1000
    sample = ds[0]
    assert sample['inputs'].shape == (3, 64, 64) and 0 <= int(sample['data_samples'].gt_label) < 1000


def test_self_supervised_views_go_through_multiview():
    pytest.importorskip('mmpretrain')
    cfg = Config.fromfile(osp.join(REPO, 'configs', 'mmpretrain', 'byol_r18_momentum.py'))
    use_synthetic(cfg, img_size=(32, 32), max_iters=1)
    sample = dataset_of(cfg)[0]
    assert [v.shape for v in sample['inputs']] == [(3, 32, 32)] * 2
    trainable, used = local_usage(cfg, steps=1)
    assert used == trainable  # the momentum target network is not trainable: not in either set
    assert not any(n.startswith('target_net') for n in trainable)


@pytest.mark.parametrize('path, size, raw', [
    ('retinanet/retinanet_r50_fpn_1x_coco.py', (800, 1333), (800, 1333)),
    ('detr/detr_r50_8xb2-150e_coco.py', (800, 1333), (800, 1333)),  # a RandomChoiceResize's largest
    ('yolo/yolov3_mobilenetv2_8xb24-ms-416-300e_coco.py', (416, 416), (416, 416)),
    ('rtmdet/rtmdet_tiny_8xb32-300e_coco.py', (640, 640), (1280, 1280)),  # Resize 1280, crop 640
    ('cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py', (800, 1333), (800, 1333)),
])
def test_the_train_size_is_the_pipelines_own(path, size, raw):
    cfg = shipped(mmdet, path)
    done = use_synthetic(cfg, max_iters=3)
    assert done['factor'] == 1 and done['train_size'] == size and done['raw_size'] == raw
    inner = cfg.train_dataloader.dataset
    inner = inner.get('dataset', inner)  # YOLOv3's RepeatDataset
    assert inner.type == 'SyntheticRawDataset' and tuple(inner.img_size) == raw
    assert cfg.train_dataloader.num_workers == 0 and cfg.train_cfg.max_iters == 3


def test_epoch_loop_without_max_iters_keeps_its_finite_sampler():
    cfg = shipped(mmdet, 'retinanet/retinanet_r50_fpn_1x_coco.py')
    use_synthetic(cfg)
    assert cfg.train_cfg.type == 'EpochBasedTrainLoop'  # an infinite sampler would never end epoch 1
    assert cfg.train_dataloader.sampler.type == 'DefaultSampler'


@pytest.mark.parametrize('name', ['retinanet_r18_fpn_128', 'mask-rcnn_r18_fpn_128', 'detr_r18_128',
                                  'yolov3_mobilenetv2_128'])
def test_one_training_step_on_the_repos_detectors(name):
    cfg = Config.fromfile(osp.join(REPO, 'configs', 'mmdet', f'{name}.py'))
    use_synthetic(cfg, img_size=(128, 128), max_iters=1)
    torch.manual_seed(0)
    trainable, used = local_usage(cfg, steps=2)
    assert used and used <= trainable
    if name.startswith('mask'):
        assert any(n.startswith('roi_head.mask_head') for n in used)


def test_an_unknown_models_dataset_class_and_pipeline_are_kept_and_what_it_reads_made():
    """A research model (configs/examples/two_kinds): its dataset class, with only the samples
    synthetic; its loading steps replaced, a custom one too; the keys its later steps read made
    (boxes for 'det' samples, points and a mask for 'sam' ones); the user's values taken in turn."""
    from projects.two_kinds import PromptedImages

    cfg = Config.fromfile(osp.join(REPO, 'configs', 'examples', 'two_kinds', 'no_keep_alive.py'))
    cfg.ddp_doctor = dict(synthetic_values=dict(data_tag=['det', 'sam']))
    done = use_synthetic(cfg, max_iters=2)
    assert done['task'] == 'generic' and done['steps'] == ['LoadImageFromFile', 'LoadPrompts']
    assert done['keys'] == ['gt_boxes', 'points', 'gt_mask']
    assert 'PromptedImages, its class and pipeline kept' in describe(done)
    ds = DATASETS.build(cfg.train_dataloader.dataset)
    assert isinstance(ds, PromptedImages) and ds.metainfo['kinds'] == ('det', 'sam')
    det, sam = ds[0]['data_samples'], ds[1]['data_samples']
    assert det.data_tag == 'det' and det.gt_boxes.shape == (3, 4)
    assert sam.data_tag == 'sam' and sam.points.shape == (3, 2) and sam.gt_mask.shape == (64, 64)


def test_an_unknown_key_is_named_with_its_step_and_the_ways_out():
    cfg = Config.fromfile(osp.join(REPO, 'configs', 'examples', 'two_kinds', 'no_keep_alive.py'))
    with pytest.raises(SyntheticDataUnsupported) as err:
        use_synthetic(cfg, max_iters=2)
    for word in ("the train pipeline step PackPromptInputs reads the key 'data_tag'",
                 'synthetic_values=dict(data_tag=[...])', '--real-data --subset K',
                 "synthetic_batch='my_pkg.make_batch'"):
        assert word in str(err.value)


def test_several_frames_for_a_clip_pipeline():
    from mmengine.dataset import BaseDataset
    from mmengine.registry import TRANSFORMS

    @TRANSFORMS.register_module(force=True)
    class LoadClipFrames:  # reads a video file: replaced
        def __call__(self, results):
            raise AssertionError('not replaced')

    @TRANSFORMS.register_module(force=True)
    class StackClip:  # what a video model's pipeline does with the frames
        def __call__(self, results):
            return dict(inputs=torch.as_tensor(np.stack(results['frames'])),
                        label=results['gt_label'])

    @DATASETS.register_module(force=True)
    class ClipDataset(BaseDataset):
        def load_data_list(self):
            raise FileNotFoundError(self.ann_file)

    cfg = Config(dict(model=dict(type='VideoNet'), train_dataloader=dict(
        batch_size=2, dataset=dict(type='ClipDataset', ann_file='clips.json', pipeline=[
            dict(type='LoadClipFrames'), dict(type='StackClip')]))))
    done = use_synthetic(cfg, max_iters=1)
    assert done['keys'] == ['frames'] and done['steps'] == ['LoadClipFrames']
    sample = DATASETS.build(cfg.train_dataloader.dataset)[0]
    assert sample['inputs'].shape == (4, 64, 64, 3) and isinstance(sample['label'], int)


def test_mmseg_class_weight_bug_is_worked_around_and_named():
    from mmseg.models.losses import CrossEntropyLoss

    from mmddp_hooks.upstream_fixes import MMSEG_CLASS_WEIGHT, dry_run_fixes

    pred, label = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    label[0, 0] = 255  # ignored (or padded) pixels
    weight = [1.0, 2.0, 0.5]
    with pytest.raises(IndexError):
        CrossEntropyLoss(class_weight=weight)(pred, label, ignore_index=255)
    with dry_run_fixes() as acted:
        loss = CrossEntropyLoss(class_weight=weight)(pred, label, ignore_index=255)
    assert acted == [MMSEG_CLASS_WEIGHT] and torch.isfinite(loss)
    valid = label != 255
    expected = torch.nn.functional.cross_entropy(pred.permute(0, 2, 3, 1)[valid], label[valid],
                                                 weight=torch.tensor(weight))
    assert torch.allclose(loss, expected)  # PyTorch's weighted mean over the valid pixels
    with pytest.raises(IndexError):  # restored on the way out
        CrossEntropyLoss(class_weight=weight)(pred, label, ignore_index=255)


def test_a_dry_runs_config_is_dumped_unformatted_and_loads_back_the_same():
    # yapf's formatting cost 5 s a dump for DETR; the unformatted text is the same config
    cfg = Config.fromfile(osp.join(REPO, 'configs', 'mmdet', 'detr_r18_128.py'))
    formatted = cfg.pretty_text
    train_only(cfg, 4)
    text = cfg.pretty_text
    assert text != formatted
    again = Config.fromstring(text, '.py')
    assert again.to_dict() == cfg.to_dict()
    assert Config.fromstring(formatted, '.py').model == again.model
