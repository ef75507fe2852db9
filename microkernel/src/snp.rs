//! The SEV-SNP facts ([`ipc_defs::snp`]), and the report data the command line's nonces
//! become.

pub use ipc_defs::snp::*;

/// `report_data` for a nonce: the nonce itself, zero-padded, when it fits in 64 bytes; its
/// SHA-512 when it is longer.
pub fn report_data_for(nonce: &[u8]) -> [u8; 64] {
    let mut d = [0u8; 64];
    if nonce.len() <= 64 {
        d[..nonce.len()].copy_from_slice(nonce);
    } else {
        d.copy_from_slice(&<sha2::Sha512 as sha2::Digest>::digest(nonce));
    }
    d
}
