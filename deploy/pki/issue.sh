#!/bin/sh
# Issues a certificate from the CA made by make-ca.sh (issue #16; README "Securing a deployment"):
#   issue.sh DIR NAME [SAN ...]   ->  DIR/NAME.pem (certificate) and DIR/NAME.key (its key, mode 0600)
# NAME is the certificate's CN: a device's device_id (the broker's use_identity_as_username and the
# cloud's mTLS check read it), `backhaul-cloud` for the cloud, or the broker's host name. SANs are
# `DNS:name` or `IP:address`; without any, `DNS:NAME`. X.509 v3, ECDSA P-256, valid 825 days,
# usable as a TLS server and client certificate. Needs openssl. Run by tests/tests/tls.rs.
set -eu
dir=${1:?usage: issue.sh DIR NAME [SAN ...]}
name=${2:?usage: issue.sh DIR NAME [SAN ...]}
shift 2
san=""
for s in "$@"; do san="${san:+$san,}$s"; done
[ -n "$san" ] || san="DNS:$name"
[ -e "$dir/ca.key" ] || { echo "issue.sh: no CA in $dir: run make-ca.sh $dir first" >&2; exit 1; }
umask 077
ext="$dir/$name.ext"
printf 'subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n' "$san" > "$ext"
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$name" \
    -keyout "$dir/$name.key" -out "$dir/$name.csr" 2>/dev/null
openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 825 -extfile "$ext" -out "$dir/$name.pem" 2>/dev/null
rm -f "$dir/$name.csr" "$ext"
chmod 644 "$dir/$name.pem"
echo "certificate: $dir/$name.pem (key $dir/$name.key) for CN=$name, $san"
