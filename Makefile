# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision builds that install from local disk on this machine (pyproject keeps open ranges for users).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
INSTALLED := $(VENV)/.installed
DEMO_MODEL := out/efficientnet_lite0.pt2
DEMO_OUT := out/demo
# A folder of photos (its hidden .readme/ holds the README's pictures; folder runs skip hidden entries).
SAMPLES := sample_images

.PHONY: demo test install clean bench lint

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check $(TORCH_PINS)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test,demo]'
	touch $@

$(DEMO_MODEL): $(INSTALLED) hookviz/demo.py
	$(BIN)/python -m hookviz.demo $@

demo: $(DEMO_MODEL)
	$(BIN)/hookviz fmaps $(DEMO_MODEL) $(SAMPLES) -o $(DEMO_OUT) -q --overwrite \
		-l _conv_stem -l _blocks.3._expand_conv -l _blocks.8._expand_conv -l _conv_head > /dev/null
	$(BIN)/hookviz gradcam $(DEMO_MODEL) $(SAMPLES) --labels imagenet --top-k 2 -o $(DEMO_OUT) -q --overwrite --html > /dev/null
	$(BIN)/hookviz evaluate $(DEMO_MODEL) $(SAMPLES) --labels imagenet -m gradcam -m gradcam++ -m layercam -m eigencam \
		-m random --steps 10 -o $(DEMO_OUT) -q --overwrite --html > /dev/null
	$(BIN)/hookviz filters $(DEMO_MODEL) $(SAMPLES) -l _blocks.3 --steps 32 -o $(DEMO_OUT) -q --overwrite > /dev/null
	$(BIN)/hookviz audit $(DEMO_MODEL) $(SAMPLES)/labels.csv --labels imagenet -o $(DEMO_OUT)/audit -q --overwrite --html > /dev/null
	@echo "demo: feature-map grids in $(DEMO_OUT)/<image>/fmap_<layer>.png"
	@echo "demo: Grad-CAM overlays (top-2 classes) in $(DEMO_OUT)/<image>/gradcam__swish_c<class>.png"
	@echo "demo: which map to trust (5 methods ranked by faithfulness): $(DEMO_OUT)/evaluate.png"
	@echo "demo: what 16 channels of _blocks.3 respond to: $(DEMO_OUT)/filters__blocks.3.png"
	@echo "demo: an audit of the labelled sample photos: $(DEMO_OUT)/audit/ (audit.json, confusion.png, index.html)"
	@echo "demo: all of it in a gallery: $(DEMO_OUT)/index.html"

# The HTML gallery's browser test (tests/test_gallery.py) renders pages in Debian's chromium: install it when
# missing (as root, or with passwordless sudo). Without apt the test is skipped, after a warning here.
.PHONY: browser
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo -n); \
		echo "installing chromium (apt-get) for the gallery's browser test" >&2; \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	} || echo "warning: could not install chromium with apt-get; the gallery's browser test will be skipped" >&2

# Lint, format and types first: a style or type error fails CI like a failing test.
lint: $(INSTALLED)
	$(BIN)/ruff check hookviz tests benchmarks
	$(BIN)/ruff format --check hookviz tests benchmarks
	$(BIN)/mypy

test: $(INSTALLED) browser lint
	$(BIN)/python -m pytest -q

# Side-by-side benchmark against pytorch-grad-cam, torchcam and Captum: writes benchmarks/RESULTS.md.
# The reference libraries are installed next to the pinned torch (never replacing it); BENCH_ARGS=--quick for a smoke run.
bench: $(INSTALLED)
	$(BIN)/python -c "import pytorch_grad_cam, captum, torchcam" 2>/dev/null || \
		$(BIN)/python -m pip install -q --disable-pip-version-check grad-cam captum torchcam==0.5.0 $(TORCH_PINS)
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf out .pytest_cache
