"""Shipped mmpose 1.3.2 and mmaction2 1.2.0 configs on synthetic data, through their own pipelines.

The samples keep the config's dataset class (its metainfo: keypoint count, flip pairs) and replace
only what reads files (the image loader; the video readers and decoders, whose frames are those the
config's own sampler picked). The doctor runs DEKR (bottom-up pose, ships
``find_unused_parameters=True``) and TSN (2D video); its never-used set and verdict must equal an
independent single-process account of one batch, as tests/test_zoo_configs.py does for mmseg, mmdet
and mmpretrain.
"""
import json

import pytest
import torch
from mmengine.registry import DATASETS, init_default_scope

from mmddp_hooks.doctor import dry_run
from mmddp_hooks.model_from_config import drop_remote_weights, load_config
from mmddp_hooks.report import NEVER
from mmddp_hooks.synthetic import SyntheticDataUnsupported, describe, local_usage, use_synthetic

import launch

mmpose = pytest.importorskip('mmpose', reason='mmpose 1.3.2 is not installed (make setup)')
mmaction = pytest.importorskip('mmaction', reason='mmaction2 1.2.0 is not installed (make setup)')

TOPDOWN = 'mmpose::body_2d_keypoint/topdown_heatmap/coco/td-hm_hrnet-w32_8xb64-210e_coco-256x192.py'
WHOLEBODY = ('mmpose::wholebody_2d_keypoint/topdown_heatmap/coco-wholebody/'
             'td-hm_hrnet-w32_8xb64-210e_coco-wholebody-256x192.py')
BOTTOMUP = 'mmpose::body_2d_keypoint/dekr/coco/dekr_hrnet-w32_8xb10-140e_coco-512x512.py'
DISTILLER = 'mmpose::wholebody_2d_keypoint/dwpose/ubody/s2_dis/dwpose_t-tt_coco-ubody-256x192.py'
TSM = 'mmaction::recognition/tsm/tsm_imagenet-pretrained-r50_8xb16-1x1x8-50e_kinetics400-rgb.py'
TSN = 'mmaction::recognition/tsn/tsn_imagenet-pretrained-r50_8xb32-1x1x3-100e_kinetics400-rgb.py'
I3D = 'mmaction::recognition/i3d/i3d_imagenet-pretrained-r50_8xb8-32x2x1-100e_kinetics400-rgb.py'
FLOW = 'mmaction::recognition/tsn/tsn_imagenet-pretrained-r50_8xb32_5x1x3-110e_kinetics400-flow.py'
STGCN = 'mmaction::skeleton/stgcn/stgcn_8xb16-joint-u100-80e_ntu60-xsub-keypoint-2d.py'
STGCN_3D = 'mmaction::skeleton/stgcn/stgcn_8xb16-joint-u100-80e_ntu60-xsub-keypoint-3d.py'
AUDIO = 'mmaction::recognition_audio/resnet/tsn_r18_8xb320-64x1x1-100e_kinetics400-audio-feature.py'


def first_sample(cfg):
    init_default_scope(cfg.default_scope)
    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    return dataset, dataset[0]


@pytest.mark.parametrize('config, joints', [(TOPDOWN, 17), (WHOLEBODY, 133)])
def test_top_down_samples_carry_the_datasets_keypoints_and_go_through_its_pipeline(config, joints):
    cfg = load_config(config)
    done = use_synthetic(cfg, img_size=(64, 64), max_iters=1)
    assert done['task'] == 'mmpose' and done['steps'] == ['LoadImage']
    # 256x192 snaps to 128x96 (multiples of 32), not 64x48: the heatmaps are a quarter of it
    assert done['factor'] == 0.5 and done['train_size'] == (128, 96)
    dataset, sample = first_sample(cfg)
    assert type(dataset).__name__.startswith('Synthetic')  # the config's class, samples made
    assert dataset.metainfo['num_keypoints'] == joints
    info = dataset.get_data_info(0)
    assert info['keypoints'].shape == (1, joints, 2) and info['bbox'].shape == (1, 4)
    assert info['flip_indices'] == dataset.metainfo['flip_indices']  # the class's own additions
    assert sample['inputs'].shape == (3, 128, 96)
    heatmaps = sample['data_samples'].gt_fields.heatmaps
    assert heatmaps.shape == (joints, 32, 24) and heatmaps.max() > 0
    assert 'its class kept' in describe(done)


def test_bottom_up_samples_group_people_per_image_with_crowd_regions():
    cfg = load_config(BOTTOMUP)
    done = use_synthetic(cfg, img_size=(64, 64), max_iters=1)
    assert done['factor'] == 1 / 8 and done['train_size'] == (64, 64)
    dataset, sample = first_sample(cfg)
    assert len(dataset) == 32  # one sample an image (top-down: one a person)
    crowd = dataset.get_data_info(3)
    assert crowd['invalid_segs'] and crowd['keypoints'].shape[1:] == (17, 2)
    assert sample['inputs'].shape == (3, 64, 64)


def test_a_distillers_teacher_and_student_configs_are_found_and_scaled():
    cfg = load_config(DISTILLER)
    use_synthetic(cfg, img_size=(64, 64), max_iters=1)
    student = load_config(cfg.model.student_cfg)  # written beside, scaled as the pipeline
    assert tuple(student.model.head.input_size) == (96, 128)
    assert tuple(student.model.head.in_featuremap_size) == (3, 4)


def test_weights_not_here_are_dropped_with_a_2d_conversion_and_a_distillers_teacher():
    cfg = load_config(TSM)  # ResNetTSM converts `pretrained` from 2D unasked (pretrained2d=True)
    assert drop_remote_weights(cfg) == ['torchvision://resnet50']
    assert cfg.model.backbone.pretrained is None and cfg.model.backbone.pretrained2d is False
    cfg = load_config(DISTILLER)
    dropped = drop_remote_weights(cfg)
    assert 'work_dirs/dwpose_l_dis_t_coco-ubody-256x192/dw-l-t_ucoco_256.pth' in dropped
    assert cfg.model.teacher_pretrained is None
    student = load_config(cfg.model.student_cfg)  # its backbone's ImageNet init, from a URL
    assert student.model.backbone.init_cfg is None and any('cspnext' in d for d in dropped)


@pytest.mark.parametrize('config, frames, shape', [
    (TSN, 3, (3, 3, 64, 64)),  # 3 segments of 1 frame, NCHW
    (I3D, 32, (1, 3, 32, 64, 64)),  # one clip of 32 frames, NCTHW
])
def test_video_clips_are_the_frames_the_configs_sampler_picked(config, frames, shape):
    cfg = load_config(config)
    done = use_synthetic(cfg, img_size=(64, 64), max_iters=1)
    assert done['task'] == 'mmaction'
    assert sorted(done['steps']) == ['DecordDecode', 'DecordInit']
    dataset, sample = first_sample(cfg)
    assert tuple(sample['inputs'].shape) == shape
    results = dataset.pipeline.transforms[1](dataset.pipeline.transforms[0](
        dataset.get_data_info(0)))  # the config's SampleFrames, on the clip's 300 frames
    assert results['total_frames'] == 300 and len(results['frame_inds']) == frames
    label = sample['data_samples'].gt_label
    assert 0 <= int(label) < cfg.model.cls_head.num_classes


def test_optical_flow_frames_have_two_channels():
    cfg = load_config(FLOW)
    done = use_synthetic(cfg, img_size=(64, 64), max_iters=1)
    assert done['steps'] == ['RawFrameDecode']
    _, sample = first_sample(cfg)
    assert sample['inputs'].shape[1] == 10  # 5 flow frames of x and y a segment


@pytest.mark.parametrize('config, joints, dims', [(STGCN, 17, 2), (STGCN_3D, 25, 3)])
def test_skeleton_samples_follow_the_graph_layout(config, joints, dims):
    cfg = load_config(config)
    done = use_synthetic(cfg, max_iters=1)
    assert done['steps'] == []
    dataset, sample = first_sample(cfg)
    info = dataset.get_data_info(0)
    assert info['keypoint'].shape[2:] == (joints, dims)
    assert ('keypoint_score' in info) == (dims == 2)  # 2D scores become a third channel
    # FormatGCNInput: (clips, people, 100 frames, joints, 3)
    assert tuple(sample['inputs'].shape) == (1, 2, 100, joints, 3)


def test_audio_features_stand_in_for_the_loader():
    cfg = load_config(AUDIO)
    done = use_synthetic(cfg, max_iters=1)
    assert done['steps'] == ['LoadAudioFeature']
    _, sample = first_sample(cfg)
    # NCTF: AudioFeatureSelector's fixed 128 spectrogram frames for the 64 sampled
    assert tuple(sample['inputs'].shape) == (1, 1, 128, 80)


def test_a_key_the_pose_samples_cannot_make_is_named_and_the_users_values_fill_it():
    from mmengine.registry import TRANSFORMS

    @TRANSFORMS.register_module(force=True)
    class NeedsCamera:  # a user's step reading what their own annotations carry
        def __call__(self, results):
            results['focal'] = results['camera_param'] * 2
            return results

    def config():
        cfg = load_config(TOPDOWN)
        cfg.train_dataloader.dataset.pipeline.insert(1, dict(type='NeedsCamera'))
        return cfg

    with pytest.raises(SyntheticDataUnsupported) as err:
        use_synthetic(config(), img_size=(64, 64), max_iters=1)
    assert "the train pipeline step NeedsCamera reads the key 'camera_param'" in str(err.value)
    assert 'synthetic_values=dict(camera_param=[...])' in str(err.value)
    assert '--real-data' in str(err.value)
    cfg = config()
    cfg.ddp_doctor = dict(synthetic_values=dict(camera_param=[1.5, 2.5]))
    use_synthetic(cfg, img_size=(64, 64), max_iters=1)
    dataset, _ = first_sample(cfg)
    assert dataset.pipeline.transforms[1](dataset.get_data_info(0))['focal'] in (3.0, 5.0)


@pytest.mark.dist
@pytest.mark.parametrize('config, asked, never_in', [
    (BOTTOMUP, True, 'head.rescore_net.'),  # DEKR's keypoint rescoring net: trained offline
    (TSN, False, None),
])
def test_the_doctor_agrees_with_one_process_on_a_shipped_config(config, asked, never_in):
    code, out = launch.doctor(config, '--size', 64, 64, '--iters', 1, '--json')
    assert code == 0, out[-4000:]
    found = json.loads(out[out.index('{'):])
    assert found['asked_find_unused'] is asked and not found['crashes']
    never = {p['name'] for p in found['report']['params'] if p['kind'] == NEVER}
    cfg = load_config(config, {'train_dataloader.batch_size': 2})
    dry_run(cfg, (64, 64), 1)
    torch.manual_seed(0)
    trainable, used = local_usage(cfg, steps=1)
    assert never == trainable - used
    assert all(name.startswith(never_in) for name in never) and bool(never) == bool(never_in)
