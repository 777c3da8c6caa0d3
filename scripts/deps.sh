#!/usr/bin/env bash
# Installs what Fathom's build and tests need, when missing (Debian/Ubuntu): protoc (tonic
# codegen), etcd (membership tests) and the Helm chart tools (scripts/helm-check.sh and the
# helm_* tests): helm-python-sdk (Helm v4, offline render and lint), kubernetes-validate and
# yamllint, pinned, in a venv outside the repository at
# ${FATHOM_TOOLS_VENV:-$HOME/.cache/fathom/tools-venv}.
# and NVRTC for the kernel compile test; python3 with venv (the openai_http test pip-installs the
# official `openai` client into ~/.cache/fathom/openai-venv). Idempotent; prints what it does.
# FATHOM_DEPS_ETCD=0 / FATHOM_DEPS_HELM=0 / FATHOM_DEPS_NVRTC=0 skip those parts.
set -euo pipefail
need=()
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
if [ "${FATHOM_DEPS_ETCD:-1}" = 1 ]; then
  command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
fi
# Python 3 with venv + ensurepip, always: the openai_http test creates its own venv.
command -v python3 >/dev/null 2>&1 || need+=(python3)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)
helm_tools=(helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 yamllint==1.38.0)
venv="${FATHOM_TOOLS_VENV:-$HOME/.cache/fathom/tools-venv}"
want_helm=0
if [ "${FATHOM_DEPS_HELM:-1}" = 1 ] &&
  ! "$venv/bin/python" -c 'import helm_python, kubernetes_validate, yamllint' >/dev/null 2>&1; then
  want_helm=1
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "deps: installing ${need[*]}" >&2
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if [ "$want_helm" = 1 ]; then
  echo "deps: installing ${helm_tools[*]} into $venv" >&2
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "${helm_tools[@]}"
fi
# NVRTC (no GPU needed): the cuda_nvrtc test compiles every CUDA kernel for sm_90a with it, so
# CUDA C++ errors are caught here and in CI before any GPU run. Same version as the GPU machine.
if [ "${FATHOM_DEPS_NVRTC:-1}" = 1 ] &&
  [ ! -e "$HOME/.cache/fathom/nvrtc/nvidia/cu13/lib/libnvrtc.so.13" ]; then
  echo "deps: installing nvidia-cuda-nvrtc==13.0.88 into $HOME/.cache/fathom/nvrtc" >&2
  python3 -m pip install -q --disable-pip-version-check --target "$HOME/.cache/fathom/nvrtc" nvidia-cuda-nvrtc==13.0.88
fi
