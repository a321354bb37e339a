# The two commands of the README. Both install first (idempotent, cached outside the checkout).
VENV ?= $(or $(RECSYS_DIST_VENV),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/recsys-dist/venv)
PY := $(VENV)/bin/python
export RECSYS_DIST_VENV := $(VENV)
export PYTHONPATH := $(CURDIR)

.PHONY: install demo test test-fast clean help image-cpu image-gpu k8s-configs

help:
	@echo "make demo   - install, then train DiffuRec + SASRec on ML-1M (2 CPU ranks) and print the table"
	@echo "make test   - install, then run the test suite"
	@echo "make install - create/refresh the venv at $(VENV) (no-op when up to date)"

install:
	@bash launcher/install.sh

demo: install
	$(PY) -m launcher demo

test: install
	$(PY) -m pytest -q --durations=15 tests

clean:
	rm -rf runs shards_out .pytest_cache

# Container images of the k8s manifests (k8s/components/cpu, gpu): docker/*.Dockerfile.
image-cpu:
	docker build -f docker/cpu.Dockerfile -t recsys-dist:cpu .

image-gpu:
	docker build -f docker/gpu.Dockerfile -t recsys-dist:gpu .

# The configs ConfigMap's copy of configs/ in k8s/common/configs/ (plain `kubectl apply -k`).
k8s-configs:
	python3 k8s/sync_configs.py
