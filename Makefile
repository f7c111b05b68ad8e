# Two entry points: `make demo` (the main job) and `make test`. Each creates .venv on first use.
PY := .venv/bin/python
STAMP := .venv/.installed

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,data]"
	touch $(STAMP)

.PHONY: demo test docs typecheck lint bench
demo: $(STAMP)
	.venv/bin/sdpo demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest
	.venv/bin/ruff check .
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet

# The documentation site (mkdocs.yml, docs/) -> site/; --strict: a broken link or missing page fails.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict

# mypy on src/sdpo ([tool.mypy] in pyproject.toml); joins `make test` once the code is clean.
typecheck: $(STAMP)
	.venv/bin/mypy

bench: $(STAMP)
	.venv/bin/sdpo bench methods
