//! The virtio PCI transport, modern only (virtio 1.x, 4.1): what a virtio device on the
//! partition shows its driver through a [`crate::pci_function::PciFunction`]. BAR 0 holds the
//! four structures the function's vendor capabilities point at:
//!
//! | BAR 0 offset | structure |
//! |---|---|
//! | [`COMMON_AT`] | common configuration: features, status, queue selection and set-up |
//! | [`ISR_AT`] | the ISR status byte (read clears; what an INTx handler asks) |
//! | [`DEVICE_AT`] | the device's own configuration (the model's bytes) |
//! | [`NOTIFY_AT`] | notifications: queue `i` at `NOTIFY_AT + 4 * i` |
//!
//! Every queue has its own notification address, so a write there needs no value: the
//! partition can deliver it through a KVM ioeventfd (a `doorbells` grant over the notify
//! area), as it does the NVMe function's doorbells.
//!
//! The transport keeps what the driver configured ([`TransportState`], serializable for the
//! service's checkpoint) and says what a write asks of the device ([`Event`]); the device
//! model and its queues stay with the service. A value the driver may not write (a feature
//! not offered, a queue larger than its maximum, an address change while the queue is
//! enabled) is refused as the specification says (FEATURES_OK not kept, the old value kept),
//! never trusted.

use serde::Deserialize;
use serde::Serialize;
use virtio_queue::Queue;
use virtio_queue::QueueT;

use crate::pci_function::Identity;
use crate::virtio::VIRTIO_F_VERSION_1;

/// Red Hat's virtio vendor id; a modern device is 0x1040 + its virtio device type.
pub const VENDOR: u16 = 0x1af4;
/// Offsets of the structures in BAR 0, and its size.
pub const COMMON_AT: u64 = 0x0000;
pub const ISR_AT: u64 = 0x1000;
pub const DEVICE_AT: u64 = 0x2000;
pub const NOTIFY_AT: u64 = 0x3000;
pub const BAR_SIZE: u64 = 0x4000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_MULTIPLIER: u32 = 4;
/// Device status bits (2.1).
pub const ACKNOWLEDGE: u8 = 1;
pub const DRIVER: u8 = 2;
pub const DRIVER_OK: u8 = 4;
pub const FEATURES_OK: u8 = 8;
pub const FAILED: u8 = 128;
/// ISR bits: a queue was used; the configuration changed.
pub const ISR_QUEUE: u8 = 1;
pub const ISR_CONFIG: u8 = 2;
/// The common configuration's length (up to queue_device, 4.1.4.3).
const COMMON_LEN: u64 = 0x38;
/// "No MSI-X vector": this transport has INTx only.
const NO_VECTOR: u16 = 0xffff;

/// The PCI identity of virtio device `device_type` (1 network, 2 block, ...), with its class.
pub fn identity(device_type: u16, class: u32) -> Identity {
    Identity {
        vendor: VENDOR,
        device: 0x1040 + device_type,
        class_revision: class << 8 | 1,
        subsystem_vendor: VENDOR,
        subsystem: 0x40,
    }
}

/// The vendor capabilities pointing at BAR 0's structures, chained from 0x40 (the device
/// configuration `device_config_len` bytes long).
pub fn capabilities(device_config_len: u32) -> Vec<u8> {
    // (cfg_type, offset, length, extra): common 1, notify 2 (with its multiplier), ISR 3,
    // device 4.
    let entries: [(u8, u64, u32, Option<u32>); 4] = [
        (1, COMMON_AT, COMMON_LEN as u32, None),
        (
            2,
            NOTIFY_AT,
            (BAR_SIZE - NOTIFY_AT) as u32,
            Some(NOTIFY_MULTIPLIER),
        ),
        (3, ISR_AT, 4, None),
        (4, DEVICE_AT, device_config_len, None),
    ];
    let mut out = Vec::new();
    for (i, (cfg_type, offset, length, extra)) in entries.iter().enumerate() {
        let len: u8 = if extra.is_some() { 20 } else { 16 };
        let at = crate::pci_function::CAPABILITIES_AT + out.len();
        let next = if i + 1 == entries.len() {
            0
        } else {
            (at + usize::from(len)) as u8
        };
        out.extend_from_slice(&[0x09, next, len, *cfg_type, 0, 0, 0, 0]);
        out.extend_from_slice(&(*offset as u32).to_le_bytes());
        out.extend_from_slice(&length.to_le_bytes());
        if let Some(extra) = extra {
            out.extend_from_slice(&extra.to_le_bytes());
        }
    }
    out
}

/// What the driver set up for one queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfig {
    pub size: u16,
    pub ready: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

/// What the driver configured, for the service's checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_generation: u8,
    queue_select: u16,
    queues: Vec<QueueConfig>,
    isr: u8,
}

/// What a write asks of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    None,
    /// The driver notified queue `n`.
    Notify(u16),
    /// The driver reset the device (status 0): drop every queue and what it held.
    Reset,
    /// The driver set DRIVER_OK: the queues it enabled may be served.
    DriverOk,
    /// A write to the device's configuration: offset in it, size, value.
    DeviceConfig {
        offset: u64,
        size: u8,
        value: u64,
    },
}

/// The transport of one device: the features it offers, its queues' largest sizes.
#[derive(Debug, Clone)]
pub struct VirtioPci {
    offered: u64,
    max_sizes: Vec<u16>,
    state: TransportState,
}

impl VirtioPci {
    /// A device offering `offered` (VERSION_1 is added: modern only), with one queue per
    /// entry of `max_sizes` (each a power of two).
    pub fn new(offered: u64, max_sizes: &[u16]) -> VirtioPci {
        let mut t = VirtioPci {
            offered: offered | VIRTIO_F_VERSION_1,
            max_sizes: max_sizes.to_vec(),
            state: TransportState::default(),
        };
        t.reset();
        t
    }

    fn reset(&mut self) {
        self.state = TransportState {
            config_generation: self.state.config_generation,
            queues: self
                .max_sizes
                .iter()
                .map(|&max| QueueConfig {
                    size: max,
                    ..QueueConfig::default()
                })
                .collect(),
            ..TransportState::default()
        };
    }

    pub fn state(&self) -> TransportState {
        self.state.clone()
    }

    /// Takes up a state an earlier process checkpointed; one that could not have come from
    /// this device (other queues, sizes over the maximum) is refused whole.
    pub fn restore(&mut self, state: TransportState) -> Result<(), String> {
        let fits = state.queues.len() == self.max_sizes.len()
            && state
                .queues
                .iter()
                .zip(&self.max_sizes)
                .all(|(q, &max)| q.size <= max && (q.size == 0 || q.size.is_power_of_two()));
        // Features the driver wrote are checked when it sets FEATURES_OK; only accepted ones
        // must be offered ones.
        let accepted = state.status & FEATURES_OK != 0;
        if !fits || (accepted && state.driver_features & !self.offered != 0) {
            return Err("the recorded transport does not fit this device".into());
        }
        self.state = state;
        Ok(())
    }

    pub fn status(&self) -> u8 {
        self.state.status
    }

    pub fn driver_ok(&self) -> bool {
        self.state.status & DRIVER_OK != 0 && self.state.status & FAILED == 0
    }

    /// The features the driver accepted (meaningful once FEATURES_OK is set).
    pub fn driver_features(&self) -> u64 {
        self.state.driver_features
    }

    /// Queue `n` as the driver configured it, if it enabled it.
    pub fn queue_config(&self, n: u16) -> Option<QueueConfig> {
        self.state
            .queues
            .get(usize::from(n))
            .copied()
            .filter(|q| q.ready)
    }

    /// A virtio-queue [`Queue`] for queue `n` as configured, if its rings lie in `mem` (its
    /// positions at 0: a service that resumes sets them from the used ring).
    pub fn queue<M: vm_memory::GuestMemory>(&self, n: u16, mem: &M) -> Option<Queue> {
        let c = self.queue_config(n)?;
        let max = *self.max_sizes.get(usize::from(n))?;
        let mut q = Queue::new(max).ok()?;
        q.set_size(c.size);
        q.set_desc_table_address(Some(c.desc as u32), Some((c.desc >> 32) as u32));
        q.set_avail_ring_address(Some(c.driver as u32), Some((c.driver >> 32) as u32));
        q.set_used_ring_address(Some(c.device as u32), Some((c.device >> 32) as u32));
        q.set_event_idx(self.state.driver_features & crate::virtio::VIRTIO_RING_F_EVENT_IDX != 0);
        q.set_ready(true);
        q.is_valid(mem).then_some(q)
    }

    /// The device used a queue (`config`: its configuration changed): the ISR bit the INTx
    /// handler reads. The caller raises the line.
    pub fn raise(&mut self, config: bool) {
        self.state.isr |= if config { ISR_CONFIG } else { ISR_QUEUE };
        if config {
            self.state.config_generation = self.state.config_generation.wrapping_add(1);
        }
    }

    fn common_bytes(&self) -> [u8; COMMON_LEN as usize] {
        let s = &self.state;
        let mut c = [0u8; COMMON_LEN as usize];
        let feature_word = |features: u64, select: u32| -> u32 {
            match select {
                0 => features as u32,
                1 => (features >> 32) as u32,
                _ => 0,
            }
        };
        let selected = s.queues.get(usize::from(s.queue_select));
        let mut put = |at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
        put(0x00, &s.device_feature_select.to_le_bytes());
        put(
            0x04,
            &feature_word(self.offered, s.device_feature_select).to_le_bytes(),
        );
        put(0x08, &s.driver_feature_select.to_le_bytes());
        put(
            0x0c,
            &feature_word(s.driver_features, s.driver_feature_select).to_le_bytes(),
        );
        put(0x10, &NO_VECTOR.to_le_bytes());
        put(0x12, &(s.queues.len() as u16).to_le_bytes());
        put(0x14, &[s.status, s.config_generation]);
        put(0x16, &s.queue_select.to_le_bytes());
        if let Some(q) = selected {
            put(0x18, &q.size.to_le_bytes());
            put(0x1a, &NO_VECTOR.to_le_bytes());
            put(0x1c, &u16::from(q.ready).to_le_bytes());
            put(0x1e, &s.queue_select.to_le_bytes()); // queue_notify_off: the queue's number
            put(0x20, &q.desc.to_le_bytes());
            put(0x28, &q.driver.to_le_bytes());
            put(0x30, &q.device.to_le_bytes());
        }
        c
    }

    /// A read of BAR 0 at `offset` (`size` bytes); `device_config` is the device's
    /// configuration as it stands. Reading the ISR clears it.
    pub fn read(&mut self, offset: u64, size: u8, device_config: &[u8]) -> u64 {
        let bytes = |b: &[u8], at: u64| -> u64 {
            let at = at as usize;
            match b.get(at..at + usize::from(size)) {
                Some(v) => v.iter().rev().fold(0u64, |acc, x| acc << 8 | u64::from(*x)),
                None => 0,
            }
        };
        match offset {
            o if o < COMMON_LEN => bytes(&self.common_bytes(), o),
            o if (ISR_AT..ISR_AT + 4).contains(&o) => {
                if o != ISR_AT {
                    return 0;
                }
                let isr = self.state.isr;
                self.state.isr = 0;
                u64::from(isr)
            }
            o if (DEVICE_AT..NOTIFY_AT).contains(&o) => bytes(device_config, o - DEVICE_AT),
            _ => 0,
        }
    }

    /// A write of BAR 0: what it asks of the device.
    pub fn write(&mut self, offset: u64, size: u8, value: u64) -> Event {
        let low = value as u32;
        let s = &mut self.state;
        let select = usize::from(s.queue_select);
        let enabled = s.queues.get(select).is_some_and(|q| q.ready);
        // A queue's address: the whole of it, or one half (drivers write 32 bits at a time).
        let address = |old: u64, at: u64| -> u64 {
            match (size, offset - at) {
                (8, 0) => value,
                (4, 0) => (old & !0xffff_ffff) | u64::from(low),
                (4, 4) => (old & 0xffff_ffff) | u64::from(low) << 32,
                _ => old,
            }
        };
        match offset {
            0x00 if size == 4 => s.device_feature_select = low,
            0x08 if size == 4 => s.driver_feature_select = low,
            0x0c if size == 4 && s.status & FEATURES_OK == 0 => {
                s.driver_features = match s.driver_feature_select {
                    0 => (s.driver_features & !0xffff_ffff) | u64::from(low),
                    1 => (s.driver_features & 0xffff_ffff) | u64::from(low) << 32,
                    _ => s.driver_features,
                };
            }
            0x14 if size == 1 => {
                let status = value as u8;
                if status == 0 {
                    self.reset();
                    return Event::Reset;
                }
                let mut status = status;
                // FEATURES_OK stays only for features the device offered, VERSION_1 among
                // them (4.1 is the modern interface).
                if status & FEATURES_OK != 0 && s.status & FEATURES_OK == 0 {
                    let acceptable = s.driver_features & !self.offered == 0
                        && s.driver_features & VIRTIO_F_VERSION_1 != 0;
                    if !acceptable {
                        status &= !FEATURES_OK;
                    }
                }
                let was_ok = s.status & DRIVER_OK != 0;
                s.status = status;
                if !was_ok && status & DRIVER_OK != 0 {
                    return Event::DriverOk;
                }
            }
            0x16 if size == 2 => s.queue_select = value as u16,
            0x18 if size == 2 && !enabled => {
                let max = self.max_sizes.get(select).copied().unwrap_or(0);
                let asked = value as u16;
                if let Some(q) = s.queues.get_mut(select) {
                    if asked.is_power_of_two() && asked <= max {
                        q.size = asked;
                    }
                }
            }
            0x1c if size == 2 && value as u16 == 1 => {
                if let Some(q) = s.queues.get_mut(select) {
                    q.ready = true;
                }
            }
            0x20..0x28 if !enabled => {
                if let Some(q) = s.queues.get_mut(select) {
                    q.desc = address(q.desc, 0x20);
                }
            }
            0x28..0x30 if !enabled => {
                if let Some(q) = s.queues.get_mut(select) {
                    q.driver = address(q.driver, 0x28);
                }
            }
            0x30..0x38 if !enabled => {
                if let Some(q) = s.queues.get_mut(select) {
                    q.device = address(q.device, 0x30);
                }
            }
            o if (DEVICE_AT..NOTIFY_AT).contains(&o) => {
                return Event::DeviceConfig {
                    offset: o - DEVICE_AT,
                    size,
                    value,
                };
            }
            o if (NOTIFY_AT..BAR_SIZE).contains(&o) => {
                let n = (o - NOTIFY_AT) / u64::from(NOTIFY_MULTIPLIER);
                if usize::try_from(n).is_ok_and(|n| n < s.queues.len()) {
                    return Event::Notify(n as u16);
                }
            }
            _ => {}
        }
        Event::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci_function::PciFunction;

    const NET_MAC: u64 = 1 << 5;

    fn common(t: &mut VirtioPci, offset: u64, size: u8) -> u64 {
        t.read(COMMON_AT + offset, size, &[])
    }

    #[test]
    fn the_capabilities_lead_a_driver_to_each_structure() {
        let caps = capabilities(12);
        let f = PciFunction::new(identity(1, 0x02_00_00), 0xfe01_0000, BAR_SIZE, 11, caps).unwrap();
        assert_eq!(f.read(0, 4), 0x1041_1af4, "virtio-net, modern");
        assert_eq!(f.read(0x08, 4) >> 8, 0x02_00_00, "network controller");
        // Walk the list as a driver does: type and offset of each vendor capability.
        let mut at = f.read(0x34, 1);
        let mut seen = Vec::new();
        while at != 0 {
            assert_eq!(f.read(at, 1), 0x09, "vendor capability");
            let cfg_type = f.read(at + 3, 1);
            let offset = f.read(at + 8, 4);
            if cfg_type == 2 {
                assert_eq!(f.read(at + 16, 4), u64::from(NOTIFY_MULTIPLIER));
            }
            seen.push((cfg_type, offset));
            at = f.read(at + 1, 1);
        }
        assert_eq!(
            seen,
            [(1, COMMON_AT), (2, NOTIFY_AT), (3, ISR_AT), (4, DEVICE_AT)]
        );
    }

    #[test]
    fn a_driver_negotiates_sets_up_its_queues_and_notifies_them() {
        let mut t = VirtioPci::new(NET_MAC, &[256, 256]);
        assert_eq!(common(&mut t, 0x12, 2), 2, "num_queues");
        t.write(0x14, 1, u64::from(ACKNOWLEDGE | DRIVER));
        t.write(0x00, 4, 1);
        assert_eq!(common(&mut t, 0x04, 4), 1, "VERSION_1 in the high word");
        t.write(0x00, 4, 0);
        assert_eq!(common(&mut t, 0x04, 4), NET_MAC);
        t.write(0x08, 4, 0);
        t.write(0x0c, 4, NET_MAC);
        t.write(0x08, 4, 1);
        t.write(0x0c, 4, 1);
        t.write(0x14, 1, u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK));
        assert_ne!(common(&mut t, 0x14, 1) as u8 & FEATURES_OK, 0, "accepted");
        for (q, base) in [(0u16, 0x10_0000u64), (1, 0x20_0000)] {
            t.write(0x16, 2, u64::from(q));
            assert_eq!(common(&mut t, 0x18, 2), 256, "the largest size first");
            t.write(0x18, 2, 128);
            t.write(0x20, 4, base);
            t.write(0x24, 4, 0);
            t.write(0x28, 8, base + 0x1000);
            t.write(0x30, 4, base + 0x2000);
            t.write(0x1c, 2, 1);
            // An enabled queue's set-up no longer changes.
            t.write(0x18, 2, 64);
            t.write(0x20, 4, 0xdead_0000);
        }
        assert_eq!(
            t.write(
                0x14,
                1,
                u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
            ),
            Event::DriverOk
        );
        let q = t.queue_config(1).unwrap();
        assert_eq!(
            (q.size, q.desc, q.driver, q.device),
            (128, 0x20_0000, 0x20_1000, 0x20_2000)
        );
        let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(
            vm_memory::GuestAddress(0),
            0x40_0000,
        )])
        .unwrap();
        assert!(t.queue(0, &mem).is_some());
        let small = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(
            vm_memory::GuestAddress(0),
            0x10_0000,
        )])
        .unwrap();
        assert!(t.queue(1, &small).is_none(), "rings outside memory");
        assert_eq!(t.write(NOTIFY_AT + 4, 2, 1), Event::Notify(1));
        assert_eq!(t.write(NOTIFY_AT + 8, 2, 2), Event::None, "no queue 2");
        // The ISR: set by the device, cleared by the read.
        t.raise(false);
        assert_eq!(t.read(ISR_AT, 1, &[]), u64::from(ISR_QUEUE));
        assert_eq!(t.read(ISR_AT, 1, &[]), 0);
        // The device's configuration, and a write to it handed over.
        assert_eq!(t.read(DEVICE_AT + 1, 2, &[1, 2, 3, 4]), 0x0302);
        assert_eq!(
            t.write(DEVICE_AT + 2, 1, 7),
            Event::DeviceConfig {
                offset: 2,
                size: 1,
                value: 7
            }
        );
        // The state survives a restart; a reset drops it.
        let mut u = VirtioPci::new(NET_MAC, &[256, 256]);
        u.restore(t.state()).unwrap();
        assert_eq!(u.queue_config(1), t.queue_config(1));
        assert_eq!(u.write(0x14, 1, 0), Event::Reset);
        assert_eq!(u.queue_config(1), None);
        assert_eq!(u.status(), 0);
    }

    #[test]
    fn features_not_offered_or_a_legacy_driver_are_refused() {
        let mut t = VirtioPci::new(NET_MAC, &[64]);
        t.write(0x08, 4, 0);
        t.write(0x0c, 4, NET_MAC | 1 << 0); // CSUM: not offered
        t.write(0x08, 4, 1);
        t.write(0x0c, 4, 1);
        t.write(0x14, 1, u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK));
        assert_eq!(common(&mut t, 0x14, 1) as u8 & FEATURES_OK, 0);
        let mut t = VirtioPci::new(NET_MAC, &[64]);
        t.write(0x08, 4, 0);
        t.write(0x0c, 4, NET_MAC); // no VERSION_1
        t.write(0x14, 1, u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK));
        assert_eq!(common(&mut t, 0x14, 1) as u8 & FEATURES_OK, 0);
        // Sizes that are not powers of two or over the maximum keep the old one.
        t.write(0x18, 2, 100);
        t.write(0x18, 2, 128);
        assert_eq!(common(&mut t, 0x18, 2), 64);
        // A recorded state of another device is refused.
        let other = VirtioPci::new(NET_MAC, &[64, 64]).state();
        assert!(t.restore(other).is_err());
    }
}
