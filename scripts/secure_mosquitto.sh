#!/usr/bin/env bash
# Makes what the shipped mosquitto.conf expects in DIR: a local certificate authority, the
# broker's TLS certificate for HOST, and the dynamic-security file with the cloud's identity
# (the plugin's admin: the cloud creates every other identity through it).
#
#   bash scripts/secure_mosquitto.sh /etc/mosquitto/fedmq broker.example.org [--client NAME ...]
#
# Writes DIR/ca.crt, ca.key (keep it off the broker if you can), server.crt, server.key,
# dynamic-security.json, cloud.password; with --client NAME also NAME.crt/NAME.key, a client
# certificate from the same CA (for require_certificate true). Prints the cloud's broker URL.
# Needs openssl and mosquitto_ctrl (Debian's mosquitto-clients). Refuses to overwrite a CA.
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,11p' "$0" >&2; exit 2; }
dir=$1 host=$2; shift 2
clients=()
while [ $# -gt 0 ]; do
  case "$1" in
    --client) clients+=("$2"); shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
command -v openssl >/dev/null || { echo "openssl is needed" >&2; exit 1; }
command -v mosquitto_ctrl >/dev/null || { echo "mosquitto_ctrl is needed: apt-get install -y mosquitto-clients" >&2; exit 1; }
mkdir -p "$dir" && cd "$dir"
[ -e ca.key ] && { echo "$dir already has a CA (ca.key); remove it to start over" >&2; exit 1; }
umask 077
days=825
openssl req -x509 -newkey rsa:3072 -nodes -keyout ca.key -out ca.crt -days 3650 -subj "/CN=fedmq local CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
sign() {  # name, subject, extensions
  openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
  printf '%s\n' "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$1.crt" -days $days \
    -extfile "$1.ext" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
sign server "/CN=$host" "subjectAltName=DNS:$host,DNS:localhost,IP:127.0.0.1
extendedKeyUsage=serverAuth"
for name in "${clients[@]}"; do
  sign "$name" "/CN=$name" "extendedKeyUsage=clientAuth"
done
password=$(openssl rand -base64 24 | tr -d '/+=' | cut -c1-24)
mosquitto_ctrl dynsec init dynamic-security.json cloud "$password" >/dev/null
printf '%s\n' "$password" > cloud.password
chmod 644 ca.crt server.crt
# Mosquitto (user mosquitto) must read its key and the identities file.
if id mosquitto >/dev/null 2>&1; then chown mosquitto server.key dynamic-security.json 2>/dev/null || true; fi
echo "made in $dir: ca.crt server.crt server.key dynamic-security.json cloud.password ${clients[*]/%/.crt}" >&2
echo "the cloud: fedmq --broker 'mqtts://cloud:$password@$host:8883?ca=$dir/ca.crt' cloud --dynsec ..." >&2
echo "mqtts://cloud:$password@$host:8883?ca=$dir/ca.crt"
