#!/bin/sh
# pv-attest: a guest attests itself through its vTPM to the tenant's key broker
# (`paravisor kbs serve`, request "guest-key") and gets the disk secret, unwrapped inside
# the TPM. POSIX sh over Debian's tpm2-tools and busybox (nc, xxd, timeout, tr, sed).
#
#   pv-attest --kbs HOST:PORT --secret-out FILE [--pcrs 0,1,2,3,4,5,6,7,8,9]
#             [--ak 0x81000003] [--work DIR]
#
#   exit 0   the secret was released and written to FILE (mode 0600)
#   exit 3   refused: "pv-attest: refused: <check>: <message>" on stderr
#   exit 75  retryable (broker unreachable, connection cut, TPM busy, nonce expired...):
#            "pv-attest: retryable: <why>"
#   exit 1   anything else (bad arguments, a tool missing), with a message
#
# The TPM is reached through tpm2-tools' default TCTI (/dev/tpmrm0 in the guest; set
# TPM2TOOLS_TCTI to use another, e.g. mssim:host=127.0.0.1,port=2321).
#
# Steps (docs/attestation.md, "Key broker", has the protocol):
#   1. {"request":"challenge"} -> a 32-byte nonce.
#   2. tpm2_nvread 0x01400001 (the SNP report) and 0x01400002 (the runtime claims, whose
#      SHA-256 is the report's report_data; they carry the AK as "HCLAkPub").
#   3. A transfer key: an RSA-2048 decrypt key made in the TPM (fixedtpm|fixedparent|
#      sensitivedataorigin) under an ECC primary of the null hierarchy: its private part
#      leaves the TPM only wrapped under that parent, whose seed the TPM replaces at every
#      reset, and that blob goes with the work directory.
#   4. tpm2_certifycreation by the AK over the nonce: the TPM says it made that key.
#      (tpm2-tools 5.4's tpm2_certify cannot set qualifying data, so it could not carry the
#      nonce; the broker accepts either.)
#   5. tpm2_quote by the AK over the nonce and the PCRs (sha256 bank), values as `-F values`.
#   6. One guest-key line to the broker with all of it (hex); the reply is the secret
#      wrapped to the transfer key (RSA-OAEP SHA-256), or a refusal naming its check.
#   7. tpm2_rsadecrypt -s oaep inside the TPM, into FILE.
#
# Each step is a function, so a test can source this file and drive hostile variants:
#   PV_ATTEST_LIB=1 . pv-attest.sh
#   pv_args --kbs ... --secret-out ... --work DIR   # then, in order, what it wants of:
#   pv_setup; pv_challenge; pv_read_evidence; pv_transfer_key; pv_certify; pv_quote;
#   pv_request; pv_send; pv_reply; pv_unwrap
# (pv_attest_main runs them all). Evidence files live in the work directory: nonce.hex,
# report.bin, claims.json, transfer.pub, certify.attest, certify.sig, quote.msg, quote.sig,
# quote.pcrs, request.json, reply.json, wrapped.bin.

PV_PROG=pv-attest
# Seconds for one exchange with the broker (connect, send, reply).
PV_EXCHANGE_TIMEOUT=${PV_EXCHANGE_TIMEOUT:-30}
# The evidence indices pv-vtpm writes.
PV_REPORT_INDEX=0x01400001
PV_CLAIMS_INDEX=0x01400002
# The tools this script needs.
PV_TOOLS="tpm2_nvread tpm2_createprimary tpm2_create tpm2_load tpm2_certifycreation
tpm2_quote tpm2_rsadecrypt tpm2_flushcontext tpm2_getcap nc xxd timeout tr sed grep tail
dirname mktemp"

# pv_die CODE MESSAGE: the message on stderr, in the form the exit code calls for; exits.
pv_die() {
	pv_code=$1
	shift
	case $pv_code in
	3) echo "$PV_PROG: refused: $*" >&2 ;;
	75) echo "$PV_PROG: retryable: $*" >&2 ;;
	*) echo "$PV_PROG: $*" >&2 ;;
	esac
	exit "$pv_code"
}

PV_USAGE="usage: $PV_PROG --kbs HOST:PORT --secret-out FILE [--pcrs 0,1,2,3,4,5,6,7,8,9] [--ak 0x81000003] [--work DIR]"

# pv_usage CODE: the usage line (on stdout for --help, else on stderr); exits.
pv_usage() {
	if [ "$1" -eq 0 ]; then
		echo "$PV_USAGE"
	else
		echo "$PV_USAGE" >&2
	fi
	exit "$1"
}

# pv_args ARGS...: sets PV_KBS, PV_HOST, PV_PORT, PV_SECRET_OUT, PV_PCRS, PV_AK, PV_WORK.
pv_args() {
	PV_KBS=
	PV_SECRET_OUT=
	PV_PCRS=0,1,2,3,4,5,6,7,8,9
	PV_AK=0x81000003
	PV_WORK=
	while [ $# -gt 0 ]; do
		case $1 in
		--kbs | --secret-out | --pcrs | --ak | --work)
			[ $# -ge 2 ] || pv_die 1 "$1 needs a value"
			case $1 in
			--kbs) PV_KBS=$2 ;;
			--secret-out) PV_SECRET_OUT=$2 ;;
			--pcrs) PV_PCRS=$2 ;;
			--ak) PV_AK=$2 ;;
			--work) PV_WORK=$2 ;;
			esac
			shift 2
			;;
		-h | --help) pv_usage 0 ;;
		*) pv_die 1 "unknown argument \"$1\" (--help for usage)" ;;
		esac
	done
	[ -n "$PV_KBS" ] || pv_die 1 "--kbs HOST:PORT is required"
	[ -n "$PV_SECRET_OUT" ] || pv_die 1 "--secret-out FILE is required"
	PV_PORT=${PV_KBS##*:}
	PV_HOST=${PV_KBS%:*}
	# [::1]:8700 -> ::1
	PV_HOST=${PV_HOST#\[}
	PV_HOST=${PV_HOST%\]}
	case $PV_PORT in
	'' | *[!0-9]*) pv_die 1 "--kbs \"$PV_KBS\" is not HOST:PORT" ;;
	esac
	if [ -z "$PV_HOST" ] || [ "$PV_HOST" = "$PV_KBS" ]; then
		pv_die 1 "--kbs \"$PV_KBS\" is not HOST:PORT"
	fi
	case $PV_PCRS in
	'' | *[!0-9,]* | ,* | *, | *,,*) pv_die 1 "--pcrs \"$PV_PCRS\" is not a list of PCR numbers such as 0,1,7" ;;
	esac
	case $PV_AK in
	0x[0-9a-fA-F]*) ;;
	*) pv_die 1 "--ak \"$PV_AK\" is not a handle such as 0x81000003" ;;
	esac
}

# pv_setup: checks the tools, makes the work directory, notes the TPM's transient handles
# (to flush only what this run loads), and arranges the cleanup.
pv_setup() {
	for pv_tool in $PV_TOOLS; do
		command -v "$pv_tool" >/dev/null 2>&1 || pv_die 1 "$pv_tool is missing (tpm2-tools and busybox provide what this needs)"
	done
	umask 077
	if [ -n "$PV_WORK" ]; then
		PV_KEEP_WORK=1
		mkdir -p "$PV_WORK" || pv_die 1 "cannot make the work directory $PV_WORK"
	else
		PV_KEEP_WORK=
		PV_WORK=$(mktemp -d "${TMPDIR:-/tmp}/pv-attest.XXXXXX") || pv_die 1 "cannot make a work directory"
	fi
	PV_SECRET_TMP=
	# On /dev/tpmrm0 every tool's objects go with its connection and this list is empty;
	# without a resource manager (mssim), objects stay loaded until flushed.
	PV_HANDLES_BEFORE=" $(tpm2_getcap handles-transient 2>/dev/null | sed -n 's/^- //p' | tr '\n' ' ') "
	trap pv_cleanup EXIT
	trap 'exit 75' HUP INT TERM
}

# pv_flush_new: flushes the transient objects loaded since pv_setup.
pv_flush_new() {
	for pv_h in $(tpm2_getcap handles-transient 2>/dev/null | sed -n 's/^- //p'); do
		case $PV_HANDLES_BEFORE in
		*" $pv_h "*) ;;
		*) tpm2_flushcontext "$pv_h" >/dev/null 2>&1 ;;
		esac
	done
}

pv_cleanup() {
	pv_flush_new
	[ -n "$PV_SECRET_TMP" ] && rm -f "$PV_SECRET_TMP"
	[ -n "$PV_KEEP_WORK" ] || rm -rf "$PV_WORK"
}

# pv_tpm WHAT COMMAND...: runs a tpm2-tools command in the work directory; on failure exits
# 75 if the TPM said to try again (busy, out of object memory, NV rate, testing, retry),
# else 1. Flushes what the command left loaded.
pv_tpm() {
	pv_what=$1
	shift
	(cd "$PV_WORK" && "$@") >/dev/null 2>"$PV_WORK/tpm.err"
	pv_rc=$?
	pv_flush_new
	[ $pv_rc -eq 0 ] && return 0
	pv_err=$(tail -n 3 "$PV_WORK/tpm.err" | tr '\n' ' ')
	if grep -Eqi '0x9(0[2-689a]|2[023])\)|0xa000a|resource busy|try again' "$PV_WORK/tpm.err"; then
		pv_die 75 "TPM busy ($pv_what): $pv_err"
	fi
	pv_die 1 "$pv_what failed: $pv_err"
}

# pv_hex FILE: the file as one line of lowercase hex.
pv_hex() {
	xxd -p "$1" | tr -d '\n'
}

# pv_exchange REQUEST_FILE REPLY_FILE: one request line, one reply line.
pv_exchange() {
	timeout "$PV_EXCHANGE_TIMEOUT" nc "$PV_HOST" "$PV_PORT" <"$1" >"$2" 2>"$PV_WORK/nc.err"
	pv_rc=$?
	if [ ! -s "$2" ]; then
		if [ $pv_rc -ne 0 ]; then
			pv_die 75 "the broker at $PV_KBS is unreachable: $(tr '\n' ' ' <"$PV_WORK/nc.err")(exit $pv_rc)"
		fi
		pv_die 75 "the broker at $PV_KBS closed the connection without a reply"
	fi
	pv_refusal "$2"
}

# pv_refusal REPLY_FILE: exits if the reply is an error: 3 if it names a check (75 if it
# also says a new challenge may succeed), 75 if the broker was busy or timed out, else 1.
pv_refusal() {
	pv_reply=$(tr -d '\n' <"$1")
	case $pv_reply in
	*'"error":"'*) ;;
	*) return 0 ;;
	esac
	pv_msg=${pv_reply#*\"error\":\"}
	pv_msg=${pv_msg%\"\}}
	pv_msg=${pv_msg%\",\"retry\":true\}}
	pv_msg=$(printf '%s' "$pv_msg" | sed 's/\\"/"/g; s/\\\\/\\/g')
	pv_check=$(printf '%s' "$pv_reply" | sed -n 's/^{"check":"\([a-z-]*\)".*/\1/p')
	if [ -n "$pv_check" ]; then
		case $pv_reply in
		*'"retry":true}') pv_die 75 "$pv_check: $pv_msg" ;;
		esac
		pv_die 3 "$pv_check: $pv_msg"
	fi
	case $pv_msg in
	*busy* | *"no complete line"*) pv_die 75 "the broker: $pv_msg" ;;
	esac
	pv_die 1 "the broker did not take the request: $pv_msg"
}

# pv_challenge: a nonce from the broker, into nonce.hex and PV_NONCE.
pv_challenge() {
	echo '{"request":"challenge"}' >"$PV_WORK/challenge.json"
	pv_exchange "$PV_WORK/challenge.json" "$PV_WORK/challenge-reply.json"
	PV_NONCE=$(sed -n 's/.*"nonce":"\([0-9a-f]*\)".*/\1/p' "$PV_WORK/challenge-reply.json")
	[ ${#PV_NONCE} -eq 64 ] || pv_die 1 "the broker's challenge holds no 32-byte nonce: $(cat "$PV_WORK/challenge-reply.json")"
	echo "$PV_NONCE" >"$PV_WORK/nonce.hex"
}

# pv_read_evidence: the report and the claims pv-vtpm wrote, into report.bin, claims.json.
pv_read_evidence() {
	pv_tpm "tpm2_nvread $PV_REPORT_INDEX (the SNP report; does this vTPM have an attestation binding?)" \
		tpm2_nvread "$PV_REPORT_INDEX" -o report.bin
	pv_tpm "tpm2_nvread $PV_CLAIMS_INDEX (the runtime claims)" \
		tpm2_nvread "$PV_CLAIMS_INDEX" -o claims.json
}

# pv_transfer_key: an RSA-2048 decrypt key made in the TPM (transfer.pub, transfer.ctx),
# with its creation data for the certification (creation.hash, creation.ticket).
pv_transfer_key() {
	rm -f "$PV_WORK/parent.ctx" "$PV_WORK/transfer.pub" "$PV_WORK/transfer.priv" "$PV_WORK/transfer.ctx"
	pv_tpm "tpm2_createprimary (the transfer key's parent)" \
		tpm2_createprimary -Q -C n -G ecc -c parent.ctx
	pv_tpm "tpm2_create (the transfer key)" \
		tpm2_create -Q -C parent.ctx -G rsa2048:null:null \
		-a 'fixedtpm|fixedparent|sensitivedataorigin|userwithauth|decrypt' \
		-u transfer.pub -r transfer.priv -d creation.hash -t creation.ticket
	pv_tpm "tpm2_load (the transfer key)" \
		tpm2_load -Q -C parent.ctx -u transfer.pub -r transfer.priv -c transfer.ctx
}

# pv_certify: the AK's certification of the transfer key over the nonce (certify.attest,
# certify.sig).
pv_certify() {
	pv_tpm "tpm2_certifycreation (the AK at $PV_AK certifies the transfer key)" \
		tpm2_certifycreation -Q -C "$PV_AK" -c transfer.ctx -d creation.hash -t creation.ticket \
		-g sha256 -q "$PV_NONCE" --attestation certify.attest -o certify.sig
}

# pv_quote: the AK's quote of the PCRs over the nonce (quote.msg, quote.sig), and the PCR
# values (quote.pcrs: the selected digests concatenated, `-F values`).
pv_quote() {
	pv_tpm "tpm2_quote (the AK at $PV_AK, PCRs sha256:$PV_PCRS)" \
		tpm2_quote -Q -c "$PV_AK" -l "sha256:$PV_PCRS" -q "$PV_NONCE" -g sha256 \
		-m quote.msg -s quote.sig -o quote.pcrs -F values
}

# pv_request: the guest-key line, from the work directory's files, into request.json.
pv_request() {
	PV_NONCE=$(cat "$PV_WORK/nonce.hex")
	(
		cd "$PV_WORK" || exit 1
		printf '{"request":"guest-key","nonce":"%s","report":"%s","claims":"%s","quote":"%s","quote_signature":"%s","pcrs":"%s","transfer_key":"%s","certify":"%s","certify_signature":"%s"}\n' \
			"$PV_NONCE" "$(pv_hex report.bin)" "$(pv_hex claims.json)" \
			"$(pv_hex quote.msg)" "$(pv_hex quote.sig)" "$(pv_hex quote.pcrs)" \
			"$(pv_hex transfer.pub)" "$(pv_hex certify.attest)" "$(pv_hex certify.sig)" \
			>request.json
	) || pv_die 1 "cannot write the request in $PV_WORK"
}

# pv_send: request.json to the broker; its reply in reply.json (a refusal exits).
pv_send() {
	pv_exchange "$PV_WORK/request.json" "$PV_WORK/reply.json"
}

# pv_reply: the wrapped secret of reply.json, into wrapped.bin.
pv_reply() {
	pv_wrapped=$(sed -n 's/.*"wrapped_secret":"\([0-9a-f]*\)".*/\1/p' "$PV_WORK/reply.json")
	[ ${#pv_wrapped} -eq 512 ] || pv_die 1 "the broker's reply holds no wrapped secret: $(cat "$PV_WORK/reply.json")"
	printf '%s' "$pv_wrapped" | xxd -r -p >"$PV_WORK/wrapped.bin" || pv_die 1 "cannot decode the wrapped secret"
}

# pv_unwrap: the TPM decrypts wrapped.bin with the transfer key, into --secret-out (0600,
# written to a new file beside it and renamed into place: never half a secret).
pv_unwrap() {
	pv_dir=$(dirname "$PV_SECRET_OUT")
	PV_SECRET_TMP=$(mktemp "$pv_dir/.pv-attest.XXXXXX") || pv_die 1 "cannot write in $pv_dir"
	pv_tpm "tpm2_rsadecrypt (unwrapping the secret in the TPM)" \
		tpm2_rsadecrypt -Q -c transfer.ctx -s oaep -o "$PV_SECRET_TMP" wrapped.bin
	if ! { chmod 600 "$PV_SECRET_TMP" && mv -f "$PV_SECRET_TMP" "$PV_SECRET_OUT"; }; then
		pv_die 1 "cannot write $PV_SECRET_OUT"
	fi
	PV_SECRET_TMP=
}

pv_attest_main() {
	pv_args "$@"
	pv_setup
	pv_challenge
	pv_read_evidence
	pv_transfer_key
	pv_certify
	pv_quote
	pv_request
	pv_send
	pv_reply
	pv_unwrap
	exit 0
}

[ -n "${PV_ATTEST_LIB:-}" ] || pv_attest_main "$@"
