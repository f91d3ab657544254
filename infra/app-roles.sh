# shellcheck shell=bash
# Application role grants through Microsoft Graph, shared by grant-permissions.sh and
# add-tenant.sh (sourced, not run). Everything is looked up first and only then changed, so a
# refusal (a missing service principal, a role the API does not offer) leaves the tenant as it
# was: plan_grants makes read-only calls and records what is missing, apply_grants grants it
# (or, in a dry run, prints the calls). Role ids are looked up by value, never hard-coded, and a
# role already granted is left alone, so a second run changes nothing.

# shellcheck disable=SC2034 # the constants are for the scripts that source this file
readonly DEFENDER_APP_ID=fc780465-2017-40d4-a0c5-307022471b92 # WindowsDefenderATP, every tenant
# shellcheck disable=SC2034
readonly GRAPH_APP_ID=00000003-0000-0000-c000-000000000000   # Microsoft Graph, every tenant
# shellcheck disable=SC2034
readonly GUID='^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$'

prog=${prog:-app-roles} # the sourcing script sets its own name, for messages
graph=""
planned_roles=()
planned_urls=()
planned_bodies=()

die() {
  echo "$prog: $*" >&2
  exit 1
}

# app_roles_init: needs the Azure CLI; finds the Graph root of the CLI's cloud (az cloud set).
app_roles_init() {
  command -v az >/dev/null || die "the Azure CLI (az) is required; then sign in with 'az login'"
  graph=$(az cloud show --query endpoints.microsoftGraphResourceId -o tsv)
  graph=${graph%/}
}

# sp_object_id <app id> <label> <why it may be missing>: the object id of that application's
# service principal in the signed-in tenant, or a refusal naming it.
sp_object_id() {
  local id
  id=$(az ad sp show --id "$1" --query id -o tsv) ||
    die "the $2 service principal (app id $1) is not in this tenant: $3"
  echo "$id"
}

# app_role_id <app id> <label> <role value>: the id of that application role.
app_role_id() {
  local id
  id=$(az ad sp show --id "$1" \
    --query "appRoles[?value=='$3' && contains(allowedMemberTypes, 'Application')].id | [0]" -o tsv)
  [ -n "$id" ] || die "$2 offers no application role '$3' in this tenant"
  echo "$id"
}

# plan_grants <principal object id> <resource app id> <label> <why it may be missing> <role>...
plan_grants() {
  local principal=$1 app_id=$2 label=$3 hint=$4
  shift 4
  local resource url granted role role_id
  resource=$(sp_object_id "$app_id" "$label" "$hint")
  url="$graph/v1.0/servicePrincipals/$principal/appRoleAssignments"
  granted=$(az rest --method GET --url "$url" --query "value[?resourceId=='$resource'].appRoleId" -o tsv)
  for role in "$@"; do
    role_id=$(app_role_id "$app_id" "$label" "$role")
    if grep -qixF -- "$role_id" <<<"$granted"; then
      echo "already granted: $role ($role_id)"
      continue
    fi
    planned_roles+=("$role ($role_id)")
    planned_urls+=("$url")
    planned_bodies+=("$(printf '{"principalId": "%s", "resourceId": "%s", "appRoleId": "%s"}' \
      "$principal" "$resource" "$role_id")")
  done
}

# apply_grants <true|false: dry run>: makes every planned grant, or prints the calls.
apply_grants() {
  local dry_run=$1 i
  local call=()
  for i in "${!planned_roles[@]}"; do
    call=(az rest --method POST --url "${planned_urls[$i]}" --headers "Content-Type=application/json"
      --body "${planned_bodies[$i]}")
    if [ "$dry_run" = true ]; then
      printf 'would grant %s:' "${planned_roles[$i]%% *}"
      printf ' %q' "${call[@]}"
      printf '\n'
    else
      "${call[@]}" >/dev/null
      echo "granted: ${planned_roles[$i]}"
    fi
  done
  if [ "${#planned_roles[@]}" -eq 0 ]; then
    echo "nothing to change: every role is already granted"
  elif [ "$dry_run" = true ]; then
    echo "dry run: ${#planned_roles[@]} grant(s) not made"
  fi
}
