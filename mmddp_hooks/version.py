__version__ = '0.1.0'

# The torch releases this package supports (tested with `make test-compat TORCH=...` at both ends).
# setup.py builds its requirement from these; `import mmddp_hooks` refuses other releases.
TORCH_MIN, TORCH_MAX = (2, 1), (2, 15)
# The mmengine releases: from the oldest that mmdet 3.3.0 accepts (mmseg 1.2.2 accepts >= 0.5) up to
# 1.0, tested at both ends with `make test-compat TORCH=2.1.2 MMENGINE=0.7.1`.
MMENGINE_MIN, MMENGINE_BELOW = '0.7.1', '1.0'
