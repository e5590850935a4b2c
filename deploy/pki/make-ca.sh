#!/bin/sh
# Makes a private CA for a backhaul deployment (issue #16; README "Securing a deployment"):
#   DIR/ca.key  the CA's private key: keep it offline, it signs every certificate
#   DIR/ca.pem  the CA's certificate: give it to the broker, the cloud and every edge (ca_file)
# ECDSA P-256, valid 10 years. Needs openssl. Refuses to overwrite an existing CA.
# Run by tests/tests/tls.rs on every test run.
set -eu
dir=${1:?usage: make-ca.sh DIR}
if [ -e "$dir/ca.key" ]; then
    echo "make-ca.sh: $dir/ca.key exists; not overwriting a CA (certificates it signed would stop working)" >&2
    exit 1
fi
mkdir -p "$dir"
umask 077
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
    -subj "/CN=backhaul private CA" -keyout "$dir/ca.key" -out "$dir/ca.pem" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
chmod 644 "$dir/ca.pem"
echo "CA: $dir/ca.pem (key $dir/ca.key: keep it offline)"
