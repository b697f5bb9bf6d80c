# Helm chart targets (included from the Makefile).
#   make helm-template [VALUES=k8s/values/multi-node.yaml] [RELEASE=name] [NAMESPACE=ns]
#   make helm-lint [VALUES=...]
#   make helm-install RELEASE=my-run VALUES=my-values.yaml [NAMESPACE=ml]
#   make k8s-examples        regenerate k8s/rendered/ after changing the chart or k8s/values/
#   make chart-readme        regenerate the values table of charts/dmdr/README.md
# The helm CLI is used where it is installed; otherwise ci/render_chart.py drives Helm's own
# Go engine through the helm-python-sdk wheel in the virtualenv.

HELM ?= $(shell command -v helm 2>/dev/null)
HELM_PYTHON ?= .venv/bin/python
CHART_DIR ?= charts/dmdr
RELEASE ?= dmdr
NAMESPACE ?= default
VALUES ?=

helm_values_flags = $(foreach f,$(VALUES),-f $(f))

.PHONY: helm-template helm-lint helm-install k8s-examples chart-readme

helm-template: ## render the chart (VALUES=..., RELEASE=..., NAMESPACE=...)
ifneq ($(HELM),)
	$(HELM) template $(RELEASE) $(CHART_DIR) --namespace $(NAMESPACE) $(helm_values_flags)
else
	$(HELM_PYTHON) ci/render_chart.py template --release $(RELEASE) --namespace $(NAMESPACE) $(helm_values_flags)
endif

helm-lint: ## helm lint --strict the chart with VALUES and every charts/dmdr/ci/*.yaml
ifneq ($(HELM),)
	$(HELM) lint --strict $(CHART_DIR) $(helm_values_flags)
	@for f in $(CHART_DIR)/ci/*.yaml; do echo "== $$f"; $(HELM) lint --strict $(CHART_DIR) -f $$f || exit 1; done
else
	$(HELM_PYTHON) ci/render_chart.py lint $(helm_values_flags)
	@for f in $(CHART_DIR)/ci/*.yaml; do echo "== $$f"; $(HELM_PYTHON) ci/render_chart.py lint -f $$f || exit 1; done
endif

helm-install: ## helm install RELEASE with VALUES (needs the helm CLI and a cluster)
	@test -n "$(VALUES)" || { echo "helm-install: set VALUES=your-values.yaml (see k8s/values/)"; exit 2; }
ifneq ($(HELM),)
	$(HELM) install $(RELEASE) $(CHART_DIR) --namespace $(NAMESPACE) $(helm_values_flags)
else
	$(HELM_PYTHON) ci/render_chart.py install --release $(RELEASE) --namespace $(NAMESPACE) $(helm_values_flags)
endif

k8s-examples: ## regenerate k8s/rendered/ from k8s/values/
	$(HELM_PYTHON) ci/render_chart.py examples

chart-readme: ## regenerate the values table of charts/dmdr/README.md from values.yaml
	$(HELM_PYTHON) ci/chart_readme.py
