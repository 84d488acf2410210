#!/usr/bin/env bash
# Build the local Kubernetes control plane used by the integration tests and the demo
# from Go modules (no Docker, no downloaded release tarballs):
#
#   kube-apiserver, kube-controller-manager, kube-scheduler, etcd   tools/controlplane/k8s
#   kwok (fake kubelets)                                            tools/controlplane/kwok
#   kwokctl (creates the dev cluster from the binaries above)       tools/controlplane/kwokctl
#   training-operator.v1 (Kubeflow PyTorchJob controller)           tools/controlplane/training-operator
#   helm v3                                                         tools/controlplane/helm
#
# Opt-in extras (not built by default; --with-extras, QWEN_CONTROLPLANE_EXTRAS=a,b or --only X):
#   trainer-v2  Kubeflow Trainer v2 controller manager (TrainJob)   tools/controlplane/trainer-v2
#   jobset      JobSet controller                                   tools/controlplane/jobset
#   kueue       Kueue controller manager                            tools/controlplane/kueue
# They go into the same bin dir (the key covers only the default components, so adding an
# extra never invalidates the default build); each carries a stamp of its own go.mod/go.sum,
# and its CRDs are copied from the module zip into crds/<extra>/.
#
# kwokctl is the same kwok release as kwok, in a module of its own (its dependency graph is larger); like
# the extras it carries a stamp of its go.mod/go.sum and stays out of the key.
#
# Each component is its own Go module (go.mod/go.sum pinned in this repository), so the
# dependency graphs never mix. Binaries go into a version-keyed cache outside the repo:
#
#   ${QWEN_K8S_CACHE:-$HOME/.cache/qwen-k8s}/controlplane/<key>/bin/
#
# plus the PyTorchJob CRD and kwok's stock stage files next to it. The script is
# idempotent: a component whose binary already exists under the key is not rebuilt.
#
# Opt-in kind tools (--with-kind, QWEN_CONTROLPLANE_EXTRAS=kind-node or --only X), for tools/qwen_kind:
#   kind-node   kubelet, kubeadm, kube-proxy, kubectl (same k8s.io/kubernetes)   tools/controlplane/kind-node
#   coredns     CoreDNS (the version kubeadm deploys)                            tools/controlplane/coredns
#   kind        the kind CLI                                                     tools/controlplane/kind
#
# Usage: tools/build-controlplane.sh [--print-bin-dir] [--force] [--with-extras] [--with-kind] [--only COMPONENT]...
#   --print-bin-dir  print the bin dir for the pinned versions and exit (builds nothing)
#   --print-key      print the cache key and exit
#   --force          rebuild even if the binaries exist
#   --with-extras    also build trainer-v2, jobset and kueue (env: QWEN_CONTROLPLANE_EXTRAS=trainer-v2,jobset,kueue)
#   --with-kind      also build kind-node, coredns and kind (the local kind node image's parts)
#   --only C         build only component C (k8s, etcd, kwok, kwokctl, training-operator, helm,
#                    trainer-v2, jobset, kueue); repeatable
# On success the last line of stdout is the bin dir, so callers can do
#   BIN=$(tools/build-controlplane.sh | tail -n1)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="$ROOT/tools/controlplane"
CACHE="${QWEN_K8S_CACHE:-$HOME/.cache/qwen-k8s}"

# Bump when the build recipe (flags, copied files) changes in a way that needs a rebuild.
RECIPE=1
EXTRAS_RECIPE=1

print_only=""
force=0
only=()
EXTRAS_ALL=(trainer-v2 jobset kueue)
KIND_TOOLS=(kind-node coredns kind)
extras=()
IFS=', ' read -r -a extras <<<"${QWEN_CONTROLPLANE_EXTRAS:-}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --print-bin-dir) print_only=bin ;;
    --print-key) print_only=key ;;
    --force) force=1 ;;
    --only) only+=("$2"); shift ;;
    --with-extras) extras+=("${EXTRAS_ALL[@]}") ;;
    --with-kind) extras+=("${KIND_TOOLS[@]}") ;;
    -h|--help) sed -n '2,/^set -euo/{/^#/p}' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-controlplane: unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done


# Read a required module's version straight from a committed go.mod (no network, no go command).
modver() { # dir module
  awk -v m="$2" '($1==m && $2 ~ /^v/){print $2; exit} ($1=="require" && $2==m){print $3; exit}' "$SRC/$1/go.mod"
}
K8S_VERSION="$(modver k8s k8s.io/kubernetes)"
ETCD_VERSION="$(modver k8s go.etcd.io/etcd/server/v3)"
KWOK_VERSION="$(modver kwok sigs.k8s.io/kwok)"
KWOKCTL_VERSION="$(modver kwokctl sigs.k8s.io/kwok)"
TFO_VERSION="$(modver training-operator github.com/kubeflow/training-operator)"
HELM_VERSION="$(modver helm helm.sh/helm/v3)"
TRAINER_V2_VERSION="$(modver trainer-v2 github.com/kubeflow/trainer/v2)"
JOBSET_VERSION="$(modver jobset sigs.k8s.io/jobset)"
KUEUE_VERSION="$(modver kueue sigs.k8s.io/kueue)"
COREDNS_VERSION="$(modver coredns github.com/coredns/coredns)"
KIND_VERSION="$(modver kind sigs.k8s.io/kind)"
for v in COREDNS_VERSION KIND_VERSION K8S_VERSION ETCD_VERSION KWOK_VERSION KWOKCTL_VERSION TFO_VERSION HELM_VERSION TRAINER_V2_VERSION JOBSET_VERSION KUEUE_VERSION; do
  [[ -n "${!v}" ]] || { echo "build-controlplane: could not read $v from $SRC/*/go.mod" >&2; exit 1; }
done
[[ "$KWOKCTL_VERSION" == "$KWOK_VERSION" ]] || {
  echo "build-controlplane: kwokctl ($KWOKCTL_VERSION) and kwok ($KWOK_VERSION) must be the same kwok release" >&2; exit 1; }

# A short digest of the pinned module files and this recipe, so that a go.sum change
# (a different dependency) also gets a fresh directory. Only the default components count;
# the extras carry their own stamp (see extra_stamp).
CORE=(helm k8s kwok training-operator)
DIGEST="$( (echo "recipe=$RECIPE"; for c in "${CORE[@]}"; do cat "$SRC/$c/go.mod"; done
            for c in "${CORE[@]}"; do cat "$SRC/$c/go.sum"; done) | sha256sum | cut -c1-8)"
KEY="k8s-${K8S_VERSION}-etcd-${ETCD_VERSION#v}-kwok-${KWOK_VERSION}-tfo-${TFO_VERSION}-helm-${HELM_VERSION}-${DIGEST}"
OUT="$CACHE/controlplane/$KEY"
BIN="$OUT/bin"

if [[ "$print_only" == bin ]]; then echo "$BIN"; exit 0; fi
if [[ "$print_only" == key ]]; then echo "$KEY"; exit 0; fi

need_go() { # component
  command -v go >/dev/null 2>&1 || { echo "build-controlplane: 'go' is not on PATH (Go >= 1.24 is needed to build $1)" >&2; exit 1; }
}

for e in "${extras[@]}" "${only[@]}"; do
  case "$e" in k8s|etcd|kwok|kwokctl|training-operator|helm|trainer-v2|jobset|kueue|kind-node|coredns|kind) ;;
    *) echo "build-controlplane: unknown component: $e" >&2; exit 2 ;; esac
done

mkdir -p "$BIN" "$OUT/crds" "$OUT/kwok-stages" "$OUT/logs" "$OUT/extras"
# One build at a time per key (CI and a test fixture may both ask); a waiting caller then
# finds the binaries in place. Left-over staging dirs from an interrupted build are removed.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$OUT/.lock"
  flock 9
fi
rm -rf "$OUT"/.build.*
# Go's build cache lives only as long as this run: the binaries under $BIN are the cache (by version), and a
# cold build of every component leaves gigabytes of compiled packages that nothing reads again until a pin
# changes, on a disk the kind images also need. Build everything in one run (make test does) so that the
# components share it. A GOCACHE set in the environment is used as it is, and kept.
if [[ -z "${GOCACHE:-}" ]]; then
  export GOCACHE="$OUT/.gocache"
  trap 'rm -rf "$GOCACHE"' EXIT
fi

want() { # component
  [[ ${#only[@]} -eq 0 ]] && return 0
  local c; for c in "${only[@]}"; do [[ "$c" == "$1" ]] && return 0; done
  return 1
}
want_extra() { # extra: only when named by --only, --with-extras or QWEN_CONTROLPLANE_EXTRAS
  local c
  if [[ ${#only[@]} -gt 0 ]]; then
    for c in "${only[@]}"; do [[ "$c" == "$1" ]] && return 0; done
    return 1
  fi
  for c in "${extras[@]}"; do [[ "$c" == "$1" ]] && return 0; done
  return 1
}
extra_stamp() { # extra version
  echo "$2 recipe=$EXTRAS_RECIPE $(cat "$SRC/$1/go.mod" "$SRC/$1/go.sum" | sha256sum | cut -c1-16)"
}
have() { # binary...
  [[ $force -eq 1 ]] && return 1
  local b; for b in "$@"; do [[ -x "$BIN/$b" ]] || return 1; done
  return 0
}
now() { date +%s; }
fail() { # component logfile
  echo "build-controlplane: FAILED to build $1 (log: $2); last lines:" >&2
  tail -n 30 "$2" >&2 || true
  exit 1
}
# Build into a temporary dir and move into place, so an interrupted build never
# leaves a half-written binary that a later run would take as done.
stage_dir() { mktemp -d "$OUT/.build.XXXXXX"; }
install_bins() { # tmpdir binary...
  local t="$1"; shift
  local b; for b in "$@"; do mv -f "$t/$b" "$BIN/$b"; done
  rm -rf "$t"
}

export CGO_ENABLED=0

GOBUILD=(go build -trimpath -buildvcs=false)

k8s_minor="${K8S_VERSION#v1.}"; k8s_minor="${k8s_minor%%.*}"
k8s_ldflags() {
  local p f="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    f+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$k8s_minor"
    f+=" -X $p.gitTreeState=clean -X $p.gitCommit=0000000000000000000000000000000000000000"
    f+=" -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  echo "$f"
}

total_start=$(now)
built=()

if want k8s && ! have kube-apiserver kube-controller-manager kube-scheduler; then
  need_go k8s
  log="$OUT/logs/build-k8s.log"; t="$(stage_dir)"; s=$(now)
  echo "build-controlplane: building kube-apiserver, kube-controller-manager, kube-scheduler $K8S_VERSION (log: $log)" >&2
  ( cd "$SRC/k8s" && "${GOBUILD[@]}" -tags=selinux,notest,grpcnotrace -ldflags "$(k8s_ldflags)" -o "$t/" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler
  ) >"$log" 2>&1 || fail "kube-apiserver/kube-controller-manager/kube-scheduler ($K8S_VERSION)" "$log"
  install_bins "$t" kube-apiserver kube-controller-manager kube-scheduler
  built+=("k8s:$(( $(now) - s ))s")
fi

if (want etcd || want k8s) && ! have etcd; then
  need_go etcd
  log="$OUT/logs/build-etcd.log"; t="$(stage_dir)"; s=$(now)
  echo "build-controlplane: building etcd $ETCD_VERSION (log: $log)" >&2
  ( cd "$SRC/k8s" && "${GOBUILD[@]}" -ldflags "-s -w" -o "$t/etcd" go.etcd.io/etcd/server/v3 ) >"$log" 2>&1 \
    || fail "etcd ($ETCD_VERSION)" "$log"
  install_bins "$t" etcd
  built+=("etcd:$(( $(now) - s ))s")
fi

if want kwok && ! have kwok; then
  need_go kwok
  log="$OUT/logs/build-kwok.log"; t="$(stage_dir)"; s=$(now)
  echo "build-controlplane: building kwok $KWOK_VERSION (log: $log)" >&2
  ( cd "$SRC/kwok" && "${GOBUILD[@]}" -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}" \
      -o "$t/kwok" sigs.k8s.io/kwok/cmd/kwok ) >"$log" 2>&1 || fail "kwok ($KWOK_VERSION)" "$log"
  install_bins "$t" kwok
  built+=("kwok:$(( $(now) - s ))s")
fi

if want training-operator && ! have training-operator.v1; then
  need_go training-operator
  log="$OUT/logs/build-training-operator.log"; t="$(stage_dir)"; s=$(now)
  echo "build-controlplane: building training-operator.v1 $TFO_VERSION (log: $log)" >&2
  ( cd "$SRC/training-operator" && "${GOBUILD[@]}" -ldflags "-s -w" \
      -o "$t/training-operator.v1" github.com/kubeflow/training-operator/cmd/training-operator.v1 ) >"$log" 2>&1 \
    || fail "training-operator ($TFO_VERSION)" "$log"
  install_bins "$t" training-operator.v1
  built+=("training-operator:$(( $(now) - s ))s")
fi

if want helm && ! have helm; then
  need_go helm
  log="$OUT/logs/build-helm.log"; t="$(stage_dir)"; s=$(now)
  echo "build-controlplane: building helm $HELM_VERSION (log: $log)" >&2
  hl="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  for p in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    hl+=" -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$k8s_minor"
  done
  ( cd "$SRC/helm" && "${GOBUILD[@]}" -ldflags "$hl" -o "$t/helm" helm.sh/helm/v3/cmd/helm ) >"$log" 2>&1 \
    || fail "helm ($HELM_VERSION)" "$log"
  install_bins "$t" helm
  built+=("helm:$(( $(now) - s ))s")
fi

# Data files taken from the module zips (read-only module cache -> our cache dir).
moddir() { # srcdir module@version
  need_go "$1 data files"
  ( cd "$SRC/$1" && go mod download -json "$2" ) | awk -F'"' '$2=="Dir"{print $4}'
}

# Opt-in extras: one controller binary each, plus its CRDs in crds/<extra>/ and its webhook
# configurations in webhooks/<extra>.yaml (both from the module zip; the harness rewrites the
# webhooks to point at the out-of-cluster process).
build_extra() { # extra module version binary package crd-subdir webhook-manifest ldflags
  local e="$1" mod="$2" ver="$3" bin="$4" pkg="$5" crdsub="$6" whfile="$7" ldf="$8"
  local stamp="$OUT/extras/$e.stamp" want_stamp; want_stamp="$(extra_stamp "$e" "$ver")"
  local log="$OUT/logs/build-$e.log" t s d
  if [[ $force -eq 1 || ! -x "$BIN/$bin" || ! -s "$stamp" || "$(cat "$stamp")" != "$want_stamp" ]]; then
    need_go "$e"
    t="$(stage_dir)"; s=$(now)
    echo "build-controlplane: building $bin ($mod $ver) (log: $log)" >&2
    ( cd "$SRC/$e" && "${GOBUILD[@]}" -ldflags "-s -w $ldf" -o "$t/$bin" "$pkg" ) >"$log" 2>&1 \
      || fail "$e ($ver)" "$log"
    install_bins "$t" "$bin"
    rm -rf "$OUT/crds/$e" "$OUT/webhooks/$e.yaml"
    echo "$want_stamp" >"$stamp"
    built+=("$e:$(( $(now) - s ))s,$(( $(stat -c %s "$BIN/$bin") / 1048576 ))MiB")
  fi
  if [[ -z "$(ls "$OUT/crds/$e/"*.yaml 2>/dev/null)" || ! -s "$OUT/webhooks/$e.yaml" ]]; then
    d="$(moddir "$e" "$mod@$ver")" || { echo "build-controlplane: FAILED to locate $mod@$ver for its CRDs" >&2; exit 1; }
    t="$(stage_dir)"; mkdir -p "$t/crds" "$OUT/webhooks"
    install -m 0644 "$d/$crdsub"/*.yaml "$t/crds/"
    rm -f "$t/crds/kustomization.yaml"
    install -m 0644 "$d/$whfile" "$t/webhook.yaml"
    rm -rf "$OUT/crds/$e"; mv "$t/crds" "$OUT/crds/$e"; mv -f "$t/webhook.yaml" "$OUT/webhooks/$e.yaml"
    rm -rf "$t"
  fi
}
if want_extra trainer-v2; then
  build_extra trainer-v2 github.com/kubeflow/trainer/v2 "$TRAINER_V2_VERSION" trainer-controller-manager \
    github.com/kubeflow/trainer/v2/cmd/trainer-controller-manager manifests/base/crds \
    manifests/base/webhook/manifests.yaml ""
fi
if want_extra jobset; then
  build_extra jobset sigs.k8s.io/jobset "$JOBSET_VERSION" jobset-controller-manager sigs.k8s.io/jobset \
    config/components/crd/bases config/components/webhook/manifests.yaml "-X sigs.k8s.io/jobset/pkg/version.GitVersion=$JOBSET_VERSION"
fi
if want_extra kueue; then
  build_extra kueue sigs.k8s.io/kueue "$KUEUE_VERSION" kueue-controller-manager sigs.k8s.io/kueue/cmd/kueue \
    config/components/crd/bases config/components/webhook/manifests.yaml "-X sigs.k8s.io/kueue/pkg/version.GitVersion=$KUEUE_VERSION"
fi
# Opt-in kind tools: binaries only, each with a stamp of its module files (like the extras).
build_tool() { # tool version ldflags binary:package...
  local e="$1" ver="$2" ldf="$3"; shift 3
  local stamp="$OUT/extras/$e.stamp" want_stamp; want_stamp="$(extra_stamp "$e" "$ver")"
  local log="$OUT/logs/build-$e.log" t s spec bins=() pkgs=()
  for spec in "$@"; do bins+=("${spec%%:*}"); pkgs+=("${spec#*:}"); done
  if [[ $force -eq 1 || ! -s "$stamp" || "$(cat "$stamp")" != "$want_stamp" ]] || ! have "${bins[@]}"; then
    need_go "$e"
    t="$(stage_dir)"; s=$(now)
    echo "build-controlplane: building ${bins[*]} ($ver) (log: $log)" >&2
    ( cd "$SRC/$e" && "${GOBUILD[@]}" -tags="${TOOL_TAGS-selinux,notest,grpcnotrace}" -ldflags "-s -w $ldf" -o "$t/" \
        "${pkgs[@]}" ) \
      >"$log" 2>&1 || fail "$e ($ver)" "$log"
    install_bins "$t" "${bins[@]}"
    echo "$want_stamp" >"$stamp"
    built+=("$e:$(( $(now) - s ))s")
  fi
}
if want kwokctl || want kwok; then  # no build tags, as for kwok: the two share Go's build cache
  TOOL_TAGS="" build_tool kwokctl "$KWOKCTL_VERSION" "-X sigs.k8s.io/kwok/pkg/consts.Version=${KWOKCTL_VERSION#v}" \
    kwokctl:sigs.k8s.io/kwok/cmd/kwokctl
fi
if want_extra kind-node; then
  build_tool kind-node "$K8S_VERSION" "$(k8s_ldflags)" kubelet:k8s.io/kubernetes/cmd/kubelet \
    kubeadm:k8s.io/kubernetes/cmd/kubeadm kube-proxy:k8s.io/kubernetes/cmd/kube-proxy kubectl:k8s.io/kubernetes/cmd/kubectl
fi
if want_extra coredns; then
  build_tool coredns "$COREDNS_VERSION" "" coredns:github.com/coredns/coredns
fi
if want_extra kind; then
  build_tool kind "$KIND_VERSION" "" kind:sigs.k8s.io/kind
fi

crd="$OUT/crds/kubeflow.org_pytorchjobs.yaml"
if [[ ! -s "$crd" || $force -eq 1 ]] && want training-operator; then
  d="$(moddir training-operator "github.com/kubeflow/training-operator@$TFO_VERSION")" \
    || { echo "build-controlplane: FAILED to locate the training-operator module to extract the PyTorchJob CRD" >&2; exit 1; }
  install -m 0644 "$d/manifests/base/crds/kubeflow.org_pytorchjobs.yaml" "$crd.tmp" && mv -f "$crd.tmp" "$crd"
fi
if [[ ! -s "$OUT/kwok-stages/pod-ready.yaml" || $force -eq 1 ]] && want kwok; then
  d="$(moddir kwok "sigs.k8s.io/kwok@$KWOK_VERSION")" \
    || { echo "build-controlplane: FAILED to locate the kwok module to extract its stages" >&2; exit 1; }
  for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
           pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    install -m 0644 "$d/kustomize/stage/$f" "$OUT/kwok-stages/$(basename "$f")"
  done
fi

cat >"$OUT/versions.env" <<EOF
K8S_VERSION=$K8S_VERSION
ETCD_VERSION=$ETCD_VERSION
KWOK_VERSION=$KWOK_VERSION
KWOKCTL_VERSION=$KWOKCTL_VERSION
TRAINING_OPERATOR_VERSION=$TFO_VERSION
HELM_VERSION=$HELM_VERSION
TRAINER_V2_VERSION=$TRAINER_V2_VERSION
JOBSET_VERSION=$JOBSET_VERSION
KUEUE_VERSION=$KUEUE_VERSION
COREDNS_VERSION=$COREDNS_VERSION
KIND_VERSION=$KIND_VERSION
KEY=$KEY
EOF

if [[ ${#built[@]} -gt 0 ]]; then
  echo "build-controlplane: built ${built[*]} in $(( $(now) - total_start ))s" >&2
else
  echo "build-controlplane: up to date ($KEY)" >&2
fi
echo "$BIN"
