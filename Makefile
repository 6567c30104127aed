# Two commands for users: `make run` (the demo) and `make test` (the suite).
# Both install what they need; a second run only checks stamps.
SYSTEM_PYTHON ?= /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEB_STAMP := $(VENV)/.debian

OHIF_STAMP := build/ohif/installed.json
CURRENT_STAMP := build/orthanc-current/.orthanc-ai-stamp.json

.PHONY: run test test-current current-orthanc setup ohif screenshots lint train train-ct priors-evidence bench clean

setup: $(DEB_STAMP) $(STAMP) $(OHIF_STAMP)

$(DEB_STAMP): scripts/install-debian.sh
	./scripts/install-debian.sh
	@mkdir -p $(VENV) && touch $@

# The venv must use Debian's python3.11: orthanc-python embeds that
# interpreter and loads our packages from this site-packages folder.
$(STAMP): requirements.lock pyproject.toml setup.py $(DEB_STAMP)
	test -x $(PY) || $(SYSTEM_PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

# The OHIF viewer the plugin serves at /ohif/: the pinned npm tarball, checked
# against its published sha512, rewritten for the sub-path (engine/ohif.py).
ohif: $(OHIF_STAMP)

$(OHIF_STAMP): engine/ohif.py orthanc/ohif-app-config.js $(STAMP)
	$(PY) -m engine.ohif

# Orthanc 1.13 (Debian forky) in build/orthanc-current, for `serve --orthanc
# current` and the second run of the integration suite (engine/current_orthanc.py).
current-orthanc: $(CURRENT_STAMP)

$(CURRENT_STAMP): engine/current_orthanc.py requirements.lock $(STAMP)
	$(PY) -m engine.current_orthanc build

run: setup
	$(VENV)/bin/orthanc-ai demo --data data/demo --http-port 8042 --dicom-port 4242 $(ARGS)

# The whole suite on Debian 12's Orthanc 1.10.1, then the integration suite
# again on Orthanc 1.13.0 (forky); the PACS peers stay Debian 12's. The demo and the
# wheel (which serves without a checkout, so without the forky root) run once.
test: setup $(CURRENT_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)
	$(MAKE) test-current

test-current: setup $(CURRENT_STAMP)
	ORTHANC_AI_ORTHANC=current $(VENV)/bin/python -m pytest -m integration tests/integration \
		--deselect tests/integration/test_demo.py --deselect tests/integration/test_wheel.py \
		$(PYTEST_ARGS)

# The browser tests, leaving their screenshots in docs/ (the README shows them).
screenshots: setup
	ORTHANC_AI_SCREENSHOTS=docs/screenshots $(PY) -m pytest tests/browser -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

train: setup
	$(PY) -m training.train_limb_fracture --out models/limb-fracture-xr

train-ct: setup
	$(PY) -m training.train_head_ct --out models/head-ct-haemorrhage

# False new-finding alerts with and without prior comparison, into the cards
# (the training targets run it too, for the weights they write).
priors-evidence: setup
	$(PY) -m training.priors --model models/limb-fracture-xr
	$(PY) -m training.priors --model models/head-ct-haemorrhage

# Benchmarks print tables and write bench/out/*.json and report.png.
bench: setup
	$(PY) -m bench.run_all $(ARGS)
	$(PY) -m bench.series_memory
	$(PY) -m bench.priors

clean:
	rm -rf data build .pytest_cache
