#!/usr/bin/env bash
# The image, proven end to end (issue 5), on a fresh machine, as root:
#   1. a Docker engine (installed and started when none runs), a local registry, a moto S3 server
#   2. a CPU-capable PyTorch base image built with debootstrap (nothing can be pulled here)
#   3. the REAL docker/Dockerfile built and pushed by `make build-and-push`, with a weights
#      manifest pointing at tiny reward models served over HTTP on loopback (sha256 pinned)
#   4. a rebuild after a code-only change reuses the dependency and weights layers
#   5. no secret (HF token, CA bundle) in `docker history` or an image export
#   6. the pushed image pulled back (every layer the Dockerfile made) and run as the chart runs
#      it: non-root, weights verified, `dmdr train --preset tiny` with the bundled tiny rewards
#      writing checkpoints to S3
# Everything it built or started is removed at the end, also on failure.
#
# Env: PY (python with the project installed; default .venv/bin/python), DMDR_E2E_WORK (work
# folder), DMDR_E2E_KEEP_BASE=1 (keep the base image, for quicker reruns while developing).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$repo/.venv/bin/python}
DOCKER=/usr/bin/docker                 # Debian's client: BuildKit without the buildx plugin
KEEP_BASE=${DMDR_E2E_KEEP_BASE:-0}
WORK=${DMDR_E2E_WORK:-$(mktemp -d /tmp/dmdr-image-e2e.XXXXXX)}
BASE_TAG=dmdr-e2e-base:torch2.14.1
CHECKS="$PY $repo/ci/image/checks.py"
export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$WORK"

started_dockerd="" pids=() images=() t_start=$SECONDS
log() { printf '[image-e2e %4ds] %s\n' "$((SECONDS - t_start))" "$*"; }
phase() { log "== $1 (previous phase $((SECONDS - ${t_phase:-$SECONDS}))s)"; t_phase=$SECONDS; }
fail() { log "FAILED: $*"; exit 1; }

cleanup() {
    local rc=$?
    set +e
    log "cleanup (exit $rc)"
    if [ -n "${images[*]}" ]; then "$DOCKER" rmi -f "${images[@]}" >/dev/null 2>&1; fi
    if [ "$KEEP_BASE" != 1 ]; then "$DOCKER" rmi -f "$BASE_TAG" >/dev/null 2>&1; fi
    if "$DOCKER" info >/dev/null 2>&1; then
        "$DOCKER" builder prune -af >/dev/null 2>&1
        "$DOCKER" image prune -f >/dev/null 2>&1
    fi
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null; done
    if [ -n "$started_dockerd" ]; then
        kill "$started_dockerd" 2>/dev/null
        for _ in $(seq 30); do kill -0 "$started_dockerd" 2>/dev/null || break; sleep 1; done
    fi
    if [ $rc -ne 0 ]; then
        for f in "$WORK"/*.log; do [ -f "$f" ] && { echo "--- tail $f"; tail -25 "$f"; }; done
    fi
    rm -rf --one-file-system "$WORK"
    log "done: $([ $rc -eq 0 ] && echo PASSED || echo FAILED) in $((SECONDS - t_start))s; disk: $(df -h --output=avail / | tail -1) free"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_for() {  # wait_for SECONDS WHAT COMMAND...
    local limit=$1 what=$2; shift 2
    for _ in $(seq "$limit"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
    fail "$what did not come up in ${limit}s"
}
http_ok() { "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$1"; }

# ------------------------------------------------------------------------------ 1. services
phase "engine, registry, S3"
[ "$(id -u)" = 0 ] || fail "needs root (apt-get, dockerd)"
log "disk: $(df -h --output=avail / | tail -1) free"
missing=()
[ -x /usr/bin/docker ] && command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v docker-registry >/dev/null || missing+=(docker-registry)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq >"$WORK/apt.log" 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >>"$WORK/apt.log" 2>&1
fi
if ! "$DOCKER" info >/dev/null 2>&1; then
    log "starting dockerd"
    dockerd --storage-driver overlay2 --iptables=false --bridge=none >"$WORK/dockerd.log" 2>&1 &
    started_dockerd=$!
    wait_for 60 dockerd "$DOCKER" info
fi

reg_port=$($CHECKS free-port)
registry=127.0.0.1:$reg_port
cat >"$WORK/registry.yml" <<EOF
version: 0.1
log: {level: warn}
storage: {filesystem: {rootdirectory: $WORK/registry}, delete: {enabled: true}}
http: {addr: $registry}
EOF
docker-registry serve "$WORK/registry.yml" >"$WORK/registry.log" 2>&1 &
pids+=($!)
wait_for 30 "registry" http_ok "http://$registry/v2/"

s3_port=$($CHECKS free-port)
s3_endpoint=http://127.0.0.1:$s3_port
"$(dirname "$PY")/moto_server" -H 127.0.0.1 -p "$s3_port" >"$WORK/moto.log" 2>&1 &
pids+=($!)
wait_for 30 "moto S3" http_ok "$s3_endpoint/"
$CHECKS make-bucket "$s3_endpoint" e2e-bucket

# tiny reward models over HTTP on loopback
web_port=$($CHECKS free-port)
mkdir -p "$WORK/served" "$WORK/secrets"
"$PY" -m http.server -b 127.0.0.1 -d "$WORK/served" "$web_port" >"$WORK/http.log" 2>&1 &
pids+=($!)
wait_for 30 "weights server" http_ok "http://127.0.0.1:$web_port/"

# ------------------------------------------------------------------------------ 2. base image
phase "base image"
if [ "$KEEP_BASE" = 1 ] && "$DOCKER" image inspect "$BASE_TAG" >/dev/null 2>&1; then
    log "reusing $BASE_TAG"
else
    DOCKER=$DOCKER UV="$(dirname "$PY")/uv" bash "$repo/ci/image/base.sh" "$BASE_TAG" "$WORK/base"
fi

# ------------------------------------------------------------------------------ 3. build and push
phase "build and push"
# The build context: a copy of the working tree (tracked and untracked, not ignored files).
ctx=$WORK/ctx
mkdir -p "$ctx"
git -C "$repo" ls-files -z --cached --others --exclude-standard \
    | tar -C "$repo" --null -T - --ignore-failed-read -c 2>/dev/null | tar -C "$ctx" -x
$CHECKS tiny-weights "$WORK/served" "http://127.0.0.1:$web_port" "$ctx/docker/weights.ci.yaml" >/dev/null
fake_token="hf_dmdrE2EfakeToken$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
ca_marker="dmdr-e2e-ca-marker-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
printf '%s\n' "$fake_token" >"$WORK/secrets/hf_token"
{ cat /etc/ssl/certs/ca-certificates.crt; printf '# %s\n' "$ca_marker"; } >"$WORK/secrets/ca.crt"
image=$registry/dmdr
images+=("$image:ci" "$image:ci-rebuild")
make_args=(-C "$ctx" -f ci/make/image.mk DOCKER="$DOCKER" IMAGE="$image" BASE_IMAGE="$BASE_TAG"
           WEIGHTS=rewards WEIGHTS_MANIFEST=docker/weights.ci.yaml
           HF_TOKEN_FILE="$WORK/secrets/hf_token" CA_BUNDLE_FILE="$WORK/secrets/ca.crt"
           IMAGE_REVISION="$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)"
           DOCKER_BUILD_FLAGS="--network host --progress plain")
make -n "${make_args[@]}" TAG=ci build-and-push | sed 's/^/  make -n: /'
t0=$SECONDS
stamp() { while IFS= read -r line; do printf '%(%s)T %s\n' -1 "$line"; done; }
make "${make_args[@]}" TAG=ci build-and-push 2>&1 | stamp >"$WORK/build1.log" || fail "make build-and-push"
push_at=$(awk -v d="$DOCKER" '$2 == d && $3 == "push" {print $1; exit}' "$WORK/build1.log")
build1=$((push_at - $(head -1 "$WORK/build1.log" | cut -d' ' -f1)))
digest=$(sed -n "s|^[0-9]* pushed: $image@||p" "$WORK/build1.log" | tail -1)
[ -n "$digest" ] || fail "no digest printed by make push"
log "built $image:ci in ${build1}s, pushed in $((SECONDS - t0 - build1))s, digest $digest"
$CHECKS registry-digest "$registry" dmdr ci "$digest"

# ------------------------------------------------------------------------------ 4. code-only rebuild
phase "rebuild after a code-only change"
printf '\n# e2e: a code-only change\n' >>"$ctx/dmdr/train.py"
t0=$SECONDS
make "${make_args[@]}" TAG=ci-rebuild build >"$WORK/build2.log" 2>&1 || fail "rebuild"
build2=$((SECONDS - t0))
$CHECKS cached "$WORK/build2.log" deps weights
layers() { "$DOCKER" image inspect -f '{{range .RootFS.Layers}}{{println .}}{{end}}' "$1" | sed '/^$/d'; }
layers "$image:ci" >"$WORK/layers1.txt"
layers "$image:ci-rebuild" >"$WORK/layers2.txt"
n=$(wc -l <"$WORK/layers1.txt")
same=$(paste -d' ' "$WORK/layers1.txt" "$WORK/layers2.txt" | awk '$1==$2' | wc -l)
log "layers: $same of $n identical (all but the package layer must be)"
[ "$same" -eq $((n - 1)) ] && ! cmp -s "$WORK/layers1.txt" "$WORK/layers2.txt" \
    || fail "expected exactly the last layer to change"
log "build times: first build ${build1}s, code-only rebuild ${build2}s"

# ------------------------------------------------------------------------------ 5. secrets
phase "secrets"
grep -qF "$ca_marker" "$WORK/secrets/ca.crt" && grep -qF "$fake_token" "$WORK/secrets/hf_token"  # the greps can match
for ref in "$image:ci" "$image:ci-rebuild"; do
    "$DOCKER" history --no-trunc "$ref" >"$WORK/history.txt"
    if grep -qF -e "$fake_token" -e "$ca_marker" "$WORK/history.txt"; then fail "a secret is in docker history of $ref"; fi
done
for ref in "$image:ci"; do
    found=$("$DOCKER" save "$ref" | grep -acF -e "$fake_token" -e "$ca_marker" || true)
    [ "$found" = 0 ] || fail "a secret is in the export of $ref"
done
log "no HF token or CA bundle in docker history or docker save"
# ------------------------------------------------------------------------------ 6. pull and run
phase "pull and run"
# Nothing the build made stays local (images, build cache): the pull must fetch every layer the
# Dockerfile added; only the base image stays (the registry check above covers its blob too).
"$DOCKER" rmi -f "$image:ci" "$image:ci-rebuild" >/dev/null
"$DOCKER" builder prune -af >/dev/null
t0=$SECONDS
"$DOCKER" pull "$image@$digest" >"$WORK/pull.log" 2>&1 || fail "docker pull"
"$DOCKER" tag "$image@$digest" "$image:ci"
log "pulled $image@$digest in $((SECONDS - t0))s ($(grep -c 'Pull complete' "$WORK/pull.log" || true) layers downloaded)"
run=("$DOCKER" run --rm --network host)
uid=$("${run[@]}" "$image:ci" id -u)
[ "$uid" != 0 ] || fail "the image runs as root"
log "id -u: $uid; labels: $("$DOCKER" image inspect -f '{{json .Config.Labels}}' "$image:ci")"
weights_cli=(python -m dmdr.weights)
if "${run[@]}" "$image:ci" dmdr weights --help >/dev/null 2>&1; then weights_cli=(dmdr weights); fi
"${run[@]}" -v "$ctx/docker/weights.ci.yaml:/tmp/manifest.yaml:ro" "$image:ci" \
    "${weights_cli[@]}" verify --manifest /tmp/manifest.yaml | sed 's/^/  /'
"${run[@]}" "$image:ci" "${weights_cli[@]}" verify >/dev/null  # against the record of the build

# As the chart runs it: read-only root, writable home, /tmp and outputs.
train=(torchrun --nproc-per-node 1 -m dmdr train --preset tiny --max-train-steps 2
       --cold-start-iter 1 --checkpoint-steps 2 --sample-steps 2
       --output-dir /workspace/outputs --exp-name e2e
       --clip-reward-model Apple_CLIP-H-14-224.bin --clip-reward-arch /opt/dmdr/weights/tiny-open-clip.json
       --hpsv2-reward-model HPS_v2.1_compressed.pt --hps-reward-arch /opt/dmdr/weights/tiny-open-clip.json
       --reward-clip-weight 0.3 --reward-hps-weight 0.3)
# capture first: `| grep -q` closes the pipe at the first match and, with pipefail, the docker
# client's SIGPIPE would fail the check whenever the option is named early in the help
train_help=$("${run[@]}" "$image:ci" dmdr train --help) || fail "dmdr train --help in the image"
grep -q -- --s3-uri <<<"$train_help" || fail "dmdr train has no --s3-uri"
train+=(--s3-uri s3://e2e-bucket/runs)
s3_env=(-e AWS_ENDPOINT_URL="$s3_endpoint" -e AWS_ACCESS_KEY_ID=testing
        -e AWS_SECRET_ACCESS_KEY=testing -e AWS_DEFAULT_REGION=us-east-1)
install -d -o 1000 -g 1000 "$WORK/outputs"
t0=$SECONDS
"${run[@]}" --read-only --tmpfs /tmp:rw,exec,mode=1777 --tmpfs /home/dmdr:rw,exec,uid=1000,gid=1000 \
    -v "$WORK/outputs:/workspace/outputs" -e OMP_NUM_THREADS=1 "${s3_env[@]}" \
    "$image:ci" "${train[@]}" >"$WORK/train.log" 2>&1 || fail "dmdr train in the image"
grep -E "outputs:|step" "$WORK/train.log" | tail -4 | sed 's/^/  /'
log "trained in the container in $((SECONDS - t0))s"
$CHECKS rewards-used "$WORK/outputs/e2e"
$CHECKS s3-latest "$s3_endpoint" e2e-bucket runs

phase "all checks passed"
