#!/usr/bin/env bash
# Everything docker-compose.yml (and a trial Kubernetes install) needs to run the broker with
# TLS and credentials, for trying it on one machine (never for production):
#   scripts/dev-secrets.sh DIR
# writes DIR/ca.crt and the broker's server.crt + server.key (scripts/dev-certs.sh; valid for
# localhost, 127.0.0.1, broker, broker-1, broker-2 and taskbroker), a bearer token per principal
# (DIR/worker.token, producer.token, admin.token) and DIR/policy.toml, which holds only the
# tokens' SHA-256: worker may consume, producer may produce and read, admin may do everything.
set -euo pipefail
dir=${1:?usage: scripts/dev-secrets.sh DIR}
here=$(cd "$(dirname "$0")" && pwd)
"$here/dev-certs.sh" "$dir" dev-client broker broker-1 broker-2 taskbroker >/dev/null
umask 077
cd "$dir"

token() {  # token NAME: a fresh random token in NAME.token; prints its SHA-256
  printf 'tbk_%s' "$(openssl rand -base64 32 | tr '+/' '-_' | tr -d '=\n')" >"$1.token"
  sha256sum "$1.token" | cut -d' ' -f1
}
{
  for name in worker producer admin; do
    printf '[[principals]]\nname = "%s"\ntoken_sha256 = ["%s"]\n\n' "$name" "$(token "$name")"
  done
  printf '[[grants]]\nprincipals = ["worker"]\nroles = ["consume"]\nqueues = ["*"]\n\n'
  printf '[[grants]]\nprincipals = ["producer"]\nroles = ["produce", "read"]\nqueues = ["*"]\n\n'
  printf '[[grants]]\nprincipals = ["admin"]\nroles = ["produce", "consume", "read", "admin"]\n'
  printf 'queues = ["*"]\n'
} >policy.toml
# The containers run as uid 10001: they must read what they mount.
chmod 644 ./*.crt policy.toml
chmod 644 server.key ./*.token
echo "wrote $dir: ca.crt, server.crt, server.key, policy.toml, worker/producer/admin.token"
