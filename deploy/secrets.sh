#!/usr/bin/env bash
# Makes the secrets docker-compose.yml needs, once (re-running keeps what
# exists; --rotate-keys makes new API keys):
#   .env                          passwords (Redis users, MongoDB root and
#                                 service users, Grafana admin), from
#                                 .env.example when .env does not exist yet
#   deploy/secrets/api-keys.toml  API_KEYS_FILE: name, scopes, SHA-256 of
#                                 each key (never the key itself)
#   deploy/secrets/api-keys.txt   the keys themselves (mode 600): hand them
#                                 to the clients, then delete the file
#   deploy/secrets/prometheus-api-key  the key Prometheus scrapes /metrics with
# Neither .env nor deploy/secrets/ is committed (.gitignore).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
umask 077

random() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
sha256() { printf %s "$1" | sha256sum | cut -d' ' -f1; }

[ -f .env ] || cp .env.example .env
for name in REDIS_API_PASSWORD REDIS_INVALIDATOR_PASSWORD REDIS_ADMIN_PASSWORD \
            MONGO_ROOT_PASSWORD MONGO_API_PASSWORD MONGO_INVALIDATOR_PASSWORD \
            GRAFANA_ADMIN_PASSWORD; do
    if grep -q "^${name}=." .env; then
        continue
    fi
    # hex only: nothing to percent-encode in REDIS_URL / MONGO_URI
    value=$(random)
    if grep -q "^${name}=" .env; then
        sed -i "s/^${name}=.*/${name}=${value}/" .env
    else
        printf '%s=%s\n' "$name" "$value" >>.env
    fi
    echo "secrets: set $name in .env"
done

mkdir -p deploy/secrets
if [ ! -f deploy/secrets/api-keys.toml ] || [ "${1:-}" = "--rotate-keys" ]; then
    # name:scopes — one key per client; add your own lines.
    keys_txt=""
    toml="# API_KEYS_FILE written by deploy/secrets.sh: only the keys' SHA-256.\n"
    for entry in 'reader:"features:read"' \
                 'writer:"features:read", "features:write"' \
                 'operator:"admin", "features:read", "features:write"' \
                 'prometheus:"admin"'; do
        name=${entry%%:*}
        scopes=${entry#*:}
        key=$(random)
        keys_txt+="${name}=${key}\n"
        toml+="\n[[keys]]\nname = \"${name}\"\nscopes = [${scopes}]\nsha256 = \"$(sha256 "$key")\"\n"
        if [ "$name" = prometheus ]; then
            printf '%s' "$key" >deploy/secrets/prometheus-api-key
            # read by the prometheus container's user (nobody)
            chmod 644 deploy/secrets/prometheus-api-key
        fi
    done
    printf "$toml" >deploy/secrets/api-keys.toml
    chmod 644 deploy/secrets/api-keys.toml   # read by the API's user (uid 10001)
    printf "$keys_txt" >deploy/secrets/api-keys.txt
    echo "secrets: new API keys in deploy/secrets/api-keys.txt (the API keeps only their SHA-256):"
    sed 's/^/    /' deploy/secrets/api-keys.txt
    echo "secrets: use one as  curl -H \"Authorization: Bearer <key>\" http://localhost:8000/api/features/<id>/"
    echo "secrets: running replicas pick up a changed api-keys.toml by themselves (or on SIGHUP)"
else
    echo "secrets: deploy/secrets/api-keys.toml exists (keys in deploy/secrets/api-keys.txt; --rotate-keys for new ones)"
fi
