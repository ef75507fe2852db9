#!/usr/bin/env bash
# Runs the tpm2-tools commands the vTPM must support against the TPM that TPM2TOOLS_TCTI
# names, in a scratch directory ($1). One line per step: "PASS name" or "FAIL name: why".
# Used by tests/tests/vtpm_tools.rs against our vTPM and against swtpm, side by side.
set -u
cd "$1" || exit 2
run() {
  local name=$1
  shift
  local out
  if out=$("$@" 2>&1); then
    echo "PASS $name"
  else
    echo "FAIL $name: $(echo "$out" | grep -v '^$' | tail -n 1)"
  fi
  # No resource manager between the tools and the TPM: free the transient object slots the
  # tools leave behind, as tpm2-abrmd or the kernel's resource manager would.
  tpm2_flushcontext -t >/dev/null 2>&1 || true
}
printf 'data to sign' > data.bin
printf 'event' > ev.bin
printf 'nvdata' > nv.bin
run startup tpm2_startup -c
run selftest tpm2_selftest --fulltest
run gettestresult tpm2_gettestresult
run getcap-properties-fixed tpm2_getcap properties-fixed
run getcap-pcrs tpm2_getcap pcrs
run getcap-algorithms tpm2_getcap algorithms
run getcap-handles-persistent tpm2_getcap handles-persistent
run getrandom tpm2_getrandom 32 -o rand.bin
run stirrandom sh -c 'printf seed | tpm2_stirrandom'
run pcrread-sha1 tpm2_pcrread sha1:0,16
run pcrread-sha256 tpm2_pcrread sha256:0,16
run pcrread-sha384 tpm2_pcrread sha384:0,16
run pcrextend tpm2_pcrextend 16:sha256=0000000000000000000000000000000000000000000000000000000000000001
run pcrevent tpm2_pcrevent 16 ev.bin
run pcrreset tpm2_pcrreset 16
run hash tpm2_hash -C o -g sha256 -o hash.bin -t ticket.bin data.bin
run createprimary-ecc tpm2_createprimary -C o -G ecc -c primary_ecc.ctx
run createprimary-rsa2048 tpm2_createprimary -C o -G rsa2048 -c primary.ctx
run readpublic tpm2_readpublic -c primary.ctx
run create tpm2_create -C primary.ctx -G rsa2048 -u key.pub -r key.priv
run load tpm2_load -C primary.ctx -u key.pub -r key.priv -c key.ctx
run sign tpm2_sign -c key.ctx -g sha256 -o sig.bin data.bin
run verifysignature tpm2_verifysignature -c key.ctx -g sha256 -s sig.bin -m data.bin
run seal-create sh -c 'printf secret | tpm2_create -C primary.ctx -i- -u seal.pub -r seal.priv'
run seal-load tpm2_load -C primary.ctx -u seal.pub -r seal.priv -c seal.ctx
run unseal sh -c 'test "$(tpm2_unseal -c seal.ctx)" = secret'
run startauthsession-policypcr sh -c 'tpm2_startauthsession -S session.ctx && tpm2_policypcr -S session.ctx -l sha256:0 -L pcr.policy && tpm2_flushcontext session.ctx'
run evictcontrol-persist tpm2_evictcontrol -C o -c primary.ctx 0x81010001
run evictcontrol-remove tpm2_evictcontrol -C o -c 0x81010001
run createek tpm2_createek -c ek.ctx -G rsa -u ek.pub
run createak tpm2_createak -C ek.ctx -c ak.ctx -G rsa -g sha256 -s rsassa -u ak.pub -n ak.name
run quote tpm2_quote -c ak.ctx -l sha256:0,16 -q abcdef -m quote.msg -s quote.sig -o quote.pcrs -g sha256
run checkquote tpm2_checkquote -u ak.pub -m quote.msg -s quote.sig -f quote.pcrs -g sha256 -q abcdef
run nvdefine tpm2_nvdefine 0x1500016 -C o -s 32 -a 'ownerread|ownerwrite'
run nvwrite tpm2_nvwrite 0x1500016 -C o -i nv.bin
run nvread sh -c 'test "$(tpm2_nvread 0x1500016 -C o -s 6)" = nvdata'
run nvreadpublic tpm2_nvreadpublic 0x1500016
run nvundefine tpm2_nvundefine 0x1500016 -C o
run hmac sh -c 'tpm2_create -C primary.ctx -G hmac -c hmac.ctx && tpm2_flushcontext -t && tpm2_hmac -c hmac.ctx --hex data.bin'
run encryptdecrypt sh -c 'tpm2_create -C primary.ctx -G aes128cfb -u aes.pub -r aes.priv && tpm2_flushcontext -t && tpm2_load -C primary.ctx -u aes.pub -r aes.priv -c aes.ctx && tpm2_flushcontext -t && tpm2_encryptdecrypt -c aes.ctx -o enc.bin data.bin && tpm2_flushcontext -t && tpm2_encryptdecrypt -d -c aes.ctx -o dec.bin enc.bin && cmp data.bin dec.bin'
run rsaencrypt sh -c 'tpm2_create -C primary.ctx -G rsa2048:rsaes -u rsa.pub -r rsa.priv && tpm2_flushcontext -t && tpm2_load -C primary.ctx -u rsa.pub -r rsa.priv -c rsa.ctx && tpm2_flushcontext -t && tpm2_rsaencrypt -c rsa.ctx -o rsa.enc data.bin'
run rsadecrypt sh -c 'tpm2_rsadecrypt -c rsa.ctx -o rsa.dec rsa.enc && cmp data.bin rsa.dec'
run certify tpm2_certify -C key.ctx -c primary.ctx -g sha256 -o attest.out -s certify.sig
run changeauth sh -c 'tpm2_changeauth -c o newpass && tpm2_changeauth -c o -p newpass'
run dictionarylockout tpm2_dictionarylockout -c
run readclock tpm2_readclock
run testparms tpm2_testparms rsa2048
run flushcontext tpm2_flushcontext -t
run clear tpm2_clear
