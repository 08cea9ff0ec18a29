"""Ultralytics YOLO detectors through the whole workflow (the optional ``yolo`` extra, AGPL-3.0, imported only
here): an offline detection data set (:mod:`.data`), sparse training and fine-tuning inside Ultralytics' own
trainer (:mod:`.train`), export with Ultralytics' metadata and mAP in onnxruntime (:mod:`.evaluate`), and the run
(:mod:`.pipeline`). This package's ``__init__`` imports nothing, so ``import slimexport`` never loads Ultralytics."""
