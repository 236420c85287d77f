#!/usr/bin/env bash
# Render and apply one model's stack, as TGIS's deploy_model.sh does:
#   k8s/deploy.sh llama-3.1-8b-instruct             # k8s/models/<name>, applied to the current namespace
#   k8s/deploy.sh overlays/cpu-demo                 # any kustomization under k8s/
#   k8s/deploy.sh --render codellama-34b-instruct   # print the manifests only
#   k8s/deploy.sh --delete llama-3.1-8b-instruct    # remove that stack (its PVC too)
# Extra arguments go to kubectl (e.g. -n my-namespace, --dry-run=server).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
action=apply
case "${1:-}" in
  --render) action=render; shift ;;
  --delete) action=delete; shift ;;
esac
name="${1:?usage: deploy.sh [--render|--delete] <model dir under k8s/models, or a path under k8s/> [kubectl args]}"
shift
dir="$here/models/$name"
[ -d "$dir" ] || dir="$here/$name"
if [ ! -f "$dir/kustomization.yaml" ]; then
  echo "no kustomization for '$name' (models: $(ls "$here/models" | tr '\n' ' '))" >&2
  exit 2
fi
if [ "$action" = render ]; then
  exec kubectl kustomize "$dir"
fi
kubectl kustomize "$dir" | kubectl "$action" "$@" -f -
