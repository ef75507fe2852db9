//! ACPI tables for a Linux guest: Debian's cloud kernel has no MP-table support, so the
//! IOAPIC and every vCPU beyond the first are found only through ACPI. A hardware-reduced
//! platform (no PM timer, no SCI, no 8042 according to the FADT): RSDP -> XSDT -> FADT (-> an
//! empty DSDT) and MADT (one local APIC per vCPU, the IOAPIC with id 0 as KVM's in-kernel one
//! reports). No IRQ 0 -> GSI 2 override: KVM's default routing wires the PIT to GSI 0.
//! Layouts from the ACPI 6.x specification.

use vm_memory::Bytes;
use vm_memory::GuestAddress;
use vm_memory::GuestMemoryMmap;

/// Where the tables go (the BIOS area Linux searches, and the RSDP's usual home).
pub const RSDP: u64 = 0xE_0000;
const TABLES: u64 = 0xE_1000;

pub const LAPIC_ADDRESS: u32 = 0xFEE0_0000;
pub const IOAPIC_ADDRESS: u32 = 0xFEC0_0000;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// A system description table: header (36 bytes) + body, checksum fixed.
fn table(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(36 + body.len());
    t.extend_from_slice(signature);
    t.extend_from_slice(&((36 + body.len()) as u32).to_le_bytes());
    t.push(revision);
    t.push(0); // checksum
    t.extend_from_slice(b"PVISOR"); // OEM id
    t.extend_from_slice(b"PARAVSR "); // OEM table id
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(b"PVSR"); // creator id
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

fn fadt(dsdt: u64) -> Vec<u8> {
    // FADT revision 6: 276 bytes, body = 240.
    let mut body = vec![0u8; 276 - 36];
    let at = |offset: usize| offset - 36;
    body[at(40)..at(44)].copy_from_slice(&(dsdt as u32).to_le_bytes());
    // IAPC_BOOT_ARCH (offset 109): bit 2 "VGA not present"; "MSI not supported" (bit 3) off;
    // no 8042 (bit 1 clear), no legacy devices (bit 0 clear).
    body[at(109)..at(111)].copy_from_slice(&(1u16 << 2).to_le_bytes());
    // Flags (offset 112): HW_REDUCED_ACPI (bit 20).
    body[at(112)..at(116)].copy_from_slice(&(1u32 << 20).to_le_bytes());
    body[at(131)] = 3; // FADT minor version
    body[at(140)..at(148)].copy_from_slice(&dsdt.to_le_bytes());
    table(b"FACP", 6, &body)
}

fn madt(vcpus: u32) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&LAPIC_ADDRESS.to_le_bytes());
    body.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT: there is an 8259 pair
    for id in 0..vcpus {
        // Processor local APIC: type 0, length 8, processor uid, APIC id, flags (enabled).
        body.extend_from_slice(&[0, 8, id as u8, id as u8]);
        body.extend_from_slice(&1u32.to_le_bytes());
    }
    // IOAPIC: type 1, length 12, id 0, reserved, address, GSI base.
    body.extend_from_slice(&[1, 12, 0, 0]);
    body.extend_from_slice(&IOAPIC_ADDRESS.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    table(b"APIC", 5, &body)
}

/// Writes the tables; the RSDP's guest-physical address.
pub fn write(mem: &GuestMemoryMmap, vcpus: u32) -> Result<u64, vm_memory::GuestMemoryError> {
    let dsdt = table(b"DSDT", 2, &[]);
    let dsdt_at = TABLES;
    let fadt = fadt(dsdt_at);
    let fadt_at = dsdt_at + 0x100;
    let madt = madt(vcpus);
    let madt_at = fadt_at + 0x200;
    let mut entries = Vec::new();
    entries.extend_from_slice(&fadt_at.to_le_bytes());
    entries.extend_from_slice(&madt_at.to_le_bytes());
    let xsdt = table(b"XSDT", 1, &entries);
    let xsdt_at = madt_at + 0x400;
    for (bytes, at) in [
        (&dsdt, dsdt_at),
        (&fadt, fadt_at),
        (&madt, madt_at),
        (&xsdt, xsdt_at),
    ] {
        mem.write_slice(bytes, GuestAddress(at))?;
    }
    let mut rsdp = Vec::with_capacity(36);
    rsdp.extend_from_slice(b"RSD PTR ");
    rsdp.push(0); // checksum of the first 20 bytes
    rsdp.extend_from_slice(b"PVISOR");
    rsdp.push(2); // revision: ACPI 2.0+
    rsdp.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    rsdp.extend_from_slice(&36u32.to_le_bytes());
    rsdp.extend_from_slice(&xsdt_at.to_le_bytes());
    rsdp.push(0); // extended checksum
    rsdp.extend_from_slice(&[0; 3]);
    rsdp[8] = checksum(&rsdp[..20]);
    rsdp[32] = checksum(&rsdp);
    mem.write_slice(&rsdp, GuestAddress(RSDP))?;
    Ok(RSDP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_sums_to_zero_and_has_its_length() {
        for t in [table(b"DSDT", 2, &[]), fadt(0x1000), madt(4)] {
            assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            assert_eq!(
                u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize,
                t.len()
            );
        }
        assert_eq!(fadt(0).len(), 276);
        // MADT: 8 bytes of body header, 8 per vCPU, 12 for the IOAPIC.
        assert_eq!(madt(2).len(), 36 + 8 + 16 + 12);
        // The layout below has room for the largest partition.
        assert!(madt(crate::partition::MAX_VCPUS).len() <= 0x400);
    }
}
