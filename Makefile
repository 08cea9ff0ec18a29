# slimexport — common tasks. PYTHON can point at a virtual environment's interpreter.
PYTHON ?= python3
SUITE ?= quick

.PHONY: install test test-fast test-gpu lint benchmark benchmark-converged benchmark-selection benchmark-engine benchmark-reach benchmark-techniques benchmark-keep demo clean

install:  ## install slimexport with its test tools (editable)
	$(PYTHON) -m pip install -e ".[dev,timm,ncnn,yolo]"

test:  ## the whole test suite (what CI runs; 6-12 minutes on two cores)
	$(PYTHON) -m pytest tests

test-fast:  ## the suite without the tests marked slow (pipelines, subprocesses, torchrun, full-size models)
	$(PYTHON) -m pytest tests -m "not slow and not cuda"

test-gpu:  ## only the GPU tests (CUDA training, compile, resume, onnxruntime CUDA bench); skipped without CUDA
	$(PYTHON) -m pytest tests -m cuda -rs

lint:
	$(PYTHON) -m ruff check slimexport tests benchmarks examples
	$(PYTHON) -m ruff format --check slimexport tests benchmarks examples

benchmark:  ## SUITE=quick (CPU, minutes), cpu (~1 h), full (reference architectures on CIFAR-10, for a GPU), smoke
	$(PYTHON) -m benchmarks.run --suite $(SUITE) $(ARGS)

# Issue 15's converged runs on all of CIFAR-10 (~130 min of two CPU cores, estimated; run it in the background).
# DATA: a directory with cifar10.npz (python3 ../shared/tools/fetch_cifar10.py DIR builds it; nothing is downloaded).
DATA ?= $(HOME)/data
benchmark-converged:  ## converged VGG (raw and per-layer |γ|) and mobilenet_v2, peers over three seeds, two streams
	PYTHON=$(PYTHON) bash benchmarks/converged.sh $(DATA)

benchmark-selection:  ## what channel selection costs (Gather share, speed-ups, preresnet164/densenet40)
	$(PYTHON) -m benchmarks.selection_overhead $(ARGS)
	$(PYTHON) -m benchmarks.run --render-only

benchmark-engine:  ## the one engine against the retired hand-written rules; densenet121/efficientnet_b0 selections
	$(PYTHON) -m benchmarks.one_engine --data-dir $(DATA) $(ARGS)
	$(PYTHON) -m benchmarks.fold_accuracy --data-dir $(DATA)
	$(PYTHON) -m benchmarks.run --render-only

benchmark-reach:  ## engine reach (issue 24): torchvision and 56 timm CNNs with the peer; 13 torchvision models' speed
	$(PYTHON) -m benchmarks.graph_coverage $(ARGS)
	$(PYTHON) -m benchmarks.graph_coverage --zoo timm --timeout 120 $(ARGS)
	$(PYTHON) -m benchmarks.torchvision_speed
	$(PYTHON) -m benchmarks.run --render-only

benchmark-techniques:  ## none / distill / steps / polar / auto / all, three seeds (embedded data, ~45 min)
	$(PYTHON) -m benchmarks.techniques $(ARGS)
	$(PYTHON) -m benchmarks.run --render-only

benchmark-keep:  ## issue 26, converged: polar VGG at 70% plain/distill/steps against Torch-Pruning (~3 h, two streams)
	PYTHON=$(PYTHON) bash benchmarks/keep_accuracy.sh $(DATA)
	$(PYTHON) -m benchmarks.run --render-only

demo:  ## the main job on the embedded data
	$(PYTHON) -m slimexport pipeline --out runs/demo --force

clean:
	rm -rf runs .pytest_cache .ruff_cache build dist *.egg-info
