# Image targets (included from the Makefile; also usable as `make -f ci/make/image.mk ...`).
#   make build-and-push IMAGE=registry.example.com/team/dmdr [TAG=v1] [WEIGHTS=rewards,taesdxl]
#   make -n build-and-push ...      prints exactly the commands that would run
# Variables:
#   IMAGE            repository to tag and push (default dmdr)
#   TAG              image tag (default: git describe --tags --always --dirty)
#   BASE_IMAGE       CUDA PyTorch base image (default: the Dockerfile's ARG)
#   WEIGHTS          weight groups to bake in: comma-separated, "all" or "none" (default rewards)
#   WEIGHTS_MANIFEST manifest inside the build context (default dmdr/assets/weights.yaml)
#   PLATFORM         target platform, e.g. linux/amd64 (default: the builder's)
#   HF_TOKEN_FILE    file with a Hugging Face token, passed as the BuildKit secret hf_token
#   CA_BUNDLE_FILE   CA bundle (TLS-inspecting proxy), passed as the BuildKit secret ca_bundle
#   AWS_CREDENTIALS_FILE  AWS shared-credentials file for s3:// weight sources (secret aws)
#   EXTRAS           optional dependency groups of pyproject.toml, e.g. tensorboard
#   DOCKER, DOCKER_BUILD_FLAGS (extra `docker build` flags), CONTEXT, DOCKERFILE
# BuildKit: `docker buildx build --load` where the buildx plugin exists, else
# `DOCKER_BUILDKIT=1 docker build`.

DOCKER ?= docker
IMAGE ?= dmdr
TAG ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
IMAGE_VERSION ?= $(TAG)
IMAGE_REVISION ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
IMAGE_SOURCE ?= https://github.com/dmdr/dmdr
BASE_IMAGE ?=
WEIGHTS ?= rewards
WEIGHTS_MANIFEST ?= dmdr/assets/weights.yaml
PLATFORM ?=
HF_TOKEN_FILE ?=
CA_BUNDLE_FILE ?=
AWS_CREDENTIALS_FILE ?=
EXTRAS ?=
CONTEXT ?= .
DOCKERFILE ?= docker/Dockerfile
DOCKER_BUILD_FLAGS ?=
HADOLINT ?= .venv/bin/hadolint
IMAGE_BUILDX ?= $(shell $(DOCKER) buildx version >/dev/null 2>&1 && echo yes)

image_comma := ,
image_ref = $(IMAGE):$(TAG)
image_build_args = $(strip --file $(DOCKERFILE) --tag $(image_ref) \
	$(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) \
	--build-arg WEIGHTS=$(WEIGHTS) --build-arg WEIGHTS_MANIFEST=$(WEIGHTS_MANIFEST) \
	$(if $(EXTRAS),--build-arg EXTRAS=$(EXTRAS)) \
	--build-arg VERSION=$(IMAGE_VERSION) --build-arg REVISION=$(IMAGE_REVISION) \
	--build-arg SOURCE=$(IMAGE_SOURCE) \
	$(if $(PLATFORM),--platform $(PLATFORM)) \
	$(if $(HF_TOKEN_FILE),--secret id=hf_token$(image_comma)src=$(HF_TOKEN_FILE)) \
	$(if $(CA_BUNDLE_FILE),--secret id=ca_bundle$(image_comma)src=$(CA_BUNDLE_FILE)) \
	$(if $(AWS_CREDENTIALS_FILE),--secret id=aws$(image_comma)src=$(AWS_CREDENTIALS_FILE)) \
	$(DOCKER_BUILD_FLAGS) $(CONTEXT))

.PHONY: build push build-and-push hadolint

build: ## build the trainer image IMAGE:TAG with BuildKit (WEIGHTS=..., BASE_IMAGE=..., HF_TOKEN_FILE=...)
ifeq ($(IMAGE_BUILDX),yes)
	$(DOCKER) buildx build --load $(image_build_args)
else
	DOCKER_BUILDKIT=1 $(DOCKER) build $(image_build_args)
endif

push: ## push IMAGE:TAG and print its digest (log in to the registry first)
	$(DOCKER) push $(image_ref)
	$(DOCKER) image inspect --format '{{range .RepoDigests}}{{println .}}{{end}}' $(image_ref) \
		| grep -F '$(IMAGE)@' | sed 's/^/pushed: /'

build-and-push: build push ## build, then push and print the digest

hadolint: ## lint docker/Dockerfile
	$(HADOLINT) $(DOCKERFILE)
