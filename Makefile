# Two entry points: `make demo` (the main job) and `make test`. Each creates .venv on first use.
PY := .venv/bin/python
STAMP := .venv/.installed

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,data]"
	touch $(STAMP)

.PHONY: demo test lint bench
demo: $(STAMP)
	.venv/bin/sdpo demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest
	.venv/bin/ruff check .

bench: $(STAMP)
	.venv/bin/sdpo bench methods
