#!/usr/bin/env bash
# A local CA and certificates for trying TLS and mutual TLS on one machine (never for production):
#   scripts/dev-certs.sh DIR [CLIENT_NAME] [SERVER_NAME...]
# writes DIR/ca.crt, DIR/server.crt + server.key (valid for localhost, 127.0.0.1, ::1 and any
# SERVER_NAMEs) and DIR/client.crt + client.key (common name CLIENT_NAME, default dev-client).
# Keys are EC P-256, readable by the owner only; certificates last 30 days.
set -euo pipefail
dir=${1:?usage: scripts/dev-certs.sh DIR [CLIENT_NAME] [SERVER_NAME...]}
client=${2:-dev-client}
shift $(( $# >= 2 ? 2 : 1 ))
mkdir -p "$dir"
umask 077
cd "$dir"

san="DNS:localhost,IP:127.0.0.1,IP:::1"
for name in "$@"; do san="$san,DNS:$name"; done

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

key ca.key
openssl req -x509 -new -key ca.key -days 365 -subj "/CN=taskbroker dev CA" -out ca.crt \
  -addext "basicConstraints=critical,CA:TRUE,pathlen:0" -addext "keyUsage=critical,keyCertSign,cRLSign"

issue() {  # issue NAME COMMON_NAME EXTENSIONS
  key "$1.key"
  openssl req -new -key "$1.key" -subj "/CN=$2" -out "$1.csr"
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
    -extfile <(printf '%s\n' "$3") -out "$1.crt" 2>/dev/null
  rm "$1.csr"
}
issue server taskbroker "basicConstraints=CA:FALSE
extendedKeyUsage=serverAuth
subjectAltName=$san"
issue client "$client" "basicConstraints=CA:FALSE
extendedKeyUsage=clientAuth
subjectAltName=DNS:$client"
rm -f ca.srl
chmod 644 ./*.crt
echo "wrote $dir: ca.crt, server.crt, server.key, client.crt ($client), client.key"
