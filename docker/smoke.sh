#!/usr/bin/env bash
# `make docker-smoke`: the CPU image built and the compose stack brought up for real, then
# everything removed again.
#
#   1. a Docker engine: the one DOCKER_HOST (or /var/run/docker.sock) names when it answers;
#      else its own `dockerd --bridge=none --iptables=false --ip-masq=false` with data-root,
#      exec-root and socket in a fresh folder under /tmp, stopped by its pid at the end;
#   2. a base image made here when PYTHON_IMAGE is not given: `debootstrap --variant=minbase`
#      of Debian bookworm with python3, python3-venv and libgomp1, brought in with `docker
#      import` (no registry); the root file system is cached as a tarball in SMOKE_CACHE;
#   3. the CPU image: torch from the local wheel (TORCH_WHEEL_DIR, default: pip's find-links)
#      through TORCH_FIND_LINKS=/wheels when one is there, else from the PyTorch CPU index; the
#      extra CA bundle (SMOKE_CA_BUNDLE, default: PIP_CERT, SSL_CERT_FILE or the host's trust
#      store /etc/ssl/certs/ca-certificates.crt) as a build secret;
#   4. the stack: docker-compose.yml + docker-compose.cpu.yml + docker-compose.host.yml (host
#      network, every server on 127.0.0.1 on free ports), a generated RAY_AUTH_TOKEN, tiny
#      synthetic training on 2 shards;
#   5. asserts: the trainer exited 0 after its Ray job succeeded and wrote the artifacts; the
#      API is ready and answers /v1/recommend with k items for a trained user;
#   6. `compose down -v --rmi all`, the base image removed, the build cache pruned; an engine
#      we started is stopped and its folder deleted.
#
# Exit status: 0 passed, 1 failed, 0 with "docker-smoke: SKIPPED: <why>" where no engine can
# be had (SMOKE_REQUIRE=1 makes that exit 3). Phases are timed on stdout; logs in SMOKE_LOGS.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PY:-$REPO/.venv/bin/python}
T0=$(date +%s)
WORK=$(mktemp -d /tmp/shardrec-smoke.XXXXXX)
LOGS=${SMOKE_LOGS:-$WORK/logs}
CACHE=${SMOKE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/shardrec}
IMAGE=${SMOKE_IMAGE:-shardrec:smoke-$$}
PROJECT=shardrec-smoke-$$
RUN_NAME=smoke
BASE_TAG=shardrec-base:bookworm-$$
mkdir -p "$LOGS"

DOCKERD_PID=
LINKED_WHEEL=
STACK_UP=
BASE_IMPORTED=
IMAGE_BUILT=

say() { echo "== docker-smoke [$(($(date +%s) - T0))s] $*"; }
fail() { echo "docker-smoke: FAILED: $*" >&2; exit 1; }
skip() {
    echo "docker-smoke: SKIPPED: $*"
    exit "$([ "${SMOKE_REQUIRE:-0}" = 1 ] && echo 3 || echo 0)"
}
compose() { "$COMPOSE" -p "$PROJECT" "${FILES[@]}" "$@"; }

cleanup() {
    local code=$?
    set +e
    if [ -n "$STACK_UP" ]; then
        say "tear down: compose down -v --rmi all"
        compose logs --no-color >"$LOGS/compose.log" 2>&1
        compose --profile multi-node down -v --rmi all --remove-orphans >"$LOGS/down.log" 2>&1 \
            || echo "compose down failed, see $LOGS/down.log" >&2
    fi
    if [ -n "$IMAGE_BUILT" ]; then docker image rm -f "$IMAGE" >/dev/null 2>&1; fi
    if [ -n "$BASE_IMPORTED" ]; then docker image rm -f "$BASE_TAG" >/dev/null 2>&1; fi
    if [ -n "$DOCKER" ]; then  # an engine of our own goes whole; on another, only the dangling
        docker builder prune -f >/dev/null 2>&1
        docker image prune -f >/dev/null 2>&1
    fi
    [ -n "$LINKED_WHEEL" ] && rm -f "$LINKED_WHEEL"
    if [ -n "$DOCKERD_PID" ]; then
        say "stopping dockerd (pid $DOCKERD_PID)"
        kill -TERM "$DOCKERD_PID" 2>/dev/null
        for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$DOCKERD_PID" 2>/dev/null; then
            echo "dockerd did not stop in 30 s: SIGKILL" >&2
            kill -KILL "$DOCKERD_PID" 2>/dev/null
        fi
        wait "$DOCKERD_PID" 2>/dev/null
        # its containerd (a child it started), if it outlived it
        local cpid
        cpid=$(cat "$WORK/exec/containerd/containerd.pid" 2>/dev/null || true)
        if [ -n "$cpid" ] && kill -0 "$cpid" 2>/dev/null; then kill -TERM "$cpid"; fi
    fi
    # anything still mounted in our folder (the engine's overlays, a debootstrap's /proc)
    awk -v w="$WORK/" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r | xargs -r -n1 umount -l
    if [ -z "${SMOKE_LOGS:-}" ]; then cp -r "$LOGS" "/tmp/shardrec-smoke-logs-$$" 2>/dev/null; fi
    rm -rf "$WORK"
    say "done (exit $code); logs in ${SMOKE_LOGS:-/tmp/shardrec-smoke-logs-$$}"
    exit "$code"
}
DOCKER=
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 1. the engine -----------------------------------------------------------------------------
[ "$(uname -sm)" = "Linux x86_64" ] || skip "needs Linux x86_64 (this is $(uname -sm))"
command -v docker >/dev/null || skip "no docker client on PATH"
if docker info >/dev/null 2>&1; then
    say "engine: the running one ($(docker info --format '{{.ServerVersion}}' 2>/dev/null))"
else
    command -v dockerd >/dev/null || skip "no Docker engine answers and dockerd is not installed (apt-get install docker.io)"
    [ "$(id -u)" = 0 ] || skip "no Docker engine answers, and starting dockerd needs root"
    say "engine: starting dockerd --bridge=none --iptables=false --ip-masq=false in $WORK"
    dockerd --bridge=none --iptables=false --ip-masq=false \
        --data-root "$WORK/data" --exec-root "$WORK/exec" --pidfile "$WORK/dockerd.pid" \
        --host "unix://$WORK/docker.sock" >"$LOGS/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    export DOCKER_HOST="unix://$WORK/docker.sock"
    for _ in $(seq 120); do
        docker info >/dev/null 2>&1 && break
        kill -0 "$DOCKERD_PID" 2>/dev/null || break
        sleep 0.5
    done
    if ! docker info >/dev/null 2>&1; then
        tail -n 20 "$LOGS/dockerd.log" >&2
        skip "dockerd did not start (log above: $LOGS/dockerd.log)"
    fi
fi
DOCKER=1

# BuildKit: `docker buildx`, or the classic client with DOCKER_BUILDKIT=1 (Debian's 20.10).
if docker buildx version >/dev/null 2>&1; then
    BUILD=(docker buildx build --load)
elif [ -x /usr/bin/docker ] && DOCKER_BUILDKIT=1 /usr/bin/docker build --help 2>/dev/null | grep -q -- "--secret"; then
    BUILD=(env DOCKER_BUILDKIT=1 /usr/bin/docker build)
else
    fail "no BuildKit client: neither \`docker buildx\` nor a classic docker client with --secret"
fi

COMPOSE=$("$PY" -c 'from tests.deployment.compose import find_binary; p, why = find_binary(); print(p or ""); import sys; sys.stderr.write(why)')
[ -n "$COMPOSE" ] || fail "no Docker Compose v2 binary (make install)"
FILES=(-f docker/docker-compose.yml -f docker/docker-compose.cpu.yml -f docker/docker-compose.host.yml)

# --- 2. the base image -------------------------------------------------------------------------
if [ -n "${PYTHON_IMAGE:-}" ]; then
    BASE=$PYTHON_IMAGE
    say "base image: $BASE (PYTHON_IMAGE)"
else
    BASE=$BASE_TAG
    tarball=$CACHE/base-bookworm-minbase.tar
    if [ ! -s "$tarball" ]; then
        command -v debootstrap >/dev/null || fail "debootstrap is not installed (apt-get install debootstrap), or give PYTHON_IMAGE"
        say "base image: debootstrap --variant=minbase bookworm"
        rootfs=$WORK/rootfs
        debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates,libgomp1 \
            bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$LOGS/debootstrap.log" 2>&1 \
            || { tail -n 20 "$LOGS/debootstrap.log" >&2; fail "debootstrap failed"; }
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        mkdir -p "$CACHE"
        tar -C "$rootfs" --numeric-owner -cf "$tarball.part" . && mv "$tarball.part" "$tarball"
        rm -rf "$rootfs"
    else
        say "base image: the cached root file system $tarball"
    fi
    docker import --change 'ENV LANG=C.UTF-8' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' --change 'CMD ["/bin/bash"]' "$tarball" "$BASE" >/dev/null
    BASE_IMPORTED=1
fi

# --- 3. the image ------------------------------------------------------------------------------
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
args=(--network host -f docker/Dockerfile -t "$IMAGE" --build-arg "PYTHON_IMAGE=$BASE" --build-arg TORCH_VARIANT=cpu
    --build-arg "TORCH_VERSION=$TORCH_VERSION")
wheel_dir=${TORCH_WHEEL_DIR:-${PIP_FIND_LINKS:-$("$PY" -m pip config get global.find-links 2>/dev/null || true)}}
wheel=
for dir in $wheel_dir; do
    wheel=$(ls "$dir"/torch-"$TORCH_VERSION"*-cp311-*linux*x86_64.whl 2>/dev/null | head -n1 || true)
    [ -n "$wheel" ] && break
done
if [ -n "$wheel" ]; then
    LINKED_WHEEL=docker/wheels/$(basename "$wheel")
    if [ -e "$LINKED_WHEEL" ]; then LINKED_WHEEL=; else ln "$wheel" docker/wheels/ 2>/dev/null || cp "$wheel" docker/wheels/; fi
    args+=(--build-arg TORCH_FIND_LINKS=/wheels)
    say "torch: the local wheel $(basename "$wheel")"
else
    say "torch: no local torch==$TORCH_VERSION wheel in '${wheel_dir}': from the PyTorch CPU index"
fi
ca=${SMOKE_CA_BUNDLE:-${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}}
if [ -n "$ca" ] && [ -s "$ca" ]; then
    args+=(--secret "id=ca_bundle,src=$ca")
    say "extra CA bundle: $ca"
fi
say "building $IMAGE"
IMAGE_BUILT=1
"${BUILD[@]}" "${args[@]}" . >"$LOGS/build.log" 2>&1 || { tail -n 30 "$LOGS/build.log" >&2; fail "the image build failed ($LOGS/build.log)"; }
size=$(docker image inspect "$IMAGE" --format '{{.Size}}')
say "built $IMAGE: $((size / 1000000)) MB"
docker run --rm --network host "$IMAGE" sh -c "pip list --format=freeze | grep -ci '^nvidia-' || true" | grep -qx 0 \
    || fail "CUDA packages in the CPU image"

# --- 4. the stack ------------------------------------------------------------------------------
read -r RAY_PORT DASH_PORT API_PORT P1 P2 P3 P4 P5 < <("$PY" -c 'from tests.procs import free_ports; print(*free_ports(8))')
export SHARDREC_IMAGE=$IMAGE SHARDREC_RUN_NAME=$RUN_NAME
export SHARDREC_RAY_PORT=$RAY_PORT SHARDREC_DASHBOARD_PORT=$DASH_PORT SHARDREC_API_PORT=$API_PORT
export SHARDREC_HEAD_RAY_ARGS="--ray-client-server-port=$P1 --dashboard-agent-listen-port=$P2 --dashboard-agent-grpc-port=$P3 --runtime-env-agent-port=$P4 --metrics-export-port=$P5"
export SHARDREC_HEAD_CPUS=2 SHARDREC_NUM_SHARDS=2 SHARDREC_NUM_WORKERS=1 SHARDREC_SHM_SIZE=1gb
SHARDREC_TRAIN_ARGS=$("$PY" -c 'from tests.tiny import TINY_RUN; print(" ".join([*TINY_RUN, "eval_ks=[10]", "monitor=HR@10"]))')
export SHARDREC_TRAIN_ARGS
RAY_AUTH_TOKEN=$("$PY" -c 'import secrets; print(secrets.token_hex(32))')
export RAY_AUTH_TOKEN
say "compose up (project $PROJECT; Ray $RAY_PORT/$DASH_PORT, API $API_PORT on 127.0.0.1)"
STACK_UP=1
compose up -d --no-build --pull never >"$LOGS/up.log" 2>&1 || {
    tail -n 20 "$LOGS/up.log" >&2
    compose logs --no-color trainer 2>&1 | tail -n 40 >&2
    fail "compose up failed ($LOGS/up.log)"
}
say "stack up"

# --- 5. asserts --------------------------------------------------------------------------------
trainer=$(compose ps -aq trainer)
[ "$(docker inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$trainer")" = "exited 0" ] \
    || fail "trainer: $(docker inspect -f '{{.State.Status}} exit {{.State.ExitCode}}' "$trainer")"
compose logs --no-color trainer >"$LOGS/trainer.log" 2>&1
grep -q "succeeded; artifacts in /runs/$RUN_NAME/artifacts" "$LOGS/trainer.log" \
    || fail "the trainer's log does not say the job succeeded ($LOGS/trainer.log)"
grep -q "2 shards" "$LOGS/trainer.log" || fail "not trained on 2 shards ($LOGS/trainer.log)"
say "trainer: the Ray job succeeded (exit 0, artifacts written)"
user=$(compose exec -T api python -c "import csv; print(next(csv.DictReader(open('/runs/$RUN_NAME/artifacts/users.csv')))['original_id'])")
"$PY" - "$API_PORT" "$user" <<'EOF' || fail "the API did not serve a recommendation"
import sys, time
from service.launch import request_json

port, user = sys.argv[1], sys.argv[2]
url = f"http://127.0.0.1:{port}"
deadline = time.monotonic() + 180
while True:
    try:
        status, body = request_json(f"{url}/readyz", timeout=5)
    except OSError as e:
        status, body = 0, str(e)
    if status == 200:
        break
    if time.monotonic() > deadline:
        sys.exit(f"/readyz: {status} {body}")
    time.sleep(1)
status, rec = request_json(f"{url}/v1/recommend", "POST", {"user_id": user, "k": 10})
assert status == 200, (status, rec)
assert rec["source"] == "model" and len(rec["items"]) == 10, rec
print(f"== recommendation for user {user}: {[i['item_id'] for i in rec['items']]}")
EOF
say "api: ready, /v1/recommend answered 10 items from the model"
echo "docker-smoke: PASSED in $(($(date +%s) - T0)) s"
