"""Synthetic segmentation data takes its classes from the model's decode head(s)."""
import pytest
from mmengine.config import Config

pytest.importorskip('mmseg')
from mmddp_hooks.mmseg import use_synthetic_data  # noqa: E402

pytestmark = pytest.mark.mmseg


@pytest.mark.parametrize('decode_head, classes', [
    (dict(type='FCNHead', num_classes=5), 5),
    ([dict(type='FCNHead', num_classes=3), dict(type='OCRHead', num_classes=7)], 7),  # cascade
    (None, 19),
])
def test_num_classes_from_the_decode_head(decode_head, classes):
    cfg = Config(dict(model=dict(type='CascadeEncoderDecoder', decode_head=decode_head,
                                 data_preprocessor=dict(type='SegDataPreProcessor')),
                      train_dataloader=dict(batch_size=4)))
    use_synthetic_data(cfg, img_size=(32, 48), max_iters=2)
    dataset = cfg.train_dataloader.dataset
    assert (dataset.type, dataset.num_classes, tuple(dataset.img_size)) == \
        ('SyntheticSegDataset', classes, (32, 48))
    assert cfg.train_dataloader.batch_size == 4 and cfg.train_cfg.max_iters == 2
