#!/usr/bin/env bash
# Grants the function app's managed identity the Defender for Endpoint application roles it
# needs, on your tenant's WindowsDefenderATP service principal:
#   Machine.Offboard        offboard a device (the app's whole purpose)
#   Machine.Read.All        read devices (status and lookups)
#   Machine.ReadWrite.All   only with --with-tagging: tag devices
# Role ids are looked up by value at run time, never hard-coded. A role already granted is left
# alone, so a second run changes nothing. --dry-run makes the read-only look-ups and prints the
# grants it would make. Run it signed in (`az login`) as an administrator who can grant
# application permissions (Privileged Role Administrator or Global Administrator); for Azure
# Government run `az cloud set --name AzureUSGovernment` first: Graph is found from the CLI's cloud.
set -euo pipefail

readonly DEFENDER_APP_ID=fc780465-2017-40d4-a0c5-307022471b92 # WindowsDefenderATP, every tenant
readonly GUID='^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$'

usage() {
  cat <<'EOF'
usage: infra/grant-permissions.sh --principal-id <object id> [--with-tagging] [--dry-run]

  --principal-id   object (principal) id of the function app's managed identity. It is the
                   template's `principalId` output, or:
                     az functionapp identity show -g <resource group> -n <app name> --query principalId -o tsv
  --with-tagging   also grant Machine.ReadWrite.All (only if you enable device tagging)
  --dry-run        look everything up, change nothing, print the calls a real run would make
EOF
}

die() {
  echo "grant-permissions: $*" >&2
  exit 1
}

principal=""
tagging=false
dry_run=false
while [ $# -gt 0 ]; do
  case "$1" in
    --principal-id)
      [ $# -ge 2 ] || { usage >&2; die "--principal-id needs a value"; }
      principal=$2
      shift 2
      ;;
    --principal-id=*)
      principal=${1#*=}
      shift
      ;;
    --with-tagging) tagging=true; shift ;;
    --dry-run) dry_run=true; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; echo "grant-permissions: unknown argument '$1'" >&2; exit 2 ;;
  esac
done

if [ -z "$principal" ]; then
  usage >&2
  echo "grant-permissions: --principal-id is required: the managed identity's object id, from the" \
    "deployment's principalId output or 'az functionapp identity show -g <resource group>" \
    "-n <app name> --query principalId -o tsv'" >&2
  exit 2
fi
[[ $principal =~ $GUID ]] || die "--principal-id '$principal' is not an object id (a GUID such as 0f1e2d3c-0000-4000-8000-000000000001)"
command -v az >/dev/null || die "the Azure CLI (az) is required; then sign in with 'az login'"

roles=(Machine.Offboard Machine.Read.All)
[ "$tagging" = true ] && roles+=(Machine.ReadWrite.All)

graph=$(az cloud show --query endpoints.microsoftGraphResourceId -o tsv)
graph=${graph%/}
az ad sp show --id "$principal" --query id -o tsv >/dev/null ||
  die "no service principal with object id $principal in this tenant: check the id, and that you are signed in to the app's tenant"
resource=$(az ad sp show --id "$DEFENDER_APP_ID" --query id -o tsv) ||
  die "the WindowsDefenderATP service principal (app id $DEFENDER_APP_ID) is not in this tenant: is Defender for Endpoint set up here?"
url="$graph/v1.0/servicePrincipals/$principal/appRoleAssignments"
granted=$(az rest --method GET --url "$url" --query "value[?resourceId=='$resource'].appRoleId" -o tsv)

changes=0
for role in "${roles[@]}"; do
  role_id=$(az ad sp show --id "$DEFENDER_APP_ID" \
    --query "appRoles[?value=='$role' && contains(allowedMemberTypes, 'Application')].id | [0]" -o tsv)
  [ -n "$role_id" ] || die "WindowsDefenderATP offers no application role '$role' in this tenant"
  if grep -qixF -- "$role_id" <<<"$granted"; then
    echo "already granted: $role ($role_id)"
    continue
  fi
  body=$(printf '{"principalId": "%s", "resourceId": "%s", "appRoleId": "%s"}' "$principal" "$resource" "$role_id")
  call=(az rest --method POST --url "$url" --headers "Content-Type=application/json" --body "$body")
  changes=$((changes + 1))
  if [ "$dry_run" = true ]; then
    printf 'would grant %s:' "$role"
    printf ' %q' "${call[@]}"
    printf '\n'
  else
    "${call[@]}" >/dev/null
    echo "granted: $role ($role_id)"
  fi
done

if [ "$changes" -eq 0 ]; then
  echo "nothing to change: every role is already granted"
elif [ "$dry_run" = true ]; then
  echo "dry run: $changes grant(s) not made"
fi
