# Two commands set everything up on a fresh machine:
#   make demo   installs, then quantizes the embedded stories260K model (INT4, RTN) and prints the report
#   make test   installs, then runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; an unpinned torch pulls a multi-GB CUDA build. Override on GPU machines:
#   make install TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test bench bench-peers clean

$(BIN)/quantcli: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(BIN)/quantcli

demo: install
	$(BIN)/quantcli quantize stories260K --bits 4 --method rtn --group-size 32 --output out/stories260K-rtn-w4 --force

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not gpu" $(PYTEST_ARGS)

# llm-compressor's GPTQ, the reference in benchmarks/methods.py, pins older transformers and
# compressed-tensors than quantcli: it goes without dependencies into a side folder.
REFERENCE := llmcompressor==0.14.0.1 loguru requests urllib3 idna certifi charset-normalizer nvidia-ml-py
.reference/llmcompressor: | install
	$(BIN)/pip install -q --no-deps --target .reference $(REFERENCE)

# Each benchmark writes its table to benchmarks/results/ (JSON + Markdown); run on a quiet machine.
bench: install .reference/llmcompressor
	PYTHONPATH=.reference $(BIN)/python benchmarks/methods.py
	$(BIN)/python benchmarks/speed.py
	$(BIN)/python benchmarks/scale.py

# The peers (optimum-quanto, torchao, hqq) go to a side folder so quantcli's own venv stays clean.
bench-peers: install
	$(BIN)/pip install -q --no-deps --target .peers torchao optimum-quanto hqq termcolor einops
	PYTHONPATH=.peers $(BIN)/python benchmarks/peers.py

clean:
	rm -rf out .peers .reference .pytest_cache
