# Two entry points: `make demo` (the main job) and `make test`. Each creates .venv on first use.
PY := .venv/bin/python
STAMP := .venv/.installed

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,data,deepspeed]"
	touch $(STAMP)

.PHONY: demo test docs typecheck lint bench browser
demo: $(STAMP)
	.venv/bin/sdpo demo

# The browser tests (tests/test_human_*.py) drive Debian's headless Chromium with Selenium: installed here
# when missing and when root (as in CI); otherwise those tests are skipped, with the reason printed.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else echo "make: chromium and chromium-driver are missing and this is not root with apt-get:" \
		"the browser tests will be skipped (install them: apt-get install chromium chromium-driver)"; fi

# Two lanes side by side, as the main pytest process mostly keeps one core busy. The second runs the
# DeepSpeed / FSDP2 tests (marker `engines`: one launch of two CPU processes) and those marked `beside`
# (bench, browser, GRPO, sharding), then ruff, mypy and the strict docs build; its report follows.
test: $(STAMP) browser
	@beside=$$(mktemp -d); \
	( HF_HUB_OFFLINE=1 $(PY) -m pytest -m "engines or beside" -q -p no:cacheprovider --basetemp=$$beside/tmp; s=$$?; \
	  .venv/bin/ruff check . || s=1; .venv/bin/mypy || s=1; \
	  NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet || s=1; exit $$s ) > $$beside/log 2>&1 & pid=$$!; \
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not engines and not beside"; main=$$?; \
	wait $$pid; status=$$?; echo "--- pytest -m 'engines or beside', ruff, mypy, mkdocs"; cat $$beside/log; rm -rf $$beside; \
	exit $$(( main || status ))

# The documentation site (mkdocs.yml, docs/) -> site/; --strict: a broken link or missing page fails.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict

# mypy on src/sdpo alone ([tool.mypy] in pyproject.toml); `make test` runs it too.
typecheck: $(STAMP)
	.venv/bin/mypy

bench: $(STAMP)
	.venv/bin/sdpo bench methods
