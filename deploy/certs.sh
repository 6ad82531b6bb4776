#!/bin/sh
# fedq-certs: a federation CA and its certificates, with openssl only.
#
#   certs.sh ca    DIR [CA-NAME]        create DIR/ca.pem and DIR/ca.key (once)
#   certs.sh issue DIR ROLE NAME [ALSO...]
#                                       create DIR/NAME.pem and DIR/NAME.key,
#                                       signed by DIR/ca.pem / DIR/ca.key
#
# ROLE is node, analyst or auditor; it goes into the subject's OU and NAME
# into its CN, which is how every fedq-node identifies a caller. A node
# certificate carries NAME (its node.name in node.toml) as its one subject
# alternative name, so coordinators verify it by name, and serverAuth only
# (a node key cannot query other nodes); ALSO adds more DNS names or IP
# addresses (e.g. localhost) to a node certificate, only when asked for.
# Client certificates carry clientAuth only. Keys are ECDSA P-256 (PKCS#8),
# readable by their owner only from creation (umask 077).
#
# Whoever runs the federation CA keeps DIR/ca.key offline; partners send a
# name, receive NAME.pem, NAME.key (or sign their own CSR, see README) and
# ca.pem. Exit codes: 0 done, 1 error, 2 bad usage.
set -eu
umask 077

usage() {
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

check_name() {
    case "$1" in
        "" | *[!A-Za-z0-9@._-]*)
            echo "certs.sh: name '$1' may use only letters, digits, '@', '.', '_' and '-'" >&2
            exit 1 ;;
    esac
}

[ $# -ge 2 ] || usage
cmd=$1
dir=$2
mkdir -p "$dir"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

case "$cmd" in
ca)
    name=${3:-fedq federation CA}
    if [ -e "$dir/ca.pem" ] || [ -e "$dir/ca.key" ]; then
        echo "certs.sh: $dir/ca.pem already exists; keeping it" >&2
        exit 0
    fi
    cat > "$tmp/ca.cnf" <<CNF
[req]
distinguished_name = dn
x509_extensions = v3_ca
prompt = no
[dn]
O = fedq federation
OU = ca
CN = $name
[v3_ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
CNF
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dir/ca.key"
    openssl req -new -x509 -config "$tmp/ca.cnf" -key "$dir/ca.key" -sha256 \
        -days 3650 -out "$dir/ca.pem"
    chmod 0644 "$dir/ca.pem"
    echo "created $dir/ca.pem (keep $dir/ca.key offline)" >&2
    ;;
issue)
    [ $# -ge 4 ] || usage
    role=$3
    name=$4
    shift 4
    check_name "$name"
    also=""
    for extra in "$@"; do
        case "$extra" in
            *:*)  # an IPv6 address
                case "$extra" in
                    *[!0-9A-Fa-f:]*)
                        echo "certs.sh: '$extra' is not an IPv6 address" >&2
                        exit 1 ;;
                esac
                also="$also, IP:$extra" ;;
            *[!0-9.]*)  # a DNS name
                check_name "$extra"
                also="$also, DNS:$extra" ;;
            *)  # an IPv4 address
                also="$also, IP:$extra" ;;
        esac
    done
    [ -e "$dir/ca.pem" ] && [ -e "$dir/ca.key" ] || {
        echo "certs.sh: no CA in $dir; run: certs.sh ca $dir" >&2
        exit 1
    }
    case "$role" in
        node)
            eku="serverAuth"
            san="subjectAltName = DNS:$name$also" ;;
        analyst | auditor)
            [ -z "$also" ] || {
                echo "certs.sh: extra names are for node certificates only" >&2
                exit 1
            }
            eku="clientAuth"
            san="" ;;
        *)
            echo "certs.sh: role must be node, analyst or auditor, not '$role'" >&2
            exit 1 ;;
    esac
    if [ -e "$dir/$name.pem" ]; then
        echo "certs.sh: $dir/$name.pem already exists; keeping it" >&2
        exit 0
    fi
    cat > "$tmp/ext.cnf" <<CNF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = $eku
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
$san
CNF
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dir/$name.key"
    openssl req -new -key "$dir/$name.key" -subj "/O=fedq federation/OU=$role/CN=$name" \
        -out "$tmp/req.csr"
    openssl x509 -req -in "$tmp/req.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
        -set_serial "0x$(openssl rand -hex 16)" -days 365 -sha256 \
        -extfile "$tmp/ext.cnf" -out "$dir/$name.pem" 2>/dev/null
    chmod 0644 "$dir/$name.pem"
    echo "issued $dir/$name.pem ($role $name, valid 365 days)" >&2
    ;;
*)
    usage ;;
esac
