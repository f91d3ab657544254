#!/usr/bin/env bash
# Grants the function app's managed identity the application roles it needs, in its own tenant:
#   on WindowsDefenderATP (Defender for Endpoint's API):
#     Machine.Offboard        offboard a device (the app's whole purpose)
#     Machine.Read.All        read devices (status and lookups)
#     Machine.ReadWrite.All   only with --with-tagging: tag devices
#   on Microsoft Graph, only with --with-intune (the Intune watcher):
#     DeviceManagementManagedDevices.Read.All   list Intune managed devices (retiring ones)
#     DeviceManagementApps.Read.All             read Intune audit events (the least role that
#                                               Graph v1.0 lists for deviceManagement/auditEvents)
# Role ids are looked up by value at run time, never hard-coded. A role already granted is left
# alone, so a second run changes nothing. Everything is looked up before anything is granted, so
# a refusal changes nothing. --dry-run makes the read-only look-ups and prints the grants it would
# make. Run it signed in (`az login`) as an administrator who can grant application permissions
# (Privileged Role Administrator or Global Administrator); for Azure Government run
# `az cloud set --name AzureUSGovernment` first: Graph is found from the CLI's cloud.
set -euo pipefail
prog="grant-permissions"
# shellcheck source=infra/app-roles.sh
. "$(dirname "${BASH_SOURCE[0]}")/app-roles.sh"

usage() {
  cat <<'EOF_USAGE'
usage: infra/grant-permissions.sh --principal-id <object id> [--with-tagging] [--with-intune] [--dry-run]

  --principal-id   object (principal) id of the identity the app calls Defender with: the
                   template's `apiPrincipalId` output (the user-assigned identity when the
                   template created one, else the system-assigned one), or for the latter:
                     az functionapp identity show -g <resource group> -n <app name> --query principalId -o tsv
  --with-tagging   also grant Machine.ReadWrite.All (only if you enable device tagging)
  --with-intune    also grant the Microsoft Graph roles of the Intune watcher
                   (DeviceManagementManagedDevices.Read.All, DeviceManagementApps.Read.All)
  --dry-run        look everything up, change nothing, print the calls a real run would make
EOF_USAGE
}

principal=""
tagging=false
intune=false
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
    --with-intune) intune=true; shift ;;
    --dry-run) dry_run=true; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; echo "$prog: unknown argument '$1'" >&2; exit 2 ;;
  esac
done

if [ -z "$principal" ]; then
  usage >&2
  echo "$prog: --principal-id is required: the object id of the identity the app calls" \
    "Defender with, the deployment's apiPrincipalId output (without a user-assigned identity also" \
    "'az functionapp identity show -g <resource group> -n <app name> --query principalId -o tsv')" >&2
  exit 2
fi
[[ $principal =~ $GUID ]] || die "--principal-id '$principal' is not an object id (a GUID such as 0f1e2d3c-0000-4000-8000-000000000001)"
app_roles_init

defender_roles=(Machine.Offboard Machine.Read.All)
[ "$tagging" = true ] && defender_roles+=(Machine.ReadWrite.All)

az ad sp show --id "$principal" --query id -o tsv >/dev/null ||
  die "no service principal with object id $principal in this tenant: check the id, and that you are signed in to the app's tenant"
plan_grants "$principal" "$DEFENDER_APP_ID" WindowsDefenderATP "is Defender for Endpoint set up here?" \
  "${defender_roles[@]}"
if [ "$intune" = true ]; then
  plan_grants "$principal" "$GRAPH_APP_ID" "Microsoft Graph" \
    "Graph is in every Entra tenant, so check that you are signed in to the right tenant and cloud (az account show, az cloud show)" \
    DeviceManagementManagedDevices.Read.All DeviceManagementApps.Read.All
fi
apply_grants "$dry_run"
