//! Arbitrary guest register traffic on the TIS range: every access is answered, commands
//! handed out stay within the TPM's buffer, nothing panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pv_vtpm::tis::Effect;
use pv_vtpm::tis::Tis;

fuzz_target!(|data: &[u8]| {
    let mut tis = Tis::new();
    for op in data.chunks(8) {
        if op.len() < 8 {
            break;
        }
        let offset = u64::from(u16::from_le_bytes([op[0], op[1]])) % 0x5800;
        let size = [1u8, 2, 4, 3][(op[2] & 3) as usize];
        let value = u64::from(u32::from_le_bytes([op[3], op[4], op[5], op[6]]));
        if op[7] & 1 == 0 {
            let _ = tis.read(offset, size);
        } else if let Effect::Execute { command, .. } = tis.write(offset, size, value) {
            assert!(command.len() <= 4096);
            tis.complete(command[..command.len().min(64)].to_vec());
        }
    }
});
