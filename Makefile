# minir1 — set-up and common jobs. Everything installs into .venv; torch is pinned via constraints.txt.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.test-deps
# apt-get install as root, or through sudo.
apt_install = { if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $(1); }

.PHONY: install test-deps test test-all lint bench speedrun clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	@# The engine's native decode step is compiled on first use with g++ (without it, the PyTorch path runs).
	command -v g++ >/dev/null || $(call apt_install,g++)
	touch $(STAMP)

# Only the tests need a browser (the web chat's test drives Debian's Chromium; nothing is downloaded by a
# test tool), so `make speedrun` never installs one.
test-deps: $(TEST_STAMP)

$(TEST_STAMP): $(STAMP)
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || $(call apt_install,chromium chromium-driver)
	touch $(TEST_STAMP)

speedrun: install
	$(BIN)/minir1 speedrun --out runs/speedrun

test: install test-deps
	$(BIN)/python -m pytest -q

test-all: install test-deps
	$(BIN)/python -m pytest -q -m ''

lint: install
	$(BIN)/ruff check minir1 tests benchmarks

bench: install
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[bench]'
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/train_small.py
	test -d runs/mtp-demo || $(BIN)/minir1 pretrain --preset tiny --task arithmetic:digits=1,mul_digits=0 \
		--steps 450 --lr 3e-3 --batch-size 8 --seq-len 128 --vocab-size 384 --out runs/mtp-demo
	$(BIN)/python benchmarks/generate.py --mtp-ckpt runs/mtp-demo --mtp-task arithmetic:digits=1,mul_digits=0
	$(BIN)/python benchmarks/grpo_vs_trl.py

clean:
	rm -rf $(VENV) build *.egg-info
