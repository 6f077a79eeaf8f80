# llm_scratch: `make book` renders the book, `make test` runs every check. Both set themselves up.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU wheel of torch; override for a GPU build, e.g. `make TORCH='torch==2.13.0' book`
TORCH  ?= torch==2.13.0
# Offline data: a mirror folder of the canonical files; ../shared/data is used when it is there.
ifeq ($(origin LLM_SCRATCH_DATA), undefined)
  ifneq ($(wildcard ../shared/data/README.md),)
    export LLM_SCRATCH_DATA := $(abspath ../shared/data)
  endif
endif
# glibc's allocator re-maps big tensors every step on this VM (2-3x slower); see ../shared/TOOLCHAIN.md
export MALLOC_MMAP_MAX_ ?= 0
export MALLOC_TRIM_THRESHOLD_ ?= 100000000000
export PYTHONHASHSEED ?= 0
# One cache for every notebook, the book build and the tests: the book model is trained once per machine. (Chapters
# that write throw-away token files set their own cache only where this is unset.)
export LLM_SCRATCH_CACHE ?= $(HOME)/.cache/llm_scratch

JB_ARGS := --config _book/_config.yml --toc _book/_toc.yml
TEX_DEBS := texlive-latex-recommended texlive-fonts-recommended texlive-latex-extra texlive-xetex \
            fonts-freefont-otf fonts-wqy-microhei fonts-symbola latexmk poppler-utils
VENDOR := _book/_static/vendor

BROWSER_DEBS := chromium
.PHONY: help setup export book html pdf test check-export check-clean nbtest pytest book-check book-tests tex browser vendor clean

help:
	@echo "make book   render the HTML site and the PDF book into _book/_build"
	@echo "make test   run every check: export in sync, clean notebooks, notebooks, pytest, book -W, browser + PDF"
	@echo "make export write llm_scratch/ from the notebooks (after you edit one)"
	@echo "make bench  time our GPT against llms-from-scratch and Hugging Face, and a reader's first model (BENCH_ARGS=--quick: 3 min)"

## --- set-up -----------------------------------------------------------------------------------
# the stamp changes whenever the declared requirements change
STAMP := $(VENV)/.installed-$(shell cat settings.ini setup.py | cksum | cut -d' ' -f1)
$(STAMP): settings.ini setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	@rm -f $(VENV)/.installed-*; touch $@
setup: $(STAMP)

$(VENDOR)/.stamp: _book/package.json
	cd _book && npm install --no-audit --no-fund --loglevel=error
	rm -rf $(VENDOR) && mkdir -p $(VENDOR)/mathjax $(VENDOR)/html-manager
	cp -r _book/node_modules/mathjax/es5/. $(VENDOR)/mathjax/
	cp _book/node_modules/requirejs/require.js $(VENDOR)/require.js
	cp -r _book/node_modules/@jupyter-widgets/html-manager/dist/. $(VENDOR)/html-manager/
	find $(VENDOR) -name '*.map' -delete
	touch $@
vendor: $(VENDOR)/.stamp

tex:
	@if command -v xelatex >/dev/null && command -v latexmk >/dev/null && command -v pdftoppm >/dev/null \
	    && kpsewhich fncychap.sty >/dev/null && fc-list | grep -qi freeserif \
	    && fc-list | grep -qi 'wenquanyi micro hei' && fc-list | grep -qi symbola; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing the TeX packages for the PDF (a few minutes, once)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(TEX_DEBS) >/dev/null; \
	else \
	  echo "The PDF needs XeLaTeX. Install these Debian/Ubuntu packages, then run make book again:"; \
	  echo "  sudo apt-get install $(TEX_DEBS)"; exit 1; \
	fi

browser:
	@if command -v chromium >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Chromium for the browser tests (once)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(BROWSER_DEBS) >/dev/null; \
	else \
	  echo "The browser tests need Chromium:  sudo apt-get install $(BROWSER_DEBS)"; exit 1; \
	fi

## --- the package and the book -------------------------------------------------------------------
export: $(STAMP)
	$(BIN)/nbdev_export

# The book's kernels must not inherit MPLBACKEND=Agg: with it plt.show() draws nothing into the page.
html: export vendor
	env -u MPLBACKEND $(BIN)/jupyter-book build . $(JB_ARGS) --path-output _book --builder html
	@echo "HTML book: $(CURDIR)/_book/_build/html/index.html"

pdf: export vendor tex
	env -u MPLBACKEND $(BIN)/jupyter-book build . $(JB_ARGS) --path-output _book --builder pdflatex
	@echo "PDF book:  $(CURDIR)/_book/_build/latex/book.pdf"

book: html pdf
	@echo "Done. Open _book/_build/html/index.html, or the PDF at _book/_build/latex/book.pdf"

## --- the checks -------------------------------------------------------------------------------
# 1. the package is what the notebooks export (nothing changes when we export again)
check-export: $(STAMP)
	@before=$$(find llm_scratch -name '*.py' -not -path '*/__pycache__/*' | sort | xargs cat | cksum); \
	$(BIN)/nbdev_export; \
	after=$$(find llm_scratch -name '*.py' -not -path '*/__pycache__/*' | sort | xargs cat | cksum); \
	if [ "$$before" != "$$after" ] || [ -n "$$(git status --porcelain llm_scratch/ 2>/dev/null)" ]; then \
	  git status --short llm_scratch/; \
	  echo "FAIL: llm_scratch/ does not match the notebooks. Run 'make export' and commit llm_scratch/."; exit 1; fi
	@echo "ok: llm_scratch/ matches the notebooks"

# 2. the notebooks are stored clean (nbdev_clean would change nothing)
check-clean: $(STAMP)
	@tmp=$$(mktemp -d); cp nbs/*.ipynb $$tmp/; \
	$(BIN)/nbdev_clean --fname $$tmp >/dev/null; \
	if ! diff -rq nbs $$tmp --exclude='*.md' --exclude='*.py' >/dev/null; then \
	  diff -rq nbs $$tmp | grep -v 'Only in' || true; rm -rf $$tmp; \
	  echo "FAIL: notebooks are not clean. Run '$(BIN)/nbdev_clean' and commit nbs/."; exit 1; fi; \
	rm -rf $$tmp; echo "ok: notebooks are clean"

# Every notebook top to bottom with nbdev_test, without the book (one at a time: torch already uses every core).
# `make test` does not call it: the book build of step 4 runs every notebook afresh and fails on any cell that raises.
nbtest: export
	$(BIN)/nbdev_test --n_workers 1 --timing

# 3. the tests that notebooks cannot do well
pytest: export
	$(BIN)/python -m pytest tests -q -rs -m "not book" --durations=25

# 4. every notebook runs top to bottom, once: a clean HTML build with its execution cache cleared, so each notebook is
#    executed afresh; a cell that raises fails it (allow_errors: false, Sphinx warnings as errors), and its traceback is
#    printed from the build's reports. The notebooks' own asserts are tested here, and the pages rendered from them.
book-check: export vendor
	rm -rf _book/_build/.jupyter_cache _book/_build/html/reports
	env -u MPLBACKEND $(BIN)/jupyter-book build . $(JB_ARGS) --path-output _book --builder html --all -W -n --keep-going \
	  || { tail -n 80 _book/_build/html/reports/*.err.log 2>/dev/null; exit 1; }

# 5. the book as a reader sees it: every page in headless Chromium, and the PDF
book-tests: book-check pdf browser
	$(BIN)/python -m pytest tests -q -rs -m book

test: check-export check-clean pytest book-check book-tests
	@echo "make test: all checks passed"

## --- benchmarks (not part of `make test`: minutes of CPU, figures for bench/README.md) -------------
# The book's reference model comes from llms-from-scratch, whose declared dependencies pull in
# TensorFlow; its GPT code imports only torch, so it is installed without them.
LLMS_FROM_SCRATCH ?= llms-from-scratch==1.0.19
BENCH_ARGS ?=
.PHONY: bench
bench: $(STAMP)
	@$(BIN)/python -c "import transformers, llms_from_scratch" 2>/dev/null || { \
	  $(BIN)/python -m pip install -q --disable-pip-version-check -e ".[bench]" && \
	  $(BIN)/python -m pip install -q --disable-pip-version-check --no-deps "$(LLMS_FROM_SCRATCH)"; }
	$(BIN)/python bench/run.py $(BENCH_ARGS)
	$(BIN)/python bench/bench_small.py $(if $(findstring --quick,$(BENCH_ARGS)),--steps 200 --no-profile,)
	$(BIN)/python bench/bench_parallel.py $(if $(findstring --quick,$(BENCH_ARGS)),--steps 20 --out /tmp/llm_scratch_parallel.json,)
	$(BIN)/python bench/bench_arch.py $(if $(findstring --quick,$(BENCH_ARGS)),--seconds 20 --out /tmp/llm_scratch_arch.json,)
	$(BIN)/python bench/bench_int8.py $(if $(findstring --quick,$(BENCH_ARGS)),--new 20 --repeats 2 --out /tmp/llm_scratch_int8.json,)

clean:
	rm -rf _book/_build _proc _docs
