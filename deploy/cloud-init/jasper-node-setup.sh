#!/bin/bash
# First-boot setup of a Jasper node on EC2: packages, chrony on the Amazon Time Sync Service
# (plus the ENA PTP hardware clock where the instance has one), the Jasper package, the node's
# own one-time join token from SSM Parameter Store, the controller's TLS material, and the
# systemd units of the node's role.
#
# Control channel: every agent enrols with its join token (/etc/jasper/join-token, 0600) and
# keeps the credential it gets under its unit's StateDirectory (/var/lib/jasper). The
# controller host keeps a private CA in SSM (key: SecureString only its role may read), signs
# the controller's certificate for its private address with it, and publishes the CA
# certificate, which every other node fetches into /etc/jasper/controller-ca.pem (--ca-file).
#
# Inputs: /etc/jasper/deploy.env (written by the user data that Terraform renders) and the
# repository files the user data unpacked under /opt/jasper/{units,chrony}. Idempotent: a rerun
# converges to the same state. Runs as root from cloud-init; output lands in
# /var/log/cloud-init-output.log.
set -euo pipefail

DEPLOY_ENV=${JASPER_DEPLOY_ENV:-/etc/jasper/deploy.env}
STAGE=${JASPER_STAGE_DIR:-/opt/jasper}
VENV=/opt/jasper/venv
AWSCLI_VENV=/opt/jasper/awscli
CHRONY_INCLUDE_DIR=/etc/chrony/jasper.d # chrony.conf includes *.conf from here
IMDS=http://169.254.169.254
PTP_SYSFS=${JASPER_PTP_SYSFS:-/sys/class/ptp} # overridable so tests can present a PTP clock
DEV_DIR=${JASPER_DEV_DIR:-/dev}
JOIN_TOKEN_FILE=/etc/jasper/join-token
SEED_FILE=/etc/jasper/join-token-hashes.json # written by the controller's user data
CA_FILE=${JASPER_CA_FILE:-/etc/jasper/controller-ca.pem} # overridable for tests
TLS_DIR=/etc/jasper/tls

log() { printf 'jasper-setup: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

# shellcheck source=/dev/null
. "$DEPLOY_ENV"

: "${JASPER_ROLE:?deploy.env lacks JASPER_ROLE}"
: "${JASPER_NODE_NAME:?deploy.env lacks JASPER_NODE_NAME}"
: "${JASPER_PUBLISHER_NAME:?deploy.env lacks JASPER_PUBLISHER_NAME}"
: "${JASPER_PACKAGE:?deploy.env lacks JASPER_PACKAGE}"
: "${JASPER_CONTROLLER_URL:?deploy.env lacks JASPER_CONTROLLER_URL}"
: "${JASPER_CONTROLLER_ADDR:?deploy.env lacks JASPER_CONTROLLER_ADDR}"
: "${JASPER_CONTROLLER_PORT:?deploy.env lacks JASPER_CONTROLLER_PORT}"
: "${JASPER_JOIN_TOKEN_PARAMETER:?deploy.env lacks JASPER_JOIN_TOKEN_PARAMETER}"
: "${JASPER_ADMIN_TOKEN_PARAMETER:?deploy.env lacks JASPER_ADMIN_TOKEN_PARAMETER}"
: "${JASPER_CA_CERT_PARAMETER:?deploy.env lacks JASPER_CA_CERT_PARAMETER}"
: "${JASPER_CA_KEY_PARAMETER:?deploy.env lacks JASPER_CA_KEY_PARAMETER}"
: "${JASPER_RELAY_PORT:?deploy.env lacks JASPER_RELAY_PORT}"
: "${JASPER_RECEIVER_PORT_BASE:?deploy.env lacks JASPER_RECEIVER_PORT_BASE}"
: "${JASPER_ENDPOINTS:?deploy.env lacks JASPER_ENDPOINTS}"
: "${JASPER_FAST_PATH:?deploy.env lacks JASPER_FAST_PATH}"
: "${JASPER_PUBLISHER_STREAM:?deploy.env lacks JASPER_PUBLISHER_STREAM}"
: "${JASPER_PUBLISHER_RATE:?deploy.env lacks JASPER_PUBLISHER_RATE}"
: "${JASPER_UNITS:?deploy.env lacks JASPER_UNITS}"
: "${JASPER_PROBE_PORTS:?deploy.env lacks JASPER_PROBE_PORTS}"

case "$JASPER_ROLE" in
controller | relay | receiver) ;;
*) die "unknown role '$JASPER_ROLE'" ;;
esac

# Retry a command a few times: IAM credentials, package mirrors and PyPI can lag right after
# boot.
retry() {
	local attempts=$1 delay=$2 n=1
	shift 2
	until "$@"; do
		if [ "$n" -ge "$attempts" ]; then
			return 1
		fi
		log "retrying ($n/$attempts): $1"
		sleep "$delay"
		n=$((n + 1))
	done
}

# The kernel fast path compiles its programs on the node. Each package is tried on its own,
# since names differ between distributions (Ubuntu 22.04 has no bpftool package); without
# them the daemons fall back to the user-space path (fast_path = auto).
install_optional() {
	local args=() pkg
	while [ "$1" != -- ]; do
		args+=("$1")
		shift
	done
	shift
	for pkg in "$@"; do
		"${args[@]}" "$pkg" || log "optional package $pkg not installed"
	done
}

install_packages() {
	if command -v apt-get >/dev/null 2>&1; then
		export DEBIAN_FRONTEND=noninteractive
		retry 5 10 apt-get update -qq
		retry 3 10 apt-get install -y -qq --no-install-recommends \
			chrony curl ca-certificates openssl python3 python3-venv python3-pip iproute2 ethtool
		if [ "$JASPER_ROLE" != controller ]; then
			install_optional apt-get install -y -qq --no-install-recommends -- \
				clang llvm libbpf-dev bpftool
		fi
	elif command -v dnf >/dev/null 2>&1; then
		retry 3 10 dnf install -y -q chrony openssl python3.11 python3.11-pip iproute ethtool
		command -v curl >/dev/null 2>&1 || retry 3 10 dnf install -y -q curl-minimal
		if [ "$JASPER_ROLE" != controller ]; then
			install_optional dnf install -y -q -- clang llvm libbpf-devel bpftool
		fi
	else
		die "neither apt-get nor dnf found: use Debian 12, Ubuntu 22.04/24.04 or Amazon Linux 2023"
	fi
}

# Jasper needs Python 3.11 or later; the distributions name it differently.
find_python() {
	local candidate
	for candidate in python3.13 python3.12 python3.11 python3; do
		if command -v "$candidate" >/dev/null 2>&1 &&
			"$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
			command -v "$candidate"
			return 0
		fi
	done
	return 1
}

imds_token() {
	curl -fsS -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 600' "$IMDS/latest/api/token"
}

imds_get() {
	curl -fsS -H "X-aws-ec2-metadata-token: $IMDS_TOKEN" "$IMDS/latest/meta-data/$1"
}

create_user() {
	if ! id jasper >/dev/null 2>&1; then
		local nologin
		nologin=$(command -v nologin || echo /bin/false)
		useradd --system --user-group --home-dir /var/lib/jasper --shell "$nologin" jasper
	fi
	install -d -m 0750 -o jasper -g jasper /var/lib/jasper
	install -d -m 0755 /etc/jasper
}

tune_kernel() {
	# Large fan-outs overflow the default neighbour table (gc_thresh3 = 1024); bursts of
	# market data need larger socket buffers than the defaults. Latency probers bind
	# ephemeral ports, which the security group opens to the VPC for exactly this range.
	cat >/etc/sysctl.d/60-jasper.conf <<SYSCTL
net.ipv4.ip_local_port_range = $JASPER_PROBE_PORTS
net.core.rmem_max = 33554432
net.core.wmem_max = 33554432
net.core.rmem_default = 4194304
net.core.wmem_default = 4194304
net.core.netdev_max_backlog = 10000
net.ipv4.neigh.default.gc_thresh1 = 4096
net.ipv4.neigh.default.gc_thresh2 = 8192
net.ipv4.neigh.default.gc_thresh3 = 16384
SYSCTL
	sysctl -q -p /etc/sysctl.d/60-jasper.conf || log "some sysctl settings were not applied"
}

check_ena() {
	local iface driver
	iface=$(ip -o -4 route show default | awk '{print $5; exit}')
	driver=$(ethtool -i "$iface" 2>/dev/null | awk '/^driver:/ {print $2}')
	if [ "$driver" != ena ]; then
		log "warning: $iface uses driver '${driver:-unknown}', not ena: enhanced networking is off"
	fi
}

# The ENA PTP hardware clock, if the instance exposes one: prefer a clock the ENA driver
# registered, else /dev/ptp0.
find_phc() {
	local dev name
	for dev in "$PTP_SYSFS"/ptp*; do
		[ -e "$dev/clock_name" ] || continue
		name=$(cat "$dev/clock_name")
		case "$name" in
		*ena*)
			echo "$DEV_DIR/$(basename "$dev")"
			return 0
			;;
		esac
	done
	if [ -e "$DEV_DIR/ptp0" ]; then
		echo "$DEV_DIR/ptp0"
		return 0
	fi
	return 1
}

configure_chrony() {
	local conf phc
	if [ -d /etc/chrony ]; then
		conf=/etc/chrony/chrony.conf # Debian, Ubuntu
	else
		conf=/etc/chrony.conf # Amazon Linux
	fi
	if [ -f "$conf" ] && [ ! -f "$conf.orig" ]; then
		cp -p "$conf" "$conf.orig"
	fi
	install -m 0644 "$STAGE/chrony/chrony.conf" "$conf"
	install -d -m 0755 "$CHRONY_INCLUDE_DIR"

	# Newer ENA drivers expose the PHC only with phc_enable=1; it takes effect on the next
	# load of the driver (reboot), so the first boot may run on the Time Sync Service alone.
	if lsmod 2>/dev/null | grep -q '^ena '; then
		echo 'options ena phc_enable=1' >/etc/modprobe.d/jasper-ena-phc.conf
	fi
	rm -f "$CHRONY_INCLUDE_DIR/jasper-phc.conf"
	if phc=$(find_phc); then
		sed "s#/dev/ptp0#$phc#" "$STAGE/chrony/jasper-phc.conf" >"$CHRONY_INCLUDE_DIR/jasper-phc.conf"
		log "chrony: PTP hardware clock $phc as preferred refclock"
	else
		log "chrony: no PTP hardware clock; Amazon Time Sync Service at 169.254.169.123 only"
	fi

	local service=chrony
	if ! systemctl cat chrony.service >/dev/null 2>&1; then
		service=chronyd
	fi
	systemctl enable "$service"
	systemctl restart "$service"
	# chrony-wait holds time-sync.target until the clock is synchronized, so the daemons
	# (ordered after time-sync.target) never stamp deadlines from an unsynchronized clock.
	if systemctl cat chrony-wait.service >/dev/null 2>&1; then
		systemctl enable chrony-wait.service
	fi
	chronyc waitsync 60 0.001 0 1 || log "warning: chrony not yet synchronized"
}

install_jasper() {
	local python
	python=$(find_python) || die "no Python 3.11 or later found"
	if [ ! -x "$VENV/bin/python" ]; then
		"$python" -m venv "$VENV"
	fi
	retry 3 10 "$VENV/bin/pip" install -q --upgrade pip
	retry 3 10 "$VENV/bin/pip" install -q "$JASPER_PACKAGE"
	"$VENV/bin/jasper" --help >/dev/null
}

install_aws_cli() {
	if command -v aws >/dev/null 2>&1; then
		command -v aws
		return 0
	fi
	local python
	python=$(find_python) || die "no Python 3.11 or later found"
	if [ ! -x "$AWSCLI_VENV/bin/aws" ]; then
		"$python" -m venv "$AWSCLI_VENV"
		retry 3 10 "$AWSCLI_VENV/bin/pip" install -q awscli >&2
	fi
	echo "$AWSCLI_VENV/bin/aws"
}

# Prints the decrypted value of an SSM parameter. Exit status 3: the parameter does not exist;
# 1: any other failure (no permission, no network, the role not usable yet).
ssm_lookup() {
	local name=$1 err out status=0
	err=$(mktemp)
	out=$("$AWS" ssm get-parameter --region "$REGION" --name "$name" --with-decryption \
		--query Parameter.Value --output text 2>"$err") || status=$?
	if [ "$status" -eq 0 ]; then
		rm -f "$err"
		printf '%s\n' "$out"
		return 0
	fi
	if grep -q ParameterNotFound "$err"; then
		status=3
	else
		status=1
		cat "$err" >&2
	fi
	rm -f "$err"
	return "$status"
}

# ssm_lookup with retries over transient failures (the instance role may take a few seconds
# to become usable after launch); a missing parameter is an answer, not a failure.
ssm_lookup_retry() {
	local name=$1 n status
	for n in $(seq 1 20); do
		status=0
		ssm_lookup "$name" || status=$?
		case "$status" in
		0 | 3) return "$status" ;;
		esac
		log "retrying ($n/20): read SSM parameter $name"
		sleep 6
	done
	return 1
}

ssm_put() {
	local name=$1 type=$2 file=$3
	shift 3
	# file:// keeps the value (a private key) off the command line.
	"$AWS" ssm put-parameter --region "$REGION" --name "$name" --type "$type" \
		--value "file://$file" "$@" >/dev/null
}

# Prints the decrypted value of an SSM SecureString parameter holding a token.
read_parameter() {
	local name=$1 value
	value=$(ssm_lookup_retry "$name") ||
		die "cannot read SSM parameter $name (does it exist, and may this role read it?)"
	# Tokens go into EnvironmentFile= lines and files as they are; refuse anything that would
	# need quoting there.
	if ! [[ $value =~ ^[A-Za-z0-9._~+/=-]{32,}$ ]]; then
		die "SSM parameter $name must hold at least 32 characters of [A-Za-z0-9._~+/=-]"
	fi
	printf '%s' "$value"
}

# write_secret PATH MODE OWNER:GROUP CONTENT: the file is created with its final mode and
# owner before the secret goes in.
write_secret() {
	local path=$1 mode=$2 owner=$3 content=$4
	install -m "$mode" -o "${owner%%:*}" -g "${owner##*:}" /dev/null "$path"
	printf '%s\n' "$content" >"$path"
}

# ---------------------------------------------------------------------------------------------
# TLS: a private CA and the controller's certificate (openssl; the deployment's Terraform has
# no tls provider, so the controller host makes them at first boot)
# ---------------------------------------------------------------------------------------------

# make_ca_key DIR: a new EC P-256 key for the CA, DIR/ca.key (0600).
make_ca_key() {
	(umask 077 && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1/ca.key")
}

# make_ca_cert DIR: the CA's self-signed certificate (10 years) for DIR/ca.key, DIR/ca.pem.
make_ca_cert() {
	local dir=$1
	cat >"$dir/ca.cnf" <<CACNF
[req]
distinguished_name = dn
prompt = no
x509_extensions = v3_ca
[dn]
CN = Jasper controller CA ($JASPER_PUBLISHER_NAME)
[v3_ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
CACNF
	openssl req -x509 -new -config "$dir/ca.cnf" -key "$dir/ca.key" -sha256 -days 3650 \
		-set_serial "0x$(openssl rand -hex 16)" -out "$dir/ca.pem"
}

# make_controller_cert CA_DIR OUT_DIR NAME...: OUT_DIR/controller.key and controller.crt
# (2 years), signed by the CA in CA_DIR, valid for every NAME: IPv4/IPv6 literals become IP
# subject alternative names, anything else a DNS name. Empty names are skipped.
make_controller_cert() {
	local ca=$1 out=$2 san="" name
	shift 2
	for name in "$@"; do
		[ -n "$name" ] || continue
		if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then
			san+="${san:+, }IP:$name"
		else
			san+="${san:+, }DNS:$name"
		fi
	done
	[ -n "$san" ] || die "make_controller_cert: no address to certify"
	cat >"$ca/leaf.cnf" <<LEAFCNF
[req]
distinguished_name = dn
prompt = no
[dn]
CN = $1
[v3_leaf]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = $san
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
LEAFCNF
	(umask 077 && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 \
		-out "$out/controller.key")
	openssl req -new -config "$ca/leaf.cnf" -key "$out/controller.key" -out "$ca/controller.csr"
	openssl x509 -req -in "$ca/controller.csr" -CA "$ca/ca.pem" -CAkey "$ca/ca.key" \
		-set_serial "0x$(openssl rand -hex 16)" -days 730 -sha256 \
		-extfile "$ca/leaf.cnf" -extensions v3_leaf -out "$out/controller.crt"
}

# True when the certificate FILE is for the private key KEY.
cert_matches_key() {
	[ "$(openssl x509 -noout -pubkey -in "$1" 2>/dev/null)" = "$(openssl pkey -pubout -in "$2")" ]
}

# ensure_ca DIR: the deployment's CA into DIR (ca.key, ca.pem). The CA lives in SSM, so that
# a rebuilt controller host signs with the same CA and the nodes' copies of its certificate
# stay valid: the key as a SecureString only the controller's role may read or write, the
# certificate as a String every node may read. Made here on the first boot of the first
# controller host.
ensure_ca() {
	local dir=$1 key cert status=0
	key=$(ssm_lookup_retry "$JASPER_CA_KEY_PARAMETER") || status=$?
	if [ "$status" -eq 0 ] && [[ $key == "-----BEGIN PRIVATE KEY-----"* ]]; then
		(umask 077 && printf '%s\n' "$key" >"$dir/ca.key")
		log "TLS: CA key from $JASPER_CA_KEY_PARAMETER"
	elif [ "$status" -eq 3 ]; then
		make_ca_key "$dir"
		ssm_put "$JASPER_CA_KEY_PARAMETER" SecureString "$dir/ca.key" ||
			die "cannot store the CA key in SSM parameter $JASPER_CA_KEY_PARAMETER"
		log "TLS: new CA key stored in $JASPER_CA_KEY_PARAMETER"
	elif [ "$status" -eq 0 ]; then
		die "SSM parameter $JASPER_CA_KEY_PARAMETER holds no PEM private key"
	else
		die "cannot read SSM parameter $JASPER_CA_KEY_PARAMETER (may this role read it?)"
	fi
	status=0
	cert=$(ssm_lookup_retry "$JASPER_CA_CERT_PARAMETER") || status=$?
	if [ "$status" -eq 0 ]; then
		printf '%s\n' "$cert" >"$dir/ca.pem"
	fi
	if [ "$status" -ne 0 ] || ! cert_matches_key "$dir/ca.pem" "$dir/ca.key"; then
		make_ca_cert "$dir"
		ssm_put "$JASPER_CA_CERT_PARAMETER" String "$dir/ca.pem" --overwrite ||
			die "cannot publish the CA certificate in SSM parameter $JASPER_CA_CERT_PARAMETER"
		log "TLS: CA certificate published in $JASPER_CA_CERT_PARAMETER"
	fi
}

# The controller's certificate, for the address the agents use (JASPER_CONTROLLER_ADDR, the
# host in JASPER_CONTROLLER_URL), the instance's private DNS name and, when it has one, its
# public address (operators from admin_cidrs).
setup_controller_tls() {
	local work
	work=$(mktemp -d)
	ensure_ca "$work"
	install -d -m 0750 -o root -g jasper "$TLS_DIR"
	make_controller_cert "$work" "$work" "$JASPER_CONTROLLER_ADDR" "$PRIVATE_DNS" "$PUBLIC_IP"
	install -m 0640 -o root -g jasper "$work/controller.key" "$TLS_DIR/controller.key"
	install -m 0644 "$work/controller.crt" "$TLS_DIR/controller.crt"
	install -m 0644 "$work/ca.pem" "$CA_FILE"
	rm -rf "$work"
}

# Every other node: the CA certificate the controller host publishes, once it has. The
# controller may still be installing, so wait for it (bounded).
fetch_ca_cert() {
	local n cert status
	for n in $(seq 1 120); do
		status=0
		cert=$(ssm_lookup "$JASPER_CA_CERT_PARAMETER") || status=$?
		if [ "$status" -eq 0 ] && [[ $cert == "-----BEGIN CERTIFICATE-----"* ]]; then
			install -m 0644 /dev/null "$CA_FILE"
			printf '%s\n' "$cert" >"$CA_FILE"
			openssl x509 -noout -in "$CA_FILE" || die "$JASPER_CA_CERT_PARAMETER holds no certificate"
			return 0
		fi
		log "waiting for the controller's CA certificate in $JASPER_CA_CERT_PARAMETER ($n/120)"
		sleep 10
	done
	die "no CA certificate in SSM parameter $JASPER_CA_CERT_PARAMETER after 20 minutes: is the controller host up?"
}

write_node_env() {
	cat >/etc/jasper/node.env <<NODEENV
JASPER_CONTROLLER_URL=$JASPER_CONTROLLER_URL
JASPER_CONTROLLER_PORT=$JASPER_CONTROLLER_PORT
JASPER_NODE_NAME=$JASPER_NODE_NAME
JASPER_PUBLISHER_NAME=$JASPER_PUBLISHER_NAME
JASPER_DATA_ADDR=$DATA_ADDR
JASPER_RELAY_PORT=$JASPER_RELAY_PORT
JASPER_RECEIVER_PORT_BASE=$JASPER_RECEIVER_PORT_BASE
JASPER_ENDPOINTS=$JASPER_ENDPOINTS
JASPER_FAST_PATH=$JASPER_FAST_PATH
JASPER_PUBLISHER_STREAM=$JASPER_PUBLISHER_STREAM
JASPER_PUBLISHER_RATE=$JASPER_PUBLISHER_RATE
NODEENV
	chmod 0644 /etc/jasper/node.env
}

start_units() {
	local units unit
	read -r -a units <<<"$JASPER_UNITS"
	for unit in "${units[@]}"; do
		install -m 0644 "$STAGE/units/$unit" "/etc/systemd/system/$unit"
	done
	systemctl daemon-reload
	for unit in "${units[@]}"; do
		systemctl enable "$unit"
		systemctl restart "$unit"
		log "started $unit"
	done
}

main() {
	log "node $JASPER_NODE_NAME, role $JASPER_ROLE, controller $JASPER_CONTROLLER_URL"
	install_packages
	create_user
	tune_kernel
	check_ena
	configure_chrony

	IMDS_TOKEN=$(retry 5 2 imds_token)
	DATA_ADDR=$(retry 5 2 imds_get local-ipv4)
	REGION=$(retry 5 2 imds_get placement/region)
	# Names the controller's certificate carries besides its private address (the IMDS token
	# is short-lived: read them now). No public address: empty.
	PRIVATE_DNS=$(imds_get local-hostname || true)
	PUBLIC_IP=$(imds_get public-ipv4 2>/dev/null || true)

	AWS=$(install_aws_cli)
	# Assignments, not arguments: a failed read then stops the script (set -e).
	local join_token admin_token
	join_token=$(read_parameter "$JASPER_JOIN_TOKEN_PARAMETER")
	if [ "$JASPER_ROLE" = controller ]; then
		# On the controller host the join token is the publisher's, which runs as jasper.
		write_secret "$JOIN_TOKEN_FILE" 0600 jasper:jasper "$join_token"
		admin_token=$(read_parameter "$JASPER_ADMIN_TOKEN_PARAMETER")
		write_secret /etc/jasper/controller.env 0640 root:jasper \
			"$(printf 'JASPER_ADMIN_TOKEN=%s' "$admin_token")"
		[ -s "$SEED_FILE" ] || die "$SEED_FILE (the nodes' join token hashes) is missing"
		setup_controller_tls
	else
		write_secret "$JOIN_TOKEN_FILE" 0600 root:root "$join_token"
	fi

	install_jasper
	if [ "$JASPER_ROLE" != controller ]; then
		fetch_ca_cert
	fi
	write_node_env
	start_units
	touch /var/lib/jasper/setup-done
	log "done"
}

# Sourcing the script (tests) defines the functions without running anything.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
	main "$@"
fi
