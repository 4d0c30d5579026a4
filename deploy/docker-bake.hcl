# The image build definition: both targets of deploy/Dockerfile, reproducibly (docs/deploy.md).
#   docker buildx bake -f deploy/docker-bake.hcl                  # gpu and cpu, loaded locally
#   REGISTRY=ghcr.io/acme/ docker buildx bake -f deploy/docker-bake.hcl --push
#   PYTHON_IMAGE=pso-ci/debian:bookworm docker buildx bake -f deploy/docker-bake.hcl cpu   # a local base
# Every input is pinned: the bases by digest (the Dockerfile's defaults, overridable here), torch by
# version, every other package by constraints.txt; SOURCE_DATE_EPOCH (the commit's time) fixes the
# timestamps BuildKit writes. Run from the repository root (the context).

variable "VERSION" {
  # the project's version (pyproject.toml); a test checks they agree
  default = "0.1.0"
}

variable "REGISTRY" {
  # a prefix such as ghcr.io/acme/ (with the slash); empty: local names
  default = ""
}

variable "REVISION" {
  # the commit (CI passes github.sha); also tagged, so a deployment can name the exact build
  default = ""
}

variable "CREATED" {
  # RFC 3339 time of the commit, for the org.opencontainers.image.created label
  default = "1970-01-01T00:00:00Z"
}

variable "PYTHON_IMAGE" {
  # empty: the Dockerfile's digest-pinned default
  default = ""
}

variable "CUDA_IMAGE" {
  default = ""
}

group "default" {
  targets = ["gpu", "cpu"]
}

target "_common" {
  context    = "."
  dockerfile = "deploy/Dockerfile"
  args = {
    VERSION  = VERSION
    REVISION = REVISION != "" ? REVISION : "unknown"
    CREATED  = CREATED
  }
}

target "gpu" {
  inherits = ["_common"]
  target   = "gpu"
  args = notequal(CUDA_IMAGE, "") ? { VARIANT = "gpu", CUDA_IMAGE = CUDA_IMAGE } : { VARIANT = "gpu" }
  tags = compact([
    "${REGISTRY}pso-service:${VERSION}-gpu",
    REVISION != "" ? "${REGISTRY}pso-service:${VERSION}-${substr(REVISION, 0, 12)}-gpu" : "",
  ])
  platforms = ["linux/amd64"]
}

target "cpu" {
  inherits = ["_common"]
  target   = "cpu"
  args = notequal(PYTHON_IMAGE, "") ? { VARIANT = "cpu", PYTHON_IMAGE = PYTHON_IMAGE } : { VARIANT = "cpu" }
  tags = compact([
    "${REGISTRY}pso-service:${VERSION}-cpu",
    REVISION != "" ? "${REGISTRY}pso-service:${VERSION}-${substr(REVISION, 0, 12)}-cpu" : "",
  ])
  platforms = ["linux/amd64"]
}
