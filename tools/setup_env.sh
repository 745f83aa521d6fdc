#!/usr/bin/env bash
# Take a fresh machine to a working .venv with torch (CPU wheel), mmengine, a full mmcv 2.1.0 build
# with CPU ops, mmsegmentation 1.2.2, mmdetection 3.3.0,
# mmpretrain 1.2.0, mmpose 1.3.2, mmaction2 1.2.0 and this package (editable, with test extras).
# Idempotent: each step is skipped when what it installs is already importable at the right version,
# so a second run takes seconds. mmcv's ~6 min source build is cached by pip's wheel cache.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q)

have() {  # have MODULE VERSION: is MODULE importable with exactly VERSION?
  "$PY" - "$1" "$2" <<'PYEOF' 2>/dev/null
import importlib, sys
mod = importlib.import_module(sys.argv[1])
sys.exit(0 if mod.__version__.split('+')[0] == sys.argv[2] else 1)
PYEOF
}

step() { printf '[setup] %s\n' "$*"; }

# torch first, pinned, so nothing later can pull a multi-GB CUDA build.
have torch 2.13.0 || { step "torch 2.13.0"; "${PIP[@]}" torch==2.13.0; }
have mmengine 0.10.7 || { step "mmengine 0.10.7"; "${PIP[@]}" mmengine==0.10.7 torch==2.13.0; }

if ! "$PY" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '2.1.0'" 2>/dev/null; then
  step "mmcv 2.1.0 with CPU ops (source build, ~6 min the first time; cached afterwards)"
  "${PIP[@]}" "setuptools<81" wheel ninja
  MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} \
    "${PIP[@]}" --no-build-isolation mmcv==2.1.0 torch==2.13.0
fi

have mmseg 1.2.2 || { step "mmsegmentation 1.2.2"; "${PIP[@]}" mmsegmentation==1.2.2 ftfy regex torch==2.13.0 mmcv==2.1.0; }
have mmdet 3.3.0 || { step "mmdetection 3.3.0"; "${PIP[@]}" mmdet==3.3.0 torch==2.13.0 mmcv==2.1.0; }
# scikit-learn: what shipped mmdet models import at build time beyond mmdet's own requirements (PAA)
have sklearn 1.7.2 || { step "scikit-learn 1.7.2"; "${PIP[@]}" scikit-learn==1.7.2; }
# mmpretrain imports torchvision's Python transforms. PyPI's torchvision wheels are CUDA builds: their
# C ops cannot load beside the CPU torch, and from 0.17 on that makes `import torchvision` fail.
# 0.16.2 skips ops it cannot load, so its pure-Python part runs on torch 2.13 (installed without its
# torch==2.1.2 pin; torchvision.extension._has_ops() is False, and nothing here uses those ops).
have torchvision 0.16.2 || { step "torchvision 0.16.2 (Python part only)"; "${PIP[@]}" --no-deps torchvision==0.16.2; "${PIP[@]}" requests pillow; }
have mmpretrain 1.2.0 || { step "mmpretrain 1.2.0"; "${PIP[@]}" mmpretrain==1.2.0 torch==2.13.0 mmcv==2.1.0; }
# mmpose 1.3.2 and mmaction2 1.2.0 go in without their pip dependencies, which are installed here
# instead: mmpose's unpinned torchvision makes pip swap 0.16.2 above for 0.28.0 (pip --dry-run),
# and mmaction2's opencv-contrib-python resolves to 4.11 (NumPy 2 builds) and writes a second cv2
# over opencv-python's (its contrib modules are unused here).
POSE_VIDEO_PINS=(torch==2.13.0 mmcv==2.1.0 "numpy<2" "opencv-python<4.11")
have mmpose 1.3.2 || { step "mmpose 1.3.2"; "${PIP[@]}" --no-deps mmpose==1.3.2; \
  "${PIP[@]}" chumpy xtcocotools json-tricks munkres matplotlib scipy "${POSE_VIDEO_PINS[@]}"; }
# RTMPose's pipelines (the DWPose distillers') blur and drop out through albumentations; 1.3.1 and
# its qudida name opencv-python-headless, another cv2 over opencv-python's: installed without it.
have albumentations 1.3.1 || { step "albumentations 1.3.1"; \
  "${PIP[@]}" --no-deps albumentations==1.3.1 qudida==0.0.4; \
  "${PIP[@]}" scikit-image PyYAML "${POSE_VIDEO_PINS[@]}"; }
have mmaction 1.2.0 || { step "mmaction2 1.2.0"; "${PIP[@]}" --no-deps mmaction2==1.2.0; \
  "${PIP[@]}" decord einops "${POSE_VIDEO_PINS[@]}"; }
# mmaction2 1.2.0's wheel and sdist lack mmaction/models/localizers/drn (open-mmlab/mmaction2#2714,
# open), which localizers/__init__.py imports: `import mmaction.models` fails, and every mmaction2
# model with it. That one import (DRN: the localizer of three localization configs) is dropped.
if ! "$PY" -c "import mmaction.models" 2>/dev/null; then
  step "mmaction2 1.2.0: drop the import of its unshipped DRN (mmaction2#2714)"
  "$PY" - <<'PYEOF'
import pathlib, mmaction
init = pathlib.Path(mmaction.__file__).parent / 'models' / 'localizers' / '__init__.py'
text = init.read_text()
init.write_text(text.replace('from .drn.drn import DRN\n', '').replace(", 'DRN']", ']'))
PYEOF
fi
# mmcv 2.1.0 predates NumPy 2: its adjust_hue (ColorJitter, in mmpretrain's self-supervised
# pipelines) computes np.uint8(negative shift), which NumPy 2 refuses (OverflowError). NumPy 1.26 is
# what mmcv 2.1.0 was built for; opencv-python 4.11 and later need NumPy 2.
"$PY" -c "import numpy, sys; sys.exit(int(numpy.__version__.split('.')[0]) >= 2)" || \
  { step "numpy<2 (mmcv 2.1.0's)"; "${PIP[@]}" "numpy<2" "opencv-python<4.11"; }

step "mmddp_hooks (editable, test extras)"
"${PIP[@]}" --no-build-isolation -e ".[test,mmseg,mmdet,mmpretrain]" torch==2.13.0 mmcv==2.1.0

"$PY" -c "import mmcv.ops, mmseg, mmdet, mmpretrain, mmpose, mmaction.models, mmddp_hooks; print('[setup] ok: torch', __import__('torch').__version__, 'numpy', __import__('numpy').__version__, \
'mmengine', __import__('mmengine').__version__, 'mmcv', mmcv.__version__, 'mmseg', mmseg.__version__, \
'mmdet', mmdet.__version__, 'mmpretrain', mmpretrain.__version__, 'mmpose', mmpose.__version__, \
'mmaction2', mmaction.__version__, 'mmddp_hooks', mmddp_hooks.__version__)"
