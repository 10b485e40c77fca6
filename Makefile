# Two commands for newcomers: `make run` and `make test`.  Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROMPT ?= Once upon a time
PLANTUML_SERVER ?= http://localhost:8085

.PHONY: run test lint docs diagrams diagram-links bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

## run: install haifctl into .venv and stream a completion from the shipped model
run: $(VENV)/.installed
	$(BIN)/haifctl infer "$(PROMPT)"

## test: lint, type-check and run the whole test suite
test: lint
	$(BIN)/pytest

lint: $(VENV)/.installed
	$(BIN)/ruff format --check haifctl tests scripts bench
	$(BIN)/ruff check haifctl tests scripts bench
	$(BIN)/mypy

## docs: regenerate shell completions and man pages from the CLI
docs: $(VENV)/.installed
	$(BIN)/python scripts/gendocs.py

## diagrams: render docs/architecture/*.puml to PNG (needs plantuml)
diagrams:
	plantuml -tpng docs/architecture/*.puml

## diagram-links: a link to each diagram on the PlantUML server (compose's plantuml, port 8085)
diagram-links:
	@for f in docs/architecture/*.puml; do \
		echo "$$f $(PLANTUML_SERVER)/svg/$$(plantuml -encodeurl $$f)"; \
	done

## bench: print the figures (tokens/s, first token, registry latency, cluster overhead)
bench: $(VENV)/.installed
	$(BIN)/python bench/foundation.py
	$(BIN)/python bench/cluster.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
