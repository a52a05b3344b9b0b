# The commands a newcomer runs: `make serve` (set up, export if needed, serve) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL_STORE ?= model_store
export MODEL_STORE

.PHONY: setup export serve docs docs-build test test-fast test-gpu test-tools load-tools lint lock proto dashboard manifests bench bench-quick bench-gpu profile peers lock-peers clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements/constraints.txt -e '.[export,dev]'
	touch $(STAMP)

# The first-run set: LeNet-5 (trained here), ResNet-18/50, GoogLeNet and AlexNet where their weights can be had
# (offline they are skipped, each with its reason). `python -m export all` exports every network.
export: setup
	$(BIN)/python -m export default --out $(MODEL_STORE)

# Exports only when the store holds no model (exit 3 below); any other failure of the check stops here,
# rather than passing for an empty store and re-exporting at every start.
serve: setup
	@$(BIN)/python -c 'import sys; from service.store.layout import ModelStore; \
		sys.exit(0 if ModelStore(sys.argv[1]).names() else 3)' "$(MODEL_STORE)"; \
		case $$? in 0) ;; 3) $(MAKE) export ;; *) echo "make serve: cannot read the model store $(MODEL_STORE)" >&2; exit 1 ;; esac
	$(BIN)/python -m service

# The documentation site (mkdocs.yml, docs/): served on :8000 with live reload, or built into site/ with --strict
# (broken links and missing pages fail; tests/test_docs.py builds it too). Reference pages are generated from the code.
DOCS_ENV := NO_MKDOCS_2_WARNING=1
docs: setup
	$(DOCS_ENV) $(BIN)/mkdocs serve

docs-build: setup
	$(DOCS_ENV) $(BIN)/mkdocs build --strict

lint: setup
	$(BIN)/ruff check export service client tests monitoring benchmarks deploy docs/hooks
	$(BIN)/ruff format --check export service client tests monitoring benchmarks deploy docs/hooks
	$(BIN)/mypy
	$(BIN)/lint-imports

# Debian's prometheus (with promtool) and docker-compose (for `config` validation), used by the monitoring tests;
# chromium, which Playwright drives in the page's browser test (Playwright's own browser download cannot work offline);
# The peers' virtual environment (MLServer, LitServe) for the benchmark's peer test.
# gcc, which builds the shared library with a missing dependency that the CUDA diagnosis test needs;
# kubectl (Kustomize), haproxy and node/npm for the deploy tests: the CRD schemas (npm, pinned in
# deploy/kubernetes/validate/package-lock.json) and the KServe SDK wheel whose types check the InferenceServices.
KSERVE_WHEEL := .tools/kserve-0.21.0-py3-none-any.whl

test-tools: $(KSERVE_WHEEL) deploy/kubernetes/validate/node_modules/.installed peers load-tools
	@command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v docker-compose >/dev/null \
		&& command -v chromium >/dev/null && command -v kubectl >/dev/null && command -v haproxy >/dev/null \
		&& command -v gcc >/dev/null || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			prometheus docker-compose chromium kubectl haproxy gcc libc6-dev; }

# wrk, the benchmark's and the profile's HTTP load generator (Debian package).
load-tools:
	@command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends wrk; }

deploy/kubernetes/validate/node_modules/.installed: deploy/kubernetes/validate/package-lock.json
	@command -v npm >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends nodejs npm; }
	cd deploy/kubernetes/validate && npm ci --silent --no-audit --no-fund
	touch $@

$(KSERVE_WHEEL): $(STAMP)
	$(BIN)/pip download --quiet --no-deps --dest .tools kserve==0.21.0

# the 20 slowest tests close the log: the suite is meant to stay under about 25 minutes on two cores
test: lint test-tools
	$(BIN)/pytest --durations=20

test-fast: setup test-tools
	$(BIN)/pytest -m 'not slow'

# On a machine with an NVIDIA GPU: CUDA against the CPU per family, the FP16 variant, the served service on CUDA.
# Only tests/gpu is collected: the other folders import tools (Triton's client, Playwright) a GPU machine may lack.
test-gpu: setup
	$(BIN)/pytest -m gpu tests/gpu

# The Open Inference Protocol's Python modules (checked in; a test checks they match the .proto).
proto: setup
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
		service/frontends/v2/protocol/grpc_predict_v2.proto

# The service against raw ONNX Runtime, its own transport, its peers and a PyTorch baseline: benchmarks/results/latest.*
# The serving benchmark; then the whole store on demand (cold starts, two budgets, always loaded) and what an
# epoch of fine-tuning costs (benchmarks/results/on_demand.json, finetune.json).
bench: setup peers load-tools
	$(BIN)/python -m benchmarks
	$(BIN)/python -m benchmarks.on_demand
	$(BIN)/python -m benchmarks.finetune
	$(BIN)/python -m benchmarks.cache
	$(BIN)/python -m benchmarks.canary

bench-quick: setup peers load-tools
	$(BIN)/python -m benchmarks --quick

# On a machine with an NVIDIA GPU (one command under 10 minutes, no wrk or apt needed): in-process ceilings, a
# PyTorch FP16 anchor, the served service over HTTP and gRPC, the issue's targets: benchmarks/results/gpu/.
# --providers cpu is its dry run on any machine (about a minute on 2 cores; the tests run it).
bench-gpu: setup
	$(BIN)/python -m benchmarks.gpu

# Flame graphs of one worker under /noop and LeNet-5 /classify (py-spy), by layer:
# benchmarks/results/profile-$(LABEL)-*.svg and profile.md (LABEL=before / after compares two states of the code).
LABEL ?= latest
profile: setup load-tools
	$(BIN)/python -m benchmarks.profile --label $(LABEL)

# MLServer and LitServe for the benchmark, in a virtual environment of their own.
PEERS_VENV := benchmarks/.peers-venv
peers: $(PEERS_VENV)/.installed
$(PEERS_VENV)/.installed: benchmarks/peers/requirements.txt benchmarks/peers/constraints.txt
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install -q -c benchmarks/peers/constraints.txt -r benchmarks/peers/requirements.txt
	touch $@

# Re-pin every package of the peers' venv (after changing benchmarks/peers/requirements.txt).
lock-peers: peers
	{ echo "# Every package of benchmarks/.peers-venv, pinned (make lock-peers rewrites it)."; \
		$(PEERS_VENV)/bin/pip freeze; } > benchmarks/peers/constraints.txt

# The Grafana dashboard JSON, from monitoring/dashboard.py.
dashboard: setup
	$(BIN)/python monitoring/dashboard.py

# The PrometheusRule in deploy/kubernetes, from monitoring/alerts.yml.
manifests: setup
	$(BIN)/python deploy/kubernetes/prometheusrule.py

# Regenerate the pins of every transitive dependency from the current environment.
lock:
	$(BIN)/pip freeze --exclude-editable | grep -v -e '^cnn-serving' -e '^uv==' | sed 's/^torch==2.13.0+cpu$$/torch==2.13.0/' > requirements/constraints.txt

clean:
	rm -rf $(VENV) $(PEERS_VENV) site .pytest_cache .mypy_cache .ruff_cache .tools deploy/kubernetes/validate/node_modules
