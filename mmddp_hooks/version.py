__version__ = '0.1.0'

# The torch releases this package supports (tested with `make test-compat TORCH=...` at both ends).
# setup.py builds its requirement from these; `import mmddp_hooks` refuses other releases.
TORCH_MIN, TORCH_MAX = (2, 1), (2, 15)
