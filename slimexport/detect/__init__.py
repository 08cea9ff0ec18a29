"""Ultralytics YOLO detectors through the whole workflow (the optional ``yolo`` extra, AGPL-3.0, imported only
here): an offline detection data set (:mod:`.data`), sparse training and fine-tuning inside Ultralytics' own
trainer (:mod:`.train`), export with Ultralytics' metadata and mAP in onnxruntime (:mod:`.evaluate`), and the run
(:mod:`.pipeline`). Nothing here imports Ultralytics at import time, so ``import slimexport`` never loads it."""

import os

# Ultralytics pip-installs packages it misses when it meets certain files (pi-heif for an image Pillow cannot
# identify, onnxslim on export): slimexport never changes the user's environment behind their back. Set
# YOLO_AUTOINSTALL=true to allow it. (Read when Ultralytics is first imported, which only this package does.)
os.environ.setdefault("YOLO_AUTOINSTALL", "false")
