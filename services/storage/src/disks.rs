//! What pv-storage serves, as the manifest's `args` say it (`--device`), and the disks
//! behind it: image files the microkernel opened for the service (`files` grants), raw or
//! encrypted under a key the service keeps in VMGS (file id PV_STORAGE_KEYS, which the
//! manifest grants to this service alone). The key is made on first use, and durably stored
//! before the image is first written.

use std::collections::BTreeMap;
use std::fs::File;

use pv_devices::block::encrypted::EncryptedDisk;
use pv_devices::block::encrypted::OpenError;
use pv_devices::block::raw::RawDisk;
use pv_devices::block::BlockError;
use pv_devices::block::Disk;
use pv_devices::block::FileStore;
use pv_devices::block::Store;
use pv_devices::block::BLOCK;
use serde::Deserialize;
use serde::Serialize;
use zeroize::Zeroizing;

/// The device model a listener's front end gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Model {
    /// virtio-blk (`vhost-user-blk-pci` in QEMU).
    Blk,
    /// virtio-scsi with one LUN (`vhost-user-scsi-pci`).
    Scsi,
    /// An NVMe controller on our own guest partition (a PCI function).
    Nvme,
}

/// One `--device` argument: `MODEL,listen=NAME,file=NAME[,encrypted][,size=SIZE]` for the
/// vhost-user models, e.g. `vhost-user-blk,listen=blk,file=blk-disk,encrypted,size=256M`, or
/// `nvme,bar=ADDR,file=NAME[,encrypted][,size=SIZE]` for the partition's NVMe function with
/// BAR 0 at ADDR (the start of the service's `mmio` range).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    pub model: Model,
    /// The listener (`listen` grant) its front end connects to (vhost-user models; the
    /// partition's device gets the partition's channel).
    pub listen: String,
    /// Where BAR 0 sits (the NVMe function).
    pub bar: Option<u64>,
    /// The image (`files` grant).
    pub file: String,
    pub encrypted: bool,
    /// The disk's size when the image is new (required then).
    pub size: Option<u64>,
}

impl DeviceSpec {
    pub fn parse(arg: &str) -> Result<DeviceSpec, String> {
        let mut parts = arg.split(',');
        let model = match parts.next().unwrap_or("") {
            "vhost-user-blk" => Model::Blk,
            "vhost-user-scsi" => Model::Scsi,
            "nvme" => Model::Nvme,
            other => {
                return Err(format!(
                    "device model \"{other}\": use vhost-user-blk, vhost-user-scsi or nvme"
                ))
            }
        };
        let (mut listen, mut file, mut encrypted, mut size, mut bar) =
            (None, None, false, None, None);
        for part in parts {
            match part.split_once('=') {
                Some(("listen", v)) if !v.is_empty() => listen = Some(v.to_string()),
                Some(("bar", v)) => {
                    let hex = v.strip_prefix("0x").unwrap_or(v);
                    bar = Some(
                        u64::from_str_radix(hex, 16)
                            .map_err(|_| format!("bar \"{v}\" is not a hex address"))?,
                    );
                }
                Some(("file", v)) if !v.is_empty() => file = Some(v.to_string()),
                Some(("size", v)) => size = Some(parse_size(v)?),
                None if part == "encrypted" => encrypted = true,
                _ => {
                    return Err(format!(
                        "\"{part}\" in \"{arg}\": expected listen=NAME, bar=ADDR, file=NAME, encrypted or size=SIZE"
                    ))
                }
            }
        }
        let listen = match (model, listen, bar) {
            (Model::Nvme, None, Some(_)) => String::new(),
            (Model::Nvme, _, _) => {
                return Err(format!(
                    "\"{arg}\": the NVMe function is the partition's: it takes bar=ADDR and no listener"
                ))
            }
            (_, Some(l), None) => l,
            (_, _, Some(_)) => return Err(format!("\"{arg}\": bar= is for the NVMe function")),
            (_, None, None) => return Err(format!("\"{arg}\" names no listener (listen=NAME)")),
        };
        Ok(DeviceSpec {
            model,
            listen,
            bar,
            file: file.ok_or_else(|| format!("\"{arg}\" names no image (file=NAME)"))?,
            encrypted,
            size,
        })
    }

    /// Every `--device` of a command line.
    pub fn from_args(args: impl IntoIterator<Item = String>) -> Result<Vec<DeviceSpec>, String> {
        let mut devices: Vec<DeviceSpec> = Vec::new();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--device" => {
                    let value = args.next().ok_or("--device needs a value")?;
                    let spec = DeviceSpec::parse(&value)?;
                    if spec.model == Model::Nvme && devices.iter().any(|d| d.model == Model::Nvme) {
                        return Err(
                            "one NVMe function per service (one BAR, one partition channel)".into(),
                        );
                    }
                    if spec.model != Model::Nvme && devices.iter().any(|d| d.listen == spec.listen)
                    {
                        return Err(format!("listener \"{}\" serves two devices", spec.listen));
                    }
                    if devices.iter().any(|d| d.file == spec.file) {
                        return Err(format!("image \"{}\" backs two devices", spec.file));
                    }
                    devices.push(spec);
                }
                other => return Err(format!("unknown argument \"{other}\"")),
            }
        }
        Ok(devices)
    }
}

/// `64M`, `1G`, `4096`: bytes, a whole number of 4 KiB blocks.
fn parse_size(text: &str) -> Result<u64, String> {
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, ""),
    };
    let shift = match unit {
        "" => 0,
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        "T" | "t" => 40,
        _ => return Err(format!("size \"{text}\": use bytes or K, M, G, T")),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("size \"{text}\" is not a number"))?;
    let bytes = n
        .checked_mul(1 << shift)
        .filter(|b| *b > 0 && b % BLOCK as u64 == 0)
        .ok_or_else(|| format!("size \"{text}\" is not a whole number of 4 KiB blocks"))?;
    Ok(bytes)
}

/// Disk keys by image name, as kept in VMGS (postcard; the service reads only what it wrote,
/// but the store is another process: a record that does not decode is an error, not a reset).
#[derive(Default, Serialize, Deserialize)]
pub struct KeyTable {
    version: u8,
    keys: BTreeMap<String, [u8; 32]>,
}

impl Drop for KeyTable {
    fn drop(&mut self) {
        for key in self.keys.values_mut() {
            zeroize::Zeroize::zeroize(key);
        }
    }
}

pub const KEY_TABLE_VERSION: u8 = 1;

impl KeyTable {
    pub fn decode(bytes: &[u8]) -> Result<KeyTable, String> {
        let table: KeyTable = postcard::from_bytes(bytes)
            .map_err(|e| format!("the disk key record does not decode: {e}"))?;
        if table.version != KEY_TABLE_VERSION {
            return Err(format!(
                "the disk key record is version {}, this build reads {KEY_TABLE_VERSION}",
                table.version
            ));
        }
        Ok(table)
    }

    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(postcard::to_allocvec(self).expect("a key table always encodes"))
    }

    pub fn get(&self, image: &str) -> Option<Zeroizing<[u8; 32]>> {
        self.keys.get(image).map(|k| Zeroizing::new(*k))
    }

    /// Adds a fresh random key for `image`.
    pub fn add(&mut self, image: &str) -> Result<Zeroizing<[u8; 32]>, String> {
        let mut key = Zeroizing::new([0u8; 32]);
        getrandom::getrandom(&mut key[..]).map_err(|e| format!("no randomness: {e}"))?;
        self.version = KEY_TABLE_VERSION;
        self.keys.insert(image.to_string(), *key);
        Ok(key)
    }
}

/// Where disk keys are kept (VMGS through the service's channel; memory in tests).
pub trait KeyStore {
    /// The key table, or an empty one if none was ever written.
    fn load(&mut self) -> Result<KeyTable, String>;
    /// Replaces the table durably.
    fn store(&mut self, table: &KeyTable) -> Result<(), String>;
}

/// The key for `image`: the one kept, or a new one kept durably first (`new_image` says
/// whether a new key may be made: never for an image that already holds data).
fn key_for(
    keys: &mut dyn KeyStore,
    image: &str,
    new_image: bool,
) -> Result<Zeroizing<[u8; 32]>, String> {
    let mut table = keys.load()?;
    if let Some(key) = table.get(image) {
        return Ok(key);
    }
    if !new_image {
        return Err(format!(
            "image \"{image}\" is encrypted, but the guest-state file holds no key for it \
             (was the image copied from another VM, or the guest-state file replaced?)"
        ));
    }
    let key = table.add(image)?;
    keys.store(&table)?;
    tracing::info!(image, "made a disk key (kept in VMGS PV_STORAGE_KEYS)");
    Ok(key)
}

/// Most bytes a raw disk writes to its image with one `pwrite` (see [`PiecewiseWrites`]):
/// the virtio-blk model's largest segment. On Linux 6.18/ext4 (fio on the host, see
/// docs/benchmarks.md "Storage"), random 4 KiB writes into a file written in 64 KiB pieces
/// run at 140k/s, against 37k/s after 1 MiB pieces and 281k/s after 4 KiB ones; and a 1 MiB
/// guest write is 16 calls rather than 256.
const WRITE_PIECE: usize = 64 << 10;

/// A raw disk's image file, written in pieces of at most [`WRITE_PIECE`] bytes.
///
/// Linux (6.16 and later, on ext4 and others) caches a file in folios as large as the writes
/// that bring its pages in: a guest's 1 MiB write passed on whole leaves 1 MiB folios, and
/// each later 4 KiB write into one dirties, and is written back as, the whole folio (the
/// guest's random writes then cost twice the encrypted disk's CPU, which writes block by
/// block). Reads are passed on whole. Splitting changes nothing the guest can see: a write
/// is acknowledged after all of it, and a `pwrite` of 1 MiB was never atomic either.
struct PiecewiseWrites<S: Store>(S);

impl<S: Store> Store for PiecewiseWrites<S> {
    fn size(&self) -> Result<u64, BlockError> {
        self.0.size()
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.0.read_at(offset, buf)
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), BlockError> {
        for (k, piece) in data.chunks(WRITE_PIECE).enumerate() {
            self.0.write_at(offset + (k * WRITE_PIECE) as u64, piece)?;
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<(), BlockError> {
        self.0.sync()
    }

    fn set_len(&mut self, len: u64) -> Result<(), BlockError> {
        self.0.set_len(len)
    }
}

/// Whether the image holds nothing yet: empty, or a first block of zeros (an image whose
/// creation stopped before its header was written: nothing was ever served from it).
fn is_blank(store: &mut FileStore) -> Result<bool, String> {
    let size = store.size().map_err(|e| e.to_string())?;
    if size < BLOCK as u64 {
        return Ok(size == 0);
    }
    let mut first = vec![0u8; BLOCK];
    store.read_at(0, &mut first).map_err(|e| e.to_string())?;
    Ok(first.iter().all(|b| *b == 0))
}

/// Opens the disk `spec` describes in `file`; an encrypted one's key is kept in `keys`.
pub fn open(
    spec: &DeviceSpec,
    file: File,
    keys: Option<&mut dyn KeyStore>,
) -> Result<Box<dyn Disk + Send>, String> {
    let mut store = FileStore(file);
    let what = |e: &dyn std::fmt::Display| format!("image \"{}\": {e}", spec.file);
    if spec.encrypted {
        let keys = keys.ok_or_else(|| {
            what(&"is encrypted: the service needs a vmgs call granting PV_STORAGE_KEYS")
        })?;
        let blank = is_blank(&mut store).map_err(|e| what(&e))?;
        let key = key_for(keys, &spec.file, blank)?;
        if blank {
            let size = spec
                .size
                .ok_or_else(|| what(&"a new encrypted image needs size=SIZE in its --device"))?;
            let disk =
                EncryptedDisk::create(store, &key, size / BLOCK as u64).map_err(|e| what(&e))?;
            tracing::info!(image = %spec.file, bytes = size, "new encrypted disk");
            return Ok(Box::new(disk));
        }
        return match EncryptedDisk::open(store, &key) {
            Ok(disk) => Ok(Box::new(disk)),
            Err(OpenError::NotEncrypted) => Err(what(
                &"holds data but no encrypted-disk header: refusing to serve a plaintext image as encrypted",
            )),
            Err(e) => Err(what(&e)),
        };
    }
    if store.size().map_err(|e| what(&e))? == 0 {
        let size = spec
            .size
            .ok_or_else(|| what(&"a new image needs size=SIZE in its --device"))?;
        store.set_len(size).map_err(|e| what(&e))?;
    }
    let disk = RawDisk::new(PiecewiseWrites(store)).map_err(|e| what(&e))?;
    if disk.blocks() == 0 {
        return Err(what(&"is smaller than one 4 KiB block"));
    }
    Ok(Box::new(disk))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct MemKeys(Option<Vec<u8>>, usize);

    impl KeyStore for MemKeys {
        fn load(&mut self) -> Result<KeyTable, String> {
            self.0
                .as_deref()
                .map_or(Ok(KeyTable::default()), KeyTable::decode)
        }
        fn store(&mut self, table: &KeyTable) -> Result<(), String> {
            self.0 = Some(table.encode().to_vec());
            self.1 += 1;
            Ok(())
        }
    }

    fn spec(arg: &str) -> DeviceSpec {
        DeviceSpec::parse(arg).unwrap()
    }

    #[test]
    fn device_arguments_parse_and_bad_ones_say_why() {
        let d = spec("vhost-user-scsi,listen=s,file=img,encrypted,size=64M");
        assert_eq!(d.model, Model::Scsi);
        assert_eq!((d.listen.as_str(), d.file.as_str()), ("s", "img"));
        assert!(d.encrypted);
        assert_eq!(d.size, Some(64 << 20));
        let n = spec("nvme,bar=0xfe000000,file=img,size=1M");
        assert_eq!(
            (n.model, n.bar, n.listen.as_str()),
            (Model::Nvme, Some(0xfe00_0000), "")
        );
        for bad in [
            "nvme,file=img",
            "nvme,listen=a,bar=0x1000,file=img",
            "vhost-user-blk,listen=a,bar=0x1000,file=img",
            "nvme,bar=zz,file=img",
            "virtio-net,listen=a,file=b",
            "vhost-user-blk,file=b",
            "vhost-user-blk,listen=a",
            "vhost-user-blk,listen=a,file=b,size=100",
            "vhost-user-blk,listen=a,file=b,size=4X",
            "vhost-user-blk,listen=a,file=b,size=0",
            "vhost-user-blk,listen=a,file=b,bogus",
        ] {
            assert!(DeviceSpec::parse(bad).is_err(), "{bad}");
        }
        let args = |v: &[&str]| DeviceSpec::from_args(v.iter().map(|s| s.to_string()));
        assert!(args(&[
            "--device",
            "vhost-user-blk,listen=a,file=b",
            "--device",
            "vhost-user-scsi,listen=a,file=c"
        ])
        .is_err());
        assert!(args(&[
            "--device",
            "vhost-user-blk,listen=a,file=b",
            "--device",
            "vhost-user-scsi,listen=c,file=b"
        ])
        .is_err());
        assert!(args(&["--device"]).is_err());
        assert_eq!(args(&[]).unwrap(), vec![]);
    }

    fn temp_file() -> (File, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!(
            "pv-storage-test-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        (f, path)
    }

    #[test]
    fn an_encrypted_disk_keeps_its_key_in_the_store_made_once_before_the_image() {
        let (f, path) = temp_file();
        let mut keys = MemKeys::default();
        let d = spec("vhost-user-blk,listen=a,file=img,encrypted,size=64K");
        let mut disk = open(&d, f.try_clone().unwrap(), Some(&mut keys)).unwrap();
        assert_eq!(disk.blocks(), 16);
        disk.write(3, &[0x5a; BLOCK]).unwrap();
        disk.flush().unwrap();
        drop(disk);
        assert_eq!(keys.1, 1, "one key, stored once");
        let raw = std::fs::read(&path).unwrap();
        assert!(
            !raw.windows(64).any(|w| w.iter().all(|b| *b == 0x5a)),
            "plaintext in the image"
        );
        // Reopened: same key, same data, no new key.
        let mut disk = open(&d, f.try_clone().unwrap(), Some(&mut keys)).unwrap();
        let mut back = vec![0u8; BLOCK];
        disk.read(3, &mut back).unwrap();
        assert!(back.iter().all(|b| *b == 0x5a));
        assert_eq!(keys.1, 1);
        drop(disk);
        // Without its key, the image is refused, not re-made.
        let err = open(&d, f.try_clone().unwrap(), Some(&mut MemKeys::default()))
            .err()
            .unwrap();
        assert!(err.contains("holds no key"), "{err}");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_plaintext_image_is_not_served_as_encrypted_and_raw_images_are_sized() {
        let (f, path) = temp_file();
        let raw = spec("vhost-user-blk,listen=a,file=img,size=8K");
        let mut disk = open(&raw, f.try_clone().unwrap(), Some(&mut MemKeys::default())).unwrap();
        assert_eq!(disk.blocks(), 2);
        disk.write(0, &[1; BLOCK]).unwrap();
        drop(disk);
        let enc = spec("vhost-user-blk,listen=a,file=img,encrypted,size=8K");
        let err = open(&enc, f.try_clone().unwrap(), Some(&mut MemKeys::default()))
            .err()
            .unwrap();
        assert!(err.contains("no key"), "{err}");
        let mut keys = MemKeys::default();
        keys.store(&{
            let mut t = KeyTable::default();
            t.add("img").unwrap();
            t
        })
        .unwrap();
        let err = open(&enc, f.try_clone().unwrap(), Some(&mut keys))
            .err()
            .unwrap();
        assert!(err.contains("plaintext"), "{err}");
        let unsized_spec = spec("vhost-user-blk,listen=a,file=other");
        let (g, path2) = temp_file();
        assert!(open(&unsized_spec, g, Some(&mut MemKeys::default()))
            .err()
            .unwrap()
            .contains("size="));
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_file(path2);
    }

    #[test]
    fn a_key_record_that_does_not_decode_is_an_error() {
        assert!(KeyTable::decode(&[9, 9, 9]).is_err());
        let mut t = KeyTable::default();
        t.add("x").unwrap();
        let mut bytes = t.encode().to_vec();
        bytes[0] = 2;
        assert!(KeyTable::decode(&bytes)
            .err()
            .unwrap()
            .contains("version 2"));
    }

    /// A store that records the writes it is given.
    #[derive(Default)]
    struct Recording {
        image: Vec<u8>,
        writes: Vec<(u64, usize)>,
    }

    impl Store for Recording {
        fn size(&self) -> Result<u64, BlockError> {
            Ok(self.image.len() as u64)
        }
        fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
            let at = offset as usize;
            buf.copy_from_slice(&self.image[at..at + buf.len()]);
            Ok(())
        }
        fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), BlockError> {
            self.writes.push((offset, data.len()));
            let at = offset as usize;
            self.image[at..at + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn sync(&mut self) -> Result<(), BlockError> {
            Ok(())
        }
        fn set_len(&mut self, len: u64) -> Result<(), BlockError> {
            self.image.resize(len as usize, 0);
            Ok(())
        }
    }

    #[test]
    fn a_raw_image_is_written_in_pieces_of_at_most_64_kib_that_add_up_to_the_write() {
        let mut store = PiecewiseWrites(Recording {
            image: vec![0; 4 << 20],
            ..Default::default()
        });
        let data: Vec<u8> = (0..(1 << 20) + 3 * BLOCK)
            .map(|i| (i % 251) as u8)
            .collect();
        let at = 5 * BLOCK as u64;
        store.write_at(at, &data).unwrap();
        let writes = &store.0.writes;
        assert_eq!(writes.len(), 17, "{writes:?}");
        assert!(writes.iter().all(|(_, len)| *len <= WRITE_PIECE));
        let mut next = at;
        for (offset, len) in writes {
            assert_eq!(*offset, next, "pieces in order, back to back");
            next += *len as u64;
        }
        assert_eq!(next, at + data.len() as u64);
        let mut back = vec![0u8; data.len()];
        store.read_at(at, &mut back).unwrap();
        assert_eq!(back, data);
        // A small write is one call.
        store.write_at(0, &[7; BLOCK]).unwrap();
        assert_eq!(store.0.writes.last(), Some(&(0, BLOCK)));
    }
}
