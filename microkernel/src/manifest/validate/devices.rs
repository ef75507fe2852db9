//! The passes over what a service owns of the guest: MMIO and port ranges (never overlapping
//! another service's), a PCI device on bus 0 and its own interrupt lines; and the lists of
//! IOAPIC lines that a call to intercept grants.

use std::ops::Range;

use ipc_defs::capability::Grant;
use ipc_defs::services::intercept::Interrupt;
use ipc_defs::services::intercept::InterruptSet;
use ipc_defs::Interface;
use toml::Spanned;

use super::Seen;
use super::Validator;
use crate::manifest::schema::RawRange;
use crate::manifest::schema::RawService;
use crate::manifest::DeviceRange;

/// The most doorbells one device may have wired as ioeventfds.
pub const MAX_DOORBELLS: u64 = 64;

impl Validator<'_> {
    /// What a service owns of the guest's address spaces: its `mmio` and `pio` ranges
    /// ([`Self::device_ranges`]) and its `pci-device`; a service that owns any of them serves
    /// exactly one interface that takes guest accesses. Overlaps between services are
    /// checked once every service is known ([`Self::overlaps`]).
    pub(super) fn guest_devices(
        &mut self,
        s: &RawService,
        name: &str,
        serves: &[Interface],
        service_span: &Range<usize>,
        seen: &mut Seen,
    ) -> (Vec<DeviceRange>, Vec<DeviceRange>, Option<u8>) {
        let my_mmio = self.device_ranges(&s.mmio, "mmio");
        let my_pio = self.device_ranges(&s.pio, "pio");
        for (r, span) in &my_mmio {
            seen.mmio.push((name.to_string(), *r, span.clone()));
        }
        for (r, span) in &my_pio {
            seen.pio.push((name.to_string(), *r, span.clone()));
        }
        let pci_device = self.pci_device(s.pci_device.as_ref(), name, seen);
        if !my_mmio.is_empty() || !my_pio.is_empty() || pci_device.is_some() {
            // Intercept's own devices come on its channel; any other device service's
            // accesses on the channel of its one interface.
            let device_interfaces: Vec<Interface> = if serves.contains(&Interface::Intercept) {
                vec![Interface::Intercept]
            } else {
                serves.to_vec()
            };
            if device_interfaces.len() != 1 {
                let span = my_mmio
                    .first()
                    .or(my_pio.first())
                    .map(|(_, s)| s.clone())
                    .or(s.pci_device.as_ref().map(|d| d.span()))
                    .unwrap_or(service_span.clone());
                self.error(
                    span,
                    format!(
                        "service \"{name}\" owns guest address ranges or a PCI device but serves {} interfaces",
                        device_interfaces.len()
                    ),
                    "a range's accesses go to its service's one interface: serve exactly one",
                );
            }
        }
        (
            my_mmio.into_iter().map(|(r, _)| r).collect(),
            my_pio.into_iter().map(|(r, _)| r).collect(),
            pci_device,
        )
    }

    /// `mmio` or `pio` ranges (`what`): each non-empty, within its address space (2^52 or
    /// 2^16) and, for ports, clear of the port the partition answers itself. Returns the
    /// valid ones with where each is written.
    fn device_ranges(
        &mut self,
        list: &[Spanned<RawRange>],
        what: &str,
    ) -> Vec<(DeviceRange, Range<usize>)> {
        let mut out = Vec::new();
        for r in list {
            let range = DeviceRange {
                base: *r.get_ref().base.get_ref(),
                size: *r.get_ref().size.get_ref(),
            };
            let limit = if what == "pio" {
                1u64 << 16
            } else {
                1u64 << 52
            };
            if range.size == 0 {
                self.error(
                    r.span(),
                    format!("{what} range at {:#x} has size 0", range.base),
                    "give the range a non-zero size",
                );
            } else if range
                .base
                .checked_add(range.size)
                .is_none_or(|end| end > limit)
            {
                self.error(r.span(), format!("{what} range {:#x}+{:#x} runs past the end of the {what} space ({limit:#x})", range.base, range.size), "fix base or size");
            } else if what == "pio"
                && (range.base..range.base + range.size)
                    .contains(&u64::from(crate::partition::router::IN_THREAD_PORT))
            {
                self.error(
                    r.span(),
                    format!(
                        "pio range {:#x}+{:#x} covers port {:#x}, which the partition answers itself",
                        range.base,
                        range.size,
                        crate::partition::router::IN_THREAD_PORT
                    ),
                    "that port is the exit benchmark's in-thread baseline; move the range",
                );
            } else {
                out.push((range, r.span()));
            }
        }
        out
    }

    /// `pci-device`: a device number on bus 0 (1..=31), owned by one service only.
    fn pci_device(
        &mut self,
        raw: Option<&Spanned<i64>>,
        name: &str,
        seen: &mut Seen,
    ) -> Option<u8> {
        match raw {
            None => None,
            Some(d) => match u8::try_from(*d.get_ref()) {
                Ok(n) if (1..=31).contains(&n) => {
                    if let Some((other, _)) = seen.pci_owners.iter().find(|(_, x)| *x == n) {
                        self.error(
                            d.span(),
                            format!("PCI device {n} is already owned by \"{other}\""),
                            "give each device service its own device number",
                        );
                    }
                    seen.pci_owners.push((name.to_string(), n));
                    Some(n)
                }
                _ => {
                    self.error(
                        d.span(),
                        format!("PCI device {} does not exist on bus 0", d.get_ref()),
                        "use 1..=31 (00:00 is the host bridge)",
                    );
                    None
                }
            },
        }
    }

    /// `interrupts`: the lines the service's own devices raise ([`Self::interrupt_list`]):
    /// intercept's, or those of a service that owns a guest device (it raises them itself,
    /// through the eventfds the microkernel wires to them).
    pub(super) fn own_interrupts(
        &mut self,
        raw: &[Spanned<i64>],
        name: &str,
        serves: &[Interface],
        owns_device: bool,
    ) -> InterruptSet {
        let own_interrupts = self.interrupt_list(raw);
        if !own_interrupts.is_empty() && !serves.contains(&Interface::Intercept) && !owns_device {
            self.error(
                raw[0].span(),
                format!("service \"{name}\" lists interrupts but owns no guest device"),
                "a service raises lines of its own only for a device it owns (mmio, pio or pci-device); otherwise it asks intercept: put `interrupts = [..]` in its call to intercept",
            );
        }
        own_interrupts
    }

    /// `guest-memory`: what a device may reach for DMA ("shared-window" or "all"); only for
    /// a service that owns a guest device.
    pub(super) fn guest_memory(
        &mut self,
        raw: Option<&Spanned<String>>,
        name: &str,
        owns_device: bool,
    ) -> Option<crate::manifest::GuestMemoryAccess> {
        use crate::manifest::GuestMemoryAccess;
        let raw = raw?;
        let access = match raw.get_ref().as_str() {
            "shared-window" => GuestMemoryAccess::SharedWindow,
            "all" => GuestMemoryAccess::All,
            other => {
                self.error(
                    raw.span(),
                    format!("guest-memory \"{other}\" is not a kind of guest memory"),
                    "write \"shared-window\" (the partition's shared window: the confidential-VM model) or \"all\" (all of guest RAM)",
                );
                return None;
            }
        };
        if !owns_device {
            self.error(
                raw.span(),
                format!("service \"{name}\" asks for guest memory but owns no guest device"),
                "guest memory is for a device's DMA: give the service its device (pci-device, mmio or pio), or remove guest-memory",
            );
            return None;
        }
        Some(access)
    }

    /// `doorbells`: 4-byte registers (base and size multiples of 4, at most
    /// [`MAX_DOORBELLS`]) inside one of the service's own `mmio` ranges (a device can only
    /// take over writes to its own registers), for a service whose accesses come as generic
    /// guest accesses (not intercept or the vTPM, which answer in their own interfaces).
    pub(super) fn doorbells(
        &mut self,
        raw: Option<&Spanned<RawRange>>,
        name: &str,
        serves: &[Interface],
        mmio: &[DeviceRange],
    ) -> Option<DeviceRange> {
        let raw = raw?;
        let range = DeviceRange {
            base: *raw.get_ref().base.get_ref(),
            size: *raw.get_ref().size.get_ref(),
        };
        let end = range.base.checked_add(range.size);
        let inside = end.is_some_and(|end| {
            mmio.iter()
                .any(|m| m.base <= range.base && end <= m.base + m.size)
        });
        let problem = if range.size == 0
            || !range.base.is_multiple_of(4)
            || !range.size.is_multiple_of(4)
        {
            Some((
                format!(
                    "doorbells {:#x}+{:#x} are not whole 4-byte registers",
                    range.base, range.size
                ),
                "give a base and a size that are multiples of 4, size not 0",
            ))
        } else if range.size / 4 > MAX_DOORBELLS {
            Some((
                format!(
                    "{} doorbells: at most {MAX_DOORBELLS} are wired",
                    range.size / 4
                ),
                "name fewer doorbells",
            ))
        } else if !inside {
            Some((
                format!(
                    "doorbells {:#x}+{:#x} of \"{name}\" are not inside its own mmio ranges",
                    range.base, range.size
                ),
                "a device takes over writes to its own registers only: put them inside one of its mmio ranges",
            ))
        } else if serves
            .iter()
            .any(|i| matches!(i, Interface::Intercept | Interface::Vtpm))
        {
            Some((
                format!("service \"{name}\" has doorbells but answers guest accesses in its own interface"),
                "doorbells are for a device service answering generic guest accesses; remove them",
            ))
        } else {
            None
        };
        if let Some((what, hint)) = problem {
            self.error(raw.span(), what, hint);
            return None;
        }
        Some(range)
    }

    /// Each interrupt line has one holder: a service's own line is neither another service's
    /// own nor granted in a call to intercept (two devices on one edge-triggered line would
    /// lose each other's interrupts).
    pub(super) fn line_holders(
        &mut self,
        own_lines: &[(String, Interrupt, Range<usize>)],
        services: &[crate::manifest::ServiceSpec],
    ) {
        for (i, (name, line, span)) in own_lines.iter().enumerate() {
            if let Some((other, _, _)) = own_lines[..i].iter().find(|(_, l, _)| l == line) {
                self.error(
                    span.clone(),
                    format!("interrupt {line} is listed by both \"{other}\" and \"{name}\""),
                    "give each device its own line",
                );
            }
            for s in services {
                if let Some(Grant::Interrupts(set)) = s.grants.get(&Interface::Intercept) {
                    if set.contains(*line) {
                        self.error(
                            span.clone(),
                            format!(
                                "interrupt {line} of \"{name}\" is also granted to \"{}\" through intercept",
                                s.name
                            ),
                            "give each device its own line",
                        );
                    }
                }
            }
        }
    }

    /// A list of IOAPIC lines (0..24), each once.
    pub(super) fn interrupt_list(&mut self, lines: &[Spanned<i64>]) -> InterruptSet {
        let mut set = InterruptSet::EMPTY;
        for l in lines {
            let n = *l.get_ref();
            let irq = u8::try_from(n).ok().map(Interrupt::Line);
            match irq {
                Some(i) if set.contains(i) => self.error(
                    l.span(),
                    format!("interrupt line {n} is listed twice"),
                    "list each line once",
                ),
                Some(i) if set.insert(i) => {}
                _ => self.error(
                    l.span(),
                    format!("interrupt line {n} does not exist"),
                    format!(
                        "IOAPIC lines are 0..={}",
                        ipc_defs::services::intercept::IOAPIC_LINES - 1
                    ),
                ),
            }
        }
        set
    }

    pub(super) fn overlaps(&mut self, ranges: &[(String, DeviceRange, Range<usize>)], what: &str) {
        for (i, (a_name, a, _)) in ranges.iter().enumerate() {
            for (b_name, b, b_span) in &ranges[i + 1..] {
                if a.base < b.end() && b.base < a.end() {
                    self.error(
                        b_span.clone(),
                        format!(
                            "{what} range {:#x}..{:#x} of \"{b_name}\" overlaps {:#x}..{:#x} of \"{a_name}\"",
                            b.base, b.end(), a.base, a.end()
                        ),
                        "an address can be handled by one service only; move or shrink one range",
                    );
                }
            }
        }
    }
}
