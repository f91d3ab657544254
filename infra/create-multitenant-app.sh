#!/usr/bin/env bash
# One-time set-up for many tenants, in the home tenant (the one with the function app): the
# multi-tenant app registration the app signs in to customer tenants as, trusting the function
# app's user-assigned managed identity through a federated identity credential (workload identity
# federation: no secret, no certificate). Creates what is missing and leaves the rest alone, so a
# second run changes nothing:
#   - the app registration (signInAudience AzureADMultipleOrgs), found by --app-id or by its exact
#     display name, with the portal as its redirect URI (where an administrator lands after consent);
#   - its requested application permissions on WindowsDefenderATP (Machine.Offboard,
#     Machine.Read.All, and Machine.ReadWrite.All with --with-tagging), role ids looked up by value,
#     so each customer's administrator consents to exactly these;
#   - the federated credential: issuer <sign-in host>/<home tenant>/v2.0, subject the identity's
#     principal id, audience api://AzureADTokenExchange (USGov and China variants per CLI cloud).
# Only a user-assigned identity can be trusted this way; the credential and the customer tenants
# must be in the same cloud. --dry-run looks everything up and prints the changes instead.
# Run it signed in (`az login`) to the home tenant as an Application Administrator (or Cloud
# Application Administrator, or the app's owner); Azure Government: `az cloud set --name
# AzureUSGovernment` first.
set -euo pipefail
prog="create-multitenant-app"
# shellcheck source=infra/app-roles.sh
. "$(dirname "${BASH_SOURCE[0]}")/app-roles.sh"

usage() {
  cat <<'EOF_USAGE'
usage: infra/create-multitenant-app.sh --identity-principal-id <object id>
         [--app-id <application id> | --display-name <name>] [--with-tagging] [--dry-run]

  --identity-principal-id  the user-assigned identity's object (principal) id: the deployment's
                           userAssignedIdentityPrincipalId output (deploy with userAssignedIdentity=true)
  --app-id                 use this existing app registration (application/client id)
  --display-name           find the app registration by this exact name, or create it
                           (default: "Defender offboarding (multi-tenant)")
  --with-tagging           also request Machine.ReadWrite.All (only if you enable device tagging)
  --dry-run                look everything up, change nothing, print the changes a real run would make
EOF_USAGE
}

readonly FIC_LIMIT=20 # federated identity credentials per application (Entra's limit)
readonly DISPLAY_NAME="^[^'\"\\]{1,120}\$"
principal=""
app_id=""
name="Defender offboarding (multi-tenant)"
tagging=false
dry_run=false
while [ $# -gt 0 ]; do
  case "$1" in
    --identity-principal-id | --app-id | --display-name)
      [ $# -ge 2 ] || { usage >&2; die "$1 needs a value"; }
      case "$1" in
        --identity-principal-id) principal=$2 ;;
        --app-id) app_id=$2 ;;
        *) name=$2 ;;
      esac
      shift 2
      ;;
    --with-tagging) tagging=true; shift ;;
    --dry-run) dry_run=true; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; echo "$prog: unknown argument '$1'" >&2; exit 2 ;;
  esac
done

if [ -z "$principal" ]; then
  usage >&2
  echo "$prog: --identity-principal-id is required: the deployment's userAssignedIdentityPrincipalId output" >&2
  exit 2
fi
[[ $principal =~ $GUID ]] || die "--identity-principal-id '$principal' is not an object id (a GUID)"
[ -z "$app_id" ] || [[ $app_id =~ $GUID ]] || die "--app-id '$app_id' is not an application id (a GUID)"
# The name goes into a JMESPath filter in quotes: no quotes or backslashes in it.
[[ $name =~ $DISPLAY_NAME ]] || die "--display-name must be 1-120 characters without quotes or backslashes"
principal=${principal,,}
app_roles_init

changes=0
done_changes=""
change() { # change <description> <command>...: runs it, or in a dry run prints it
  local what=$1
  shift
  changes=$((changes + 1))
  if [ "$dry_run" = true ]; then
    printf 'would %s:' "$what"
    printf ' %q' "$@"
    printf '\n'
  else
    "$@" >/dev/null
    echo "done: $what"
    done_changes+="$*"$'\n'
  fi
}

# Where we are: the home tenant, and the cloud's sign-in host and exchange audience.
tenant=$(az account show --query tenantId -o tsv) || die "not signed in: run 'az login' (to the home tenant) first"
cloud=$(az cloud show --query name -o tsv)
login=$(az cloud show --query endpoints.activeDirectory -o tsv)
login=${login%/}
case "$cloud" in
  AzureCloud) audience=api://AzureADTokenExchange portal=https://portal.azure.com ;;
  AzureUSGovernment) audience=api://AzureADTokenExchangeUSGov portal=https://portal.azure.us ;;
  AzureChinaCloud) audience=api://AzureADTokenExchangeChina portal=https://portal.azure.cn ;;
  *) die "the CLI's cloud '$cloud' has no known token exchange audience (AzureCloud, AzureUSGovernment, AzureChinaCloud)" ;;
esac
issuer="$login/$tenant/v2.0"

# The identity to trust: a user-assigned managed identity in this tenant.
kind=$(az ad sp show --id "$principal" --query servicePrincipalType -o tsv) ||
  die "no service principal with object id $principal in this tenant: check the id, and that you are signed in to the app's home tenant"
[ "$kind" = ManagedIdentity ] || die "$principal is a $kind service principal, not a managed identity"
explicit=$(az ad sp show --id "$principal" --query "contains(alternativeNames, 'isExplicit=True')" -o tsv)
[ "${explicit,,}" = true ] ||
  die "$principal is a system-assigned identity; only a user-assigned identity can be a federated credential: deploy with userAssignedIdentity=true and give its userAssignedIdentityPrincipalId output"

# The permissions to request, looked up by value before anything changes.
roles=(Machine.Offboard Machine.Read.All)
[ "$tagging" = true ] && roles+=(Machine.ReadWrite.All)
sp_object_id "$DEFENDER_APP_ID" WindowsDefenderATP \
  "its role ids cannot be looked up here; if Defender for Endpoint is not used in this tenant, add Microsoft's service principal with 'az ad sp create --id $DEFENDER_APP_ID' (it grants nothing by itself) and run again" >/dev/null
role_ids=()
for role in "${roles[@]}"; do
  role_ids+=("$(app_role_id "$DEFENDER_APP_ID" WindowsDefenderATP "$role")")
done

# The app registration.
if [ -n "$app_id" ]; then
  audience_now=$(az ad app show --id "$app_id" --query signInAudience -o tsv) ||
    die "no app registration with application id $app_id in this tenant"
else
  found=$(az ad app list --display-name "$name" --query "[?displayName=='$name'].appId" -o tsv)
  if [ "$(grep -c . <<<"$found")" -gt 1 ]; then
    die "several app registrations are named '$name': give the one to use with --app-id"
  fi
  app_id=$found
  audience_now=""
  [ -z "$app_id" ] || audience_now=$(az ad app show --id "$app_id" --query signInAudience -o tsv)
fi
existing_roles=""
fics=""
if [ -n "$app_id" ]; then
  [ "$audience_now" = AzureADMultipleOrgs ] ||
    die "app registration $app_id has signInAudience '$audience_now', not AzureADMultipleOrgs, so customer tenants cannot consent to it. If it is meant for this, make it multi-tenant with 'az ad app update --id $app_id --sign-in-audience AzureADMultipleOrgs' and run again"
  echo "app registration: $app_id (multi-tenant)"
  existing_roles=$(az ad app show --id "$app_id" \
    --query "requiredResourceAccess[?resourceAppId=='$DEFENDER_APP_ID'].resourceAccess[].id" -o tsv)
  fics=$(az ad app federated-credential list --id "$app_id" \
    --query "[].[name, issuer, subject, join(' ', audiences)]" -o tsv)
fi

# The federated credential: one per identity, whatever its name. Checked before any change.
fic_name="uami-$principal"
trusted=""
count=0
while IFS=$'\t' read -r fic fic_issuer fic_subject fic_audiences; do
  [ -n "$fic" ] || continue
  count=$((count + 1))
  if [ "$fic_issuer" = "$issuer" ] && [ "${fic_subject,,}" = "$principal" ] && [ "$fic_audiences" = "$audience" ]; then
    trusted=$fic
  elif [ "$fic" = "$fic_name" ]; then
    die "app registration $app_id has a federated credential named $fic_name that does not match (issuer $fic_issuer, subject $fic_subject, audience $fic_audiences): delete it with 'az ad app federated-credential delete --id $app_id --federated-credential-id $fic_name' and run again"
  fi
done <<<"$fics"
[ -n "$trusted" ] || [ "$count" -lt "$FIC_LIMIT" ] ||
  die "app registration $app_id already has $count federated credentials, the most Entra allows: delete one it no longer needs"

# Only now, changes.
if [ -z "$app_id" ]; then
  create=(az ad app create --display-name "$name" --sign-in-audience AzureADMultipleOrgs
    --web-redirect-uris "$portal" --query appId -o tsv)
  changes=$((changes + 1))
  if [ "$dry_run" = true ]; then
    printf 'would create the app registration:'
    printf ' %q' "${create[@]}"
    printf '\n'
    app_id="<new application id>"
  else
    app_id=$("${create[@]}")
    echo "created the app registration '$name': application id $app_id"
  fi
fi
for i in "${!roles[@]}"; do
  if grep -qixF -- "${role_ids[$i]}" <<<"$existing_roles"; then
    echo "already requested: ${roles[$i]} (${role_ids[$i]})"
  else
    change "request ${roles[$i]}" az ad app permission add --id "$app_id" --api "$DEFENDER_APP_ID" \
      --api-permissions "${role_ids[$i]}=Role"
  fi
done
if [ -n "$trusted" ]; then
  echo "already trusted: the identity $principal (federated credential $trusted)"
else
  credential=$(printf '{"name": "%s", "issuer": "%s", "subject": "%s", "audiences": ["%s"], "description": "%s"}' \
    "$fic_name" "$issuer" "$principal" "$audience" "Defender offboarding: the function app's user-assigned identity")
  change "trust the identity $principal" az ad app federated-credential create --id "$app_id" --parameters "$credential"
fi

if [ "$changes" -eq 0 ]; then
  echo "nothing to change: the app registration is ready"
elif [ "$dry_run" = false ] && grep -q "permission add" <<<"$done_changes"; then
  echo "(the CLI's hint to run 'az ad app permission grant' does not apply: each customer tenant's administrator consents)"
elif [ "$dry_run" = true ]; then
  echo "dry run: $changes change(s) not made"
fi
cat <<EOF_NEXT

Next:
  1. Deploy with multitenantAppClientId=$app_id (MULTITENANT_APP_CLIENT_ID).
  2. For each customer tenant: infra/add-tenant.sh --tenant-id <customer tenant id> --app-id $app_id
EOF_NEXT
