#!/usr/bin/env bash
# Adds one customer tenant to a deployment that offboards in many tenants (see docs/deploy.md,
# "Many tenants"). The app signs in to the customer tenant as the multi-tenant app registration
# (infra/create-multitenant-app.sh), so in that tenant:
#   1. an administrator of the customer tenant consents to the app: the URL is printed first
#      (--consent-url prints only that, signed in anywhere or nowhere). Consent creates the app's
#      service principal there and grants the permissions the app requests;
#   2. this script, run signed in to the customer tenant after consent
#      (`az login --tenant <customer tenant id> --allow-no-subscriptions`, as a Privileged Role
#      Administrator or Global Administrator there), grants whatever Defender for Endpoint
#      application roles are still missing to that service principal:
#        Machine.Offboard, Machine.Read.All, and Machine.ReadWrite.All with --with-tagging.
#      It never creates the service principal itself: without consent it stops and says so;
#   3. it prints the OFFBOARD_TENANTS entry to add to the deployment's tenants parameter.
# Role ids are looked up by value, a role already granted is left alone (a second run changes
# nothing), and everything is looked up before anything is granted. --dry-run changes nothing.
# Azure Government: `az cloud set --name AzureUSGovernment` first (sign-in and Graph hosts).
set -euo pipefail
prog="add-tenant"
# shellcheck source=infra/app-roles.sh
. "$(dirname "${BASH_SOURCE[0]}")/app-roles.sh"

usage() {
  cat <<'EOF_USAGE'
usage: infra/add-tenant.sh --tenant-id <customer tenant id> --app-id <application id>
         [--name <display name>] [--with-tagging] [--consent-url | --dry-run]

  --tenant-id      the customer's Entra tenant id
  --app-id         the multi-tenant app's application (client) id: the deployment's
                   multitenantAppClientId, printed by infra/create-multitenant-app.sh
  --name           a display name for the tenant in OFFBOARD_TENANTS (no , = or ;)
  --with-tagging   also grant Machine.ReadWrite.All (only if you enable device tagging)
  --consent-url    print the administrator consent URL and stop (no sign-in needed)
  --dry-run        look everything up, change nothing, print the grants a real run would make
EOF_USAGE
}

readonly TENANT_NAME=$'^[^\x01-\x1f\x7f,=;]{1,100}$' # what OFFBOARD_TENANTS accepts as a name
tenant=""
app_id=""
name=""
tagging=false
consent_only=false
dry_run=false
while [ $# -gt 0 ]; do
  case "$1" in
    --tenant-id | --app-id | --name)
      [ $# -ge 2 ] || { usage >&2; die "$1 needs a value"; }
      case "$1" in
        --tenant-id) tenant=$2 ;;
        --app-id) app_id=$2 ;;
        *) name=$2 ;;
      esac
      shift 2
      ;;
    --with-tagging) tagging=true; shift ;;
    --consent-url) consent_only=true; shift ;;
    --dry-run) dry_run=true; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; echo "$prog: unknown argument '$1'" >&2; exit 2 ;;
  esac
done

if [ -z "$tenant" ] || [ -z "$app_id" ]; then
  usage >&2
  echo "$prog: --tenant-id and --app-id are required" >&2
  exit 2
fi
[[ $tenant =~ $GUID ]] || die "--tenant-id '$tenant' is not a tenant id (a GUID)"
[[ $app_id =~ $GUID ]] || die "--app-id '$app_id' is not an application id (a GUID)"
[ -z "$name" ] || [[ $name =~ $TENANT_NAME ]] ||
  die "--name must be 1-100 characters without control characters, ',', '=' or ';' (OFFBOARD_TENANTS separates entries with them)"
tenant=${tenant,,}
app_id=${app_id,,}
app_roles_init

login=$(az cloud show --query endpoints.activeDirectory -o tsv)
consent="${login%/}/$tenant/adminconsent?client_id=$app_id"
if [ "$consent_only" = true ]; then
  echo "$consent"
  exit 0
fi
echo "administrator consent (an administrator of tenant $tenant opens it once): $consent"

signed_in=$(az account show --query tenantId -o tsv) ||
  die "not signed in: run 'az login --tenant $tenant --allow-no-subscriptions' as an administrator of the customer tenant"
[ "${signed_in,,}" = "$tenant" ] ||
  die "signed in to tenant $signed_in, not $tenant: run 'az login --tenant $tenant --allow-no-subscriptions' and run again"

app_sp=$(az ad sp show --id "$app_id" --query id -o tsv) ||
  die "the app $app_id has no service principal in tenant $tenant yet: consent first (an administrator of the tenant opens $consent), then run again"
roles=(Machine.Offboard Machine.Read.All)
[ "$tagging" = true ] && roles+=(Machine.ReadWrite.All)
plan_grants "$app_sp" "$DEFENDER_APP_ID" WindowsDefenderATP "is Defender for Endpoint set up in tenant $tenant?" \
  "${roles[@]}"
apply_grants "$dry_run"

entry=$tenant
[ -z "$name" ] || entry="$tenant=$name"
cat <<EOF_ENTRY

OFFBOARD_TENANTS entry for this tenant (add it, comma-separated, to the deployment's tenants parameter):
  $entry
EOF_ENTRY
