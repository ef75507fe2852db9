//! An open VMGS file: reading, and crash-consistent updates by shadow paging.
//!
//! Every change (write, delete, move, encryption, key change) is one *commit*: new extents
//! are allocated (best fit) outside every extent the active state uses, the new data, the new
//! file table and (when encrypted) the new extended file table are written there, the device
//! is flushed, and only then does a header with sequence + 1 go into the inactive header
//! slot, followed by a second flush. Until that header lands, the active state on disk is
//! untouched; once it lands, the new state is complete. A crash anywhere leaves exactly one of
//! the two. A commit that fails after its header write began poisons the handle: what is on
//! disk is then only known after reopening.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::string::ToString;
use alloc::vec;
use alloc::vec::Vec;

use ipc_defs::services::vmgs::FileId;
use zerocopy::little_endian::U16;
use zerocopy::little_endian::U32;
use zerocopy::little_endian::U64;
use zerocopy::FromBytes;
use zerocopy::FromZeros;
use zerocopy::IntoBytes;
use zeroize::Zeroize;

use crate::crypto;
use crate::crypto::Key;
use crate::error::ContainerError;
use crate::error::Error;
use crate::error::HeaderProblem;
use crate::error::Result;
use crate::format::*;
use crate::storage::Storage;
use crate::vhd;
use crate::vhd::Footer;

/// Bytes of a header slot on disk (one 512-byte sector; the rest after 168 bytes is zero).
const HEADER_SECTOR: usize = vhd::SECTOR as usize;

/// What a caller may learn about one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileInfo {
    pub id: FileId,
    /// First block.
    pub offset: u32,
    /// Blocks allocated.
    pub blocks: u32,
    /// Bytes of content.
    pub size: u64,
    pub encrypted: bool,
}

/// The two header copies as found on disk, valid or not (for `dump-headers`).
#[derive(Clone, Debug)]
pub struct HeaderReport {
    pub headers: [Header; 2],
    pub problems: [Option<HeaderProblem>; 2],
    /// The active slot, or why none is.
    pub active: core::result::Result<usize, String>,
}

/// The extended file table in the clear: it holds every file's key, so it is wiped on drop.
#[derive(Clone)]
struct SecretTable(Box<ExtendedFileTable>);

impl Drop for SecretTable {
    fn drop(&mut self) {
        self.0.as_mut_bytes().zeroize();
    }
}

/// The key material of an unlocked file.
#[derive(Clone)]
struct Unlocked {
    datastore: Key,
    /// The header key slot the datastore key opens.
    slot: usize,
    ext: SecretTable,
}

/// An open VMGS file on a [`Storage`].
pub struct Vmgs<S: Storage> {
    storage: S,
    image_size: u64,
    blocks: u32,
    active_slot: usize,
    header: Header,
    table: Box<FileTable>,
    unlocked: Option<Unlocked>,
    poisoned: bool,
    /// The file was unlocked with an all-zero metadata key (the reference writer's defect).
    zero_metadata_key: bool,
    /// Largest file `read_raw` reads.
    read_limit: u64,
    /// Problems found on open that did not stop it (e.g. an invalid older header).
    warnings: Vec<String>,
}

impl<S: Storage> core::fmt::Debug for Vmgs<S> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Vmgs")
            .field("image_size", &self.image_size)
            .field("active_slot", &self.active_slot)
            .field("sequence", &self.header.sequence.get())
            .field("encrypted", &self.is_encrypted())
            .field("unlocked", &self.unlocked.is_some())
            .finish_non_exhaustive()
    }
}

/// Reads and checks the VHD footer; returns the image size.
pub fn image_size<S: Storage>(storage: &mut S) -> Result<u64> {
    let len = storage.size().map_err(Error::io("reading the file size"))?;
    if len == 0 {
        return Err(Error::Empty);
    }
    // A version 1 file is a GPT disk, with or without a VHD footer: say so first.
    if len >= 520 {
        let mut sig = [0u8; 8];
        storage
            .read_at(512, &mut sig)
            .map_err(Error::io("reading the file"))?;
        if sig == V1_SIGNATURE {
            return Err(Error::V1Format);
        }
    }
    if len < vhd::FOOTER_BYTES + vhd::MIN_IMAGE || !len.is_multiple_of(vhd::SECTOR) {
        return Err(ContainerError::BadLength(len).into());
    }
    let mut footer = Footer::new_zeroed();
    storage
        .read_at(len - vhd::FOOTER_BYTES, footer.as_mut_bytes())
        .map_err(Error::io("reading the VHD footer"))?;
    Ok(footer.image_size(len)?)
}

fn read_header_pair<S: Storage>(storage: &mut S) -> Result<[Header; 2]> {
    let mut first = [0u8; 2 * HEADER_SECTOR];
    storage
        .read_at(0, &mut first)
        .map_err(Error::io("reading the headers"))?;
    if first[512..520] == V1_SIGNATURE {
        return Err(Error::V1Format);
    }
    let h = |at: usize| {
        Header::read_from_bytes(&first[at..at + HEADER_BYTES as usize])
            .expect("slice has the header's size")
    };
    Ok([h(0), h(HEADER_SECTOR)])
}

fn check_header(h: &Header) -> core::result::Result<(), HeaderProblem> {
    if h.as_bytes().iter().all(|b| *b == 0) {
        return Err(HeaderProblem::Empty);
    }
    if h.signature != SIGNATURE {
        return Err(HeaderProblem::Signature);
    }
    if h.version.get() != VERSION_3 {
        return Err(HeaderProblem::Version(h.version.get()));
    }
    if h.header_size.get() != HEADER_BYTES {
        return Err(HeaderProblem::Size(h.header_size.get()));
    }
    let (offset, size) = (h.file_table_offset.get(), h.file_table_size.get());
    if offset < FIRST_DATA_BLOCK || size != FILE_TABLE_BLOCKS {
        return Err(HeaderProblem::FileTable { offset, size });
    }
    if h.encryption_algorithm.get() > ENCRYPTION_AES_GCM {
        return Err(HeaderProblem::Algorithm(h.encryption_algorithm.get()));
    }
    let (stored, computed) = (h.checksum.get(), h.compute_checksum());
    if stored != computed {
        return Err(HeaderProblem::Checksum { stored, computed });
    }
    Ok(())
}

/// Which of two header copies is active, by the format's rule: if both are valid, the one
/// whose sequence is the other's plus one (wrapping); otherwise the valid one.
fn choose_active(headers: &[Header; 2], problems: &[Option<HeaderProblem>; 2]) -> Result<usize> {
    match problems {
        [None, None] => {
            let (s1, s2) = (headers[0].sequence.get(), headers[1].sequence.get());
            if s1 == s2.wrapping_add(1) {
                Ok(0)
            } else if s2 == s1.wrapping_add(1) {
                Ok(1)
            } else {
                Err(Error::SequenceMismatch { seq1: s1, seq2: s2 })
            }
        }
        [None, Some(_)] => Ok(0),
        [Some(_), None] => Ok(1),
        [Some(a), Some(b)] => {
            if *a == HeaderProblem::Empty && *b == HeaderProblem::Empty {
                Err(Error::Empty)
            } else {
                Err(Error::NoValidHeader {
                    header1: a.clone(),
                    header2: b.clone(),
                })
            }
        }
    }
}

/// Both header copies with their problems and the active one, without opening the file.
pub fn inspect_headers<S: Storage>(storage: &mut S) -> Result<HeaderReport> {
    image_size(storage)?;
    let headers = read_header_pair(storage)?;
    let problems = [
        check_header(&headers[0]).err(),
        check_header(&headers[1]).err(),
    ];
    let active = choose_active(&headers, &problems).map_err(|e| e.to_string());
    Ok(HeaderReport {
        headers,
        problems,
        active,
    })
}

/// Checks every allocated entry of a file table against the image and against each other.
fn check_table(table: &FileTable, header: &Header, blocks: u32) -> Result<()> {
    let mut extents: Vec<(u64, u64, FileId)> = Vec::new();
    for (i, e) in table.entries.iter().enumerate() {
        let id = FileId::new(i as u32).expect("64 entries");
        if !e.exists() {
            continue;
        }
        let (offset, alloc) = (
            u64::from(e.offset.get()),
            u64::from(e.allocation_size.get()),
        );
        let corrupt = |reason: String| Error::CorruptEntry { file: id, reason };
        if offset < u64::from(FIRST_DATA_BLOCK) || offset + alloc > u64::from(blocks) {
            return Err(corrupt(format!(
                "blocks {offset}..{} are outside the image's data blocks 2..{blocks}",
                offset + alloc
            )));
        }
        if e.valid_data_size.get() > alloc * BLOCK_SIZE {
            return Err(corrupt(format!(
                "{} bytes of data in {alloc} allocated blocks",
                e.valid_data_size.get()
            )));
        }
        if i == 0 && (e.offset.get() != header.file_table_offset.get() || alloc != 1) {
            return Err(corrupt(format!(
                "the table's own entry says block {offset} ({alloc} blocks), the header says block {}",
                header.file_table_offset.get()
            )));
        }
        extents.push((offset, offset + alloc, id));
    }
    if !table.entries[0].exists() {
        let ft = u64::from(header.file_table_offset.get());
        extents.push((ft, ft + 1, FileId::FILE_TABLE));
    }
    extents.sort_unstable();
    for pair in extents.windows(2) {
        if pair[1].0 < pair[0].1 {
            return Err(Error::Overlap {
                a: pair[0].2,
                b: pair[1].2,
            });
        }
    }
    Ok(())
}

/// Clears the extended-table entries of ids the file table does not allocate, and returns
/// those ids.
///
/// The reference tool's `delete` takes no key: it removes the id from the file table and
/// leaves its entry (attributes and key) in the encrypted extended table, and its reader
/// ignores such an entry. So do we, rather than refuse the file: a host can always delete
/// a file (or roll the whole file back), so an unlisted id is a deletion, never a forgery,
/// and the key is wiped here so that nothing can use it (a later entry for the id gets a
/// fresh key, or none). An entry that is not one our or the reference's writer makes
/// (attribute bits beyond encrypted/authenticated, reserved bytes set) is still corruption.
fn forget_stale_entries(ext: &mut SecretTable, table: &FileTable) -> Result<Vec<FileId>> {
    let mut stale = Vec::new();
    for i in 1..FILE_COUNT - 1 {
        let x = &mut ext.0.entries[i];
        if table.entries[i].exists() || *x == ExtendedFileEntry::default() {
            continue;
        }
        let id = FileId::new(i as u32).expect("64 entries");
        let attributes = x.attributes.get();
        if attributes & !(ATTR_ENCRYPTED | ATTR_AUTHENTICATED) != 0 || x.reserved != [0; 28] {
            return Err(Error::CorruptEntry {
                file: id,
                reason: format!(
                    "the extended file table holds a malformed entry (attributes {attributes:#x}) for an id the file table does not allocate"
                ),
            });
        }
        x.as_mut_bytes().zeroize();
        stale.push(id);
    }
    Ok(stale)
}

/// Finds `need` free blocks: the smallest gap that fits, the lowest such on a tie.
fn best_fit(used: &[(u32, u32)], need: u32, blocks: u32) -> Option<u32> {
    let mut sorted: Vec<(u32, u32)> = used.to_vec();
    sorted.sort_unstable();
    let mut best: Option<(u32, u32)> = None; // (gap size, start)
    let mut consider = |start: u32, end: u32| {
        let gap = end.saturating_sub(start);
        if gap >= need && best.is_none_or(|(size, _)| gap < size) {
            best = Some((gap, start));
        }
    };
    let mut last_end = FIRST_DATA_BLOCK;
    for (offset, len) in sorted {
        consider(last_end, offset);
        last_end = last_end.max(offset.saturating_add(len));
    }
    consider(last_end, blocks);
    best.map(|(_, start)| start)
}

fn blocks_for(bytes: u64) -> u64 {
    bytes.div_ceil(BLOCK_SIZE).max(1)
}

/// One file's new contents in a commit.
struct NewFile {
    id: FileId,
    data: Vec<u8>,
    /// Stored as is even in an encrypted file (a key protector, readable before unlocking).
    plain: bool,
}

impl Drop for NewFile {
    fn drop(&mut self) {
        self.data.zeroize();
    }
}

/// The state a commit builds before it is written.
struct Plan {
    table: Box<FileTable>,
    ext: Option<SecretTable>,
    files: Vec<NewFile>,
    /// Whether to encrypt the files and rewrite the extended table.
    encrypted: bool,
    header: Header,
}

impl<S: Storage> Vmgs<S> {
    /// Opens an existing file. With `key`, an encrypted file is unlocked (and a wrong key is
    /// [`Error::WrongKey`]); without it, only unencrypted contents and metadata can be read.
    /// A key for an unencrypted file is [`Error::NotEncrypted`].
    pub fn open(mut storage: S, key: Option<&Key>) -> Result<Vmgs<S>> {
        let image_size = image_size(&mut storage)?;
        let blocks = (image_size / BLOCK_SIZE) as u32;
        let headers = read_header_pair(&mut storage)?;
        let problems = [
            check_header(&headers[0]).err(),
            check_header(&headers[1]).err(),
        ];
        let active_slot = choose_active(&headers, &problems)?;
        let mut warnings = Vec::new();
        if let Some(p) = &problems[1 - active_slot] {
            if *p != HeaderProblem::Empty {
                warnings.push(format!(
                    "header {} is invalid ({p}); header {} is used",
                    2 - active_slot,
                    active_slot + 1
                ));
            }
        }
        let header = headers[active_slot];
        // As the reference reader: a valid header whose table lies outside the image makes
        // the file corrupt (it is not a reason to fall back).
        if header.file_table_offset.get() >= blocks {
            return Err(Error::CorruptEntry {
                file: FileId::FILE_TABLE,
                reason: format!(
                    "the active header puts the file table at block {}, outside the image's {blocks} blocks",
                    header.file_table_offset.get()
                ),
            });
        }
        let mut table = Box::<FileTable>::default();
        storage
            .read_at(
                u64::from(header.file_table_offset.get()) * BLOCK_SIZE,
                table.as_mut_bytes(),
            )
            .map_err(Error::io("reading the file table"))?;
        check_table(&table, &header, blocks)?;
        let mut vmgs = Vmgs {
            storage,
            image_size,
            blocks,
            active_slot,
            header,
            table,
            unlocked: None,
            poisoned: false,
            zero_metadata_key: false,
            read_limit: u64::MAX,
            warnings,
        };
        match (key, vmgs.is_encrypted()) {
            (Some(key), true) => vmgs.unlock(key)?,
            (Some(_), false) => return Err(Error::NotEncrypted),
            (None, _) => {}
        }
        Ok(vmgs)
    }

    fn unlock(&mut self, key: &Key) -> Result<()> {
        let mut found = None;
        for (slot, ks) in self.header.key_slots.iter().enumerate() {
            if ks.is_empty() {
                continue;
            }
            let mut wrapped = ks.wrapped_key;
            if crypto::open(key, &ks.nonce, &ks.tag, &mut wrapped) {
                found = Some((slot, Key::from_bytes(wrapped)));
                wrapped.zeroize();
                break;
            }
        }
        let (slot, metadata_key) = found.ok_or(Error::WrongKey)?;
        let entry = self.table.entries[FileId::EXTENDED_FILE_TABLE.index()];
        if !entry.exists() || entry.valid_data_size.get() != FILE_TABLE_BYTES as u64 {
            return Err(Error::CorruptEntry {
                file: FileId::EXTENDED_FILE_TABLE,
                reason: format!(
                    "an encrypted file needs a {FILE_TABLE_BYTES}-byte extended file table; the entry has {} bytes in {} blocks",
                    entry.valid_data_size.get(),
                    entry.allocation_size.get()
                ),
            });
        }
        let mut ext = SecretTable(Box::<ExtendedFileTable>::default());
        self.storage
            .read_at(
                u64::from(entry.offset.get()) * BLOCK_SIZE,
                ext.0.as_mut_bytes(),
            )
            .map_err(Error::io("reading the extended file table"))?;
        if !crypto::open(
            &metadata_key,
            &entry.nonce,
            &entry.tag,
            ext.0.as_mut_bytes(),
        ) {
            return Err(Error::Authentication(FileId::EXTENDED_FILE_TABLE));
        }
        let stale = forget_stale_entries(&mut ext, &self.table)?;
        if !stale.is_empty() {
            self.warnings.push(format!(
                "the extended file table still holds a key for {} (the reference tool's keyless `delete` leaves it): not allocated; the key is ignored and dropped by the next change",
                stale
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if metadata_key.is_zero() {
            self.zero_metadata_key = true;
            self.warnings.push(
                "the metadata key is all zero (written by a defective reference tool): whoever holds an old copy of this file can forge its contents; the next change re-keys it, and `update-key` also retires the datastore key that wrapped the zero key"
                    .into(),
            );
        }
        self.unlocked = Some(Unlocked {
            datastore: key.clone(),
            slot,
            ext,
        });
        Ok(())
    }

    /// Creates a new file of `image_size` bytes (plus the VHD footer) on `storage`, encrypted
    /// with `key` if one is given. The storage should be empty: the caller truncates a file
    /// it replaces, so no old contents survive in unused blocks.
    pub fn create(mut storage: S, image_size: u64, key: Option<&Key>) -> Result<Vmgs<S>> {
        vhd::check_image_size(image_size)?;
        let blocks = (image_size / BLOCK_SIZE) as u32;
        // The smallest image the check above allows holds what the first commit writes: the
        // two header blocks, the file table and the extended file table.
        const _: () = assert!(vhd::MIN_IMAGE / BLOCK_SIZE >= FIRST_DATA_BLOCK as u64 + 2);
        let mut unique_id = [0u8; 16];
        crypto::fill_random(&mut unique_id)?;
        let footer = Footer::new(image_size, unique_id);
        storage
            .write_at(image_size, footer.as_bytes())
            .map_err(Error::io("writing the VHD footer"))?;
        storage
            .write_at(0, &[0u8; 2 * HEADER_SECTOR])
            .map_err(Error::io("clearing the headers"))?;
        // Sequence 0 in slot 1 (never written), so the first commit is sequence 1 in slot 0.
        let mut header = Header::new_zeroed();
        header.signature = SIGNATURE;
        header.version = U32::new(VERSION_3);
        header.header_size = U32::new(HEADER_BYTES);
        header.file_table_offset = U32::new(FIRST_DATA_BLOCK);
        header.file_table_size = U32::new(FILE_TABLE_BLOCKS);
        let mut vmgs = Vmgs {
            storage,
            image_size,
            blocks,
            active_slot: 1,
            header,
            table: Box::<FileTable>::default(),
            unlocked: None,
            poisoned: false,
            zero_metadata_key: false,
            read_limit: u64::MAX,
            warnings: Vec::new(),
        };
        // The first commit allocates the file table at block 2 and the extended file table at
        // block 3, as the reference tool does; nothing is live yet.
        let mut plan = vmgs.plan()?;
        plan.table.entries[0] = FileEntry::default();
        match key {
            Some(key) => {
                if key.is_zero() {
                    return Err(Error::WrongKey);
                }
                plan.header.encryption_algorithm = U16::new(ENCRYPTION_AES_GCM);
                plan.encrypted = true;
                plan.ext = Some(SecretTable(Box::<ExtendedFileTable>::default()));
                vmgs.unlocked = Some(Unlocked {
                    datastore: key.clone(),
                    slot: 0,
                    ext: SecretTable(Box::<ExtendedFileTable>::default()),
                });
                vmgs.commit(plan, true)?;
            }
            None => vmgs.commit(plan, true)?,
        }
        Ok(vmgs)
    }

    pub fn is_encrypted(&self) -> bool {
        self.header.is_encrypted()
    }

    pub fn is_unlocked(&self) -> bool {
        self.unlocked.is_some()
    }

    /// Image size in bytes (without the VHD footer).
    pub fn image_size(&self) -> u64 {
        self.image_size
    }

    /// The active header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The active header slot (0 or 1).
    pub fn active_slot(&self) -> usize {
        self.active_slot
    }

    /// Problems found on open that did not prevent it.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Whether the file was unlocked with the all-zero metadata key of the defective
    /// reference writer. Such a file's contents can be forged by anyone holding an old copy
    /// of it (its zero-key extended table can be replayed); the service refuses it.
    pub fn has_zero_metadata_key(&self) -> bool {
        self.zero_metadata_key
    }

    /// Whether a failed commit left the on-disk state unknown.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// The storage underneath (for inspection; writing to it bypasses every guarantee).
    pub fn storage_mut(&mut self) -> &mut S {
        &mut self.storage
    }

    /// The storage, e.g. to reopen it after the handle was poisoned.
    pub fn into_storage(self) -> S {
        self.storage
    }

    /// Whether a file is stored encrypted. Unlocked, only the authenticated extended table
    /// says so, as in the reference reader: the file table's attributes are the host's to
    /// write, and an entry it marks encrypted for an id the extended table holds no key for
    /// would otherwise be "decrypted" with the all-zero key (contents anyone can forge).
    /// Locked, the file table's attributes are all there is (for listing only).
    fn entry_encrypted(&self, id: FileId) -> bool {
        let attributes = match &self.unlocked {
            Some(u) => u.ext.0.entries[id.index()].attributes.get(),
            None => self.table.entries[id.index()].attributes.get(),
        };
        attributes & (ATTR_ENCRYPTED | ATTR_AUTHENTICATED) != 0
    }

    /// Every allocated file, the two tables included, in id order.
    pub fn files(&self) -> Vec<FileInfo> {
        self.table
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.exists())
            .map(|(i, e)| {
                let id = FileId::new(i as u32).expect("64 entries");
                FileInfo {
                    id,
                    offset: e.offset.get(),
                    blocks: e.allocation_size.get(),
                    size: e.valid_data_size.get(),
                    encrypted: self.entry_encrypted(id),
                }
            })
            .collect()
    }

    /// One file's entry, if it is allocated.
    pub fn file_info(&self, id: FileId) -> Result<FileInfo> {
        self.files()
            .into_iter()
            .find(|f| f.id == id)
            .ok_or(Error::NotFound(id))
    }

    /// Refuses to read files larger than `max` bytes (the default is no limit beyond the
    /// image): a process with a memory budget sets it so a hostile size cannot exhaust it.
    pub fn set_read_limit(&mut self, max: u64) {
        self.read_limit = max;
    }

    /// The stored bytes of a file as they are on disk (ciphertext for an encrypted file).
    pub fn read_raw(&mut self, id: FileId) -> Result<Vec<u8>> {
        self.check_usable()?;
        let e = self.table.entries[id.index()];
        if !e.exists() {
            return Err(Error::NotFound(id));
        }
        if e.valid_data_size.get() > self.read_limit {
            return Err(Error::TooLarge {
                file: id,
                bytes: e.valid_data_size.get(),
                limit: self.read_limit,
            });
        }
        // check_table bounded the size by the image, which the device really holds.
        let mut data = vec![0u8; e.valid_data_size.get() as usize];
        self.storage
            .read_at(u64::from(e.offset.get()) * BLOCK_SIZE, &mut data)
            .map_err(Error::io("reading file data"))?;
        Ok(data)
    }

    /// A file's contents, decrypted and authenticated. In an encrypted file, a file that is
    /// not encrypted is refused ([`Error::Unauthenticated`]): the host could have put it
    /// there. [`Vmgs::read_unauthenticated`] reads such a file on purpose.
    pub fn read_file(&mut self, id: FileId) -> Result<Vec<u8>> {
        if self.is_encrypted()
            && self.unlocked.is_some()
            && id.is_user_file()
            && !self.entry_encrypted(id)
            && self.table.entries[id.index()].exists()
        {
            return Err(Error::Unauthenticated(id));
        }
        self.read_unauthenticated(id)
    }

    /// A file's contents, decrypted and authenticated if it is encrypted, and as stored if it
    /// is not (even in an encrypted file: e.g. one written without the key by the reference
    /// tool). For tools that show such files with a warning; never for the guest.
    pub fn read_unauthenticated(&mut self, id: FileId) -> Result<Vec<u8>> {
        if id == FileId::EXTENDED_FILE_TABLE && self.is_encrypted() {
            // Its plaintext is every file's key.
            return Err(Error::Reserved(id));
        }
        let mut data = self.read_raw(id)?;
        if !self.entry_encrypted(id) || id == FileId::EXTENDED_FILE_TABLE {
            return Ok(data);
        }
        let Some(unlocked) = &self.unlocked else {
            return Err(Error::NeedsKey);
        };
        let e = &self.table.entries[id.index()];
        let key = Key::from_bytes(unlocked.ext.0.entries[id.index()].key);
        if !crypto::open(&key, &e.nonce, &e.tag, &mut data) {
            return Err(Error::Authentication(id));
        }
        Ok(data)
    }

    fn check_usable(&self) -> Result<()> {
        if self.poisoned {
            Err(Error::Poisoned)
        } else {
            Ok(())
        }
    }

    /// Checks that a change may be made: the handle is usable and, for an encrypted file,
    /// unlocked (its extended table must be rewritten).
    fn check_writable(&self) -> Result<()> {
        self.check_usable()?;
        if self.is_encrypted() && self.unlocked.is_none() {
            return Err(Error::NeedsKey);
        }
        Ok(())
    }

    fn check_user_id(id: FileId) -> Result<()> {
        if id.is_user_file() {
            Ok(())
        } else {
            Err(Error::Reserved(id))
        }
    }

    /// The next state, starting as a copy of the current one.
    fn plan(&self) -> Result<Plan> {
        let mut table = Box::<FileTable>::default();
        *table = *self.table;
        Ok(Plan {
            table,
            ext: self.unlocked.as_ref().map(|u| u.ext.clone()),
            files: Vec::new(),
            encrypted: self.is_encrypted() && self.unlocked.is_some(),
            header: self.header,
        })
    }

    /// Replaces (or creates) a file with `data`. In an encrypted file the contents are
    /// encrypted with a fresh key and nonce.
    pub fn write_file(&mut self, id: FileId, data: &[u8]) -> Result<()> {
        self.write(&[(id, data)], false)
    }

    /// Replaces (or creates) a file with `data` stored unencrypted even in an encrypted file:
    /// for key protectors, which must be readable before the file is unlocked and protect
    /// themselves (a sealed or wrapped key). Needs the key all the same (the commit rewrites
    /// the encrypted extended table).
    pub fn write_file_unencrypted(&mut self, id: FileId, data: &[u8]) -> Result<()> {
        self.write(&[(id, data)], true)
    }

    /// [`Vmgs::write_file_unencrypted`] of several files in one commit: all or none.
    pub fn write_files_unencrypted(&mut self, files: &[(FileId, &[u8])]) -> Result<()> {
        self.write(files, true)
    }

    fn write(&mut self, files: &[(FileId, &[u8])], plain: bool) -> Result<()> {
        self.check_writable()?;
        let mut plan = self.plan()?;
        for &(id, data) in files {
            Self::check_user_id(id)?;
            if data.len() as u64 > self.image_size {
                return Err(Error::NoSpace {
                    file: id,
                    bytes: data.len() as u64,
                });
            }
            // Room for the block padding up front, so that padding does not copy the data
            // again.
            let mut copy =
                Vec::with_capacity(blocks_for(data.len() as u64) as usize * BLOCK_SIZE as usize);
            copy.extend_from_slice(data);
            plan.files.push(NewFile {
                id,
                data: copy,
                plain,
            });
        }
        self.commit(plan, false)
    }

    /// Removes a file. An encrypted file opened without its key can lose a file too, as the
    /// reference tool's `delete` does it: only the file table changes, and the id's entry
    /// stays in the extended table (which needs the key to rewrite) until the next keyed
    /// change; opening ignores it (see [`forget_stale_entries`]).
    pub fn delete_file(&mut self, id: FileId) -> Result<()> {
        Self::check_user_id(id)?;
        self.check_usable()?;
        if !self.table.entries[id.index()].exists() {
            return Err(Error::NotFound(id));
        }
        let mut plan = self.plan()?;
        plan.table.entries[id.index()] = FileEntry::default();
        if let Some(ext) = &mut plan.ext {
            ext.0.entries[id.index()] = ExtendedFileEntry::default();
        }
        self.commit(plan, false)
    }

    /// Gives file `src` the id `dst` (its data is not copied). An existing `dst` is replaced
    /// only with `allow_overwrite`.
    pub fn move_file(&mut self, src: FileId, dst: FileId, allow_overwrite: bool) -> Result<()> {
        Self::check_user_id(src)?;
        Self::check_user_id(dst)?;
        self.check_writable()?;
        if !self.table.entries[src.index()].exists() {
            return Err(Error::NotFound(src));
        }
        if src == dst {
            return Ok(());
        }
        if self.table.entries[dst.index()].exists() && !allow_overwrite {
            return Err(Error::Exists(dst));
        }
        let mut plan = self.plan()?;
        plan.table.entries[dst.index()] = plan.table.entries[src.index()];
        plan.table.entries[src.index()] = FileEntry::default();
        if let Some(ext) = &mut plan.ext {
            ext.0.entries[dst.index()] = ext.0.entries[src.index()];
            ext.0.entries[src.index()] = ExtendedFileEntry::default();
        }
        self.commit(plan, false)
    }

    /// Encrypts an unencrypted file with `key`, in one commit: every existing file is
    /// re-encrypted into new extents, a fresh metadata key is wrapped into key slot 1.
    pub fn encrypt(&mut self, key: &Key) -> Result<()> {
        self.check_usable()?;
        if self.is_encrypted() {
            return Err(Error::AlreadyEncrypted);
        }
        if key.is_zero() {
            return Err(Error::WrongKey);
        }
        let mut plan = self.plan()?;
        for info in self.files() {
            if info.id.is_user_file() {
                let data = self.read_file(info.id)?;
                plan.files.push(NewFile {
                    id: info.id,
                    data,
                    plain: false,
                });
            }
        }
        plan.header.encryption_algorithm = U16::new(ENCRYPTION_AES_GCM);
        plan.header.key_slots = [KeySlot::default(); 2];
        plan.encrypted = true;
        plan.ext = Some(SecretTable(Box::<ExtendedFileTable>::default()));
        let previous = self.unlocked.replace(Unlocked {
            datastore: key.clone(),
            slot: 0,
            ext: SecretTable(Box::<ExtendedFileTable>::default()),
        });
        if let Err(e) = self.commit(plan, false) {
            if !self.poisoned {
                self.unlocked = previous;
            }
            return Err(e);
        }
        // Both header slots now describe the encrypted state, so no fallback can lead back to
        // the plaintext; then every block outside that state is wiped (old copies of files
        // from earlier overwrites included). The file is encrypted either way; a failed wipe
        // is reported, not undone.
        self.commit_header(self.header)?;
        if let Err(e) = self.scrub_free_blocks() {
            self.warnings.push(format!(
                "encrypted, but wiping the old plaintext blocks failed: {e}"
            ));
        }
        Ok(())
    }

    /// Overwrites every block the active state does not use with zeros.
    fn scrub_free_blocks(&mut self) -> Result<()> {
        let mut used: Vec<(u32, u32)> = vec![(self.header.file_table_offset.get(), 1)];
        used.extend(
            self.table.entries[1..]
                .iter()
                .filter(|e| e.exists())
                .map(|e| (e.offset.get(), e.allocation_size.get())),
        );
        used.sort_unstable();
        let mut gaps = Vec::new();
        let mut at = FIRST_DATA_BLOCK;
        for (offset, len) in used {
            if offset > at {
                gaps.push((at, offset));
            }
            at = at.max(offset.saturating_add(len));
        }
        if at < self.blocks {
            gaps.push((at, self.blocks));
        }
        const WIPE: u32 = 64;
        let zeros = vec![0u8; (WIPE as u64 * BLOCK_SIZE) as usize];
        for (start, end) in gaps {
            let mut b = start;
            while b < end {
                let n = WIPE.min(end - b);
                self.storage
                    .write_at(
                        u64::from(b) * BLOCK_SIZE,
                        &zeros[..(u64::from(n) * BLOCK_SIZE) as usize],
                    )
                    .map_err(Error::io("wiping plaintext blocks"))?;
                b += n;
            }
        }
        self.storage
            .flush()
            .map_err(Error::io("flushing wiped blocks"))
    }

    /// Writes the active header again into its own slot and flushes: after a failed commit,
    /// what was read back may have been only in the page cache; this makes it durable (or
    /// fails) before anything else is committed on top of it.
    pub fn persist_active_header(&mut self) -> Result<()> {
        let mut sector = [0u8; HEADER_SECTOR];
        sector[..HEADER_BYTES as usize].copy_from_slice(self.header.as_bytes());
        self.storage
            .write_at(self.active_slot as u64 * vhd::SECTOR, &sector)
            .map_err(Error::io("rewriting the active header"))?;
        self.storage
            .flush()
            .map_err(Error::io("flushing the active header"))
    }

    /// Replaces the datastore key: the new key wraps the metadata key into the other slot (one
    /// commit), then the old slot is cleared (a second commit), and a third header commit
    /// makes the fallback header forget the old slot too. Afterwards the old key opens neither
    /// header. A crash in between leaves a file that the new key opens (and perhaps the old).
    pub fn update_key(&mut self, new_key: &Key) -> Result<()> {
        self.add_key(new_key)?;
        self.drop_other_key()
    }

    /// The first step of [`Vmgs::update_key`]: `new_key` wraps the metadata key into the
    /// other slot (one header commit) and this handle uses it from now on; the old key still
    /// opens the file until the next table commit or [`Vmgs::drop_other_key`]. Lets a caller
    /// store what protects the new key (one commit) before the old one stops working, so that
    /// a crash at any point leaves a key that opens the file where the caller can find it.
    pub fn add_key(&mut self, new_key: &Key) -> Result<()> {
        self.check_writable()?;
        let Some(unlocked) = &self.unlocked else {
            return Err(Error::NotEncrypted);
        };
        if new_key.is_zero() {
            return Err(Error::WrongKey);
        }
        if new_key.ct_eq(&unlocked.datastore) {
            return Err(Error::SameKey);
        }
        let new_slot = 1 - unlocked.slot;
        if self.metadata_key()?.is_zero() {
            // A file from the defective reference writer: re-key it first (a table rewrite
            // draws a fresh metadata key), so the new key never wraps a zero key.
            let plan = self.plan()?;
            self.commit(plan, false)?;
        }
        let metadata_key = self.metadata_key()?;
        let mut header = self.header;
        wrap_into(&mut header.key_slots[new_slot], new_key, &metadata_key)?;
        self.commit_header(header)?;
        if let Some(u) = &mut self.unlocked {
            u.datastore = new_key.clone();
            u.slot = new_slot;
        }
        Ok(())
    }

    /// The second step of [`Vmgs::update_key`]: the slot this handle does not use is
    /// cleared (a header commit), and once more so that the fallback header forgets it too.
    pub fn drop_other_key(&mut self) -> Result<()> {
        self.check_writable()?;
        let Some(unlocked) = &self.unlocked else {
            return Err(Error::NotEncrypted);
        };
        let old_slot = 1 - unlocked.slot;
        let mut header = self.header;
        header.key_slots[old_slot] = KeySlot::default();
        self.commit_header(header)?;
        // Once more, so that the fallback header does not hold the old key's slot either.
        self.commit_header(self.header)
    }

    /// The metadata key, unwrapped again from the slot this handle's key opens.
    fn metadata_key(&self) -> Result<Key> {
        let u = self.unlocked.as_ref().ok_or(Error::NeedsKey)?;
        let slot = &self.header.key_slots[u.slot];
        let mut wrapped = slot.wrapped_key;
        if !crypto::open(&u.datastore, &slot.nonce, &slot.tag, &mut wrapped) {
            return Err(Error::WrongKey);
        }
        let key = Key::from_bytes(wrapped);
        wrapped.zeroize();
        Ok(key)
    }

    /// Writes a plan: allocates, encrypts, writes data and tables, flushes, then commits the
    /// header. `fresh` is the first commit of a new file (nothing on disk is live yet).
    fn commit(&mut self, mut plan: Plan, fresh: bool) -> Result<()> {
        // Everything the active state uses stays untouched.
        let mut used: Vec<(u32, u32)> = Vec::new();
        if !fresh {
            used.push((self.header.file_table_offset.get(), FILE_TABLE_BLOCKS));
            used.extend(
                self.table.entries[1..]
                    .iter()
                    .filter(|e| e.exists())
                    .map(|e| (e.offset.get(), e.allocation_size.get())),
            );
        }
        let mut allocate = |id: FileId, bytes: u64| -> Result<u32> {
            let need = blocks_for(bytes);
            let need = u32::try_from(need).map_err(|_| Error::NoSpace { file: id, bytes })?;
            let at =
                best_fit(&used, need, self.blocks).ok_or(Error::NoSpace { file: id, bytes })?;
            used.push((at, need));
            Ok(at)
        };

        // Allocation order as the reference writer: file table, files by id, extended table.
        let table_at = allocate(FileId::FILE_TABLE, FILE_TABLE_BYTES as u64)?;
        plan.files.sort_by_key(|f| f.id);
        let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
        for f in &mut plan.files {
            let at = allocate(f.id, f.data.len() as u64)?;
            let mut entry = FileEntry {
                offset: U32::new(at),
                allocation_size: U32::new(blocks_for(f.data.len() as u64) as u32),
                valid_data_size: U64::new(f.data.len() as u64),
                ..FileEntry::default()
            };
            // Key and nonce first: a failure to draw them must not drop unwiped plaintext.
            let sealing = if plan.encrypted && !f.plain {
                Some((Key::try_random()?, crypto::new_nonce()?))
            } else {
                None
            };
            let mut bytes = core::mem::take(&mut f.data);
            if let Some((key, nonce)) = sealing {
                entry.nonce = nonce;
                entry.tag = crypto::seal(&key, &entry.nonce, &mut bytes);
                entry.attributes = U32::new(ATTR_ENCRYPTED | ATTR_AUTHENTICATED);
                if let Some(ext) = &mut plan.ext {
                    ext.0.entries[f.id.index()] = ExtendedFileEntry {
                        attributes: U32::new(ATTR_ENCRYPTED | ATTR_AUTHENTICATED),
                        key: *key.as_bytes(),
                        reserved: [0; 28],
                    };
                }
            } else if let Some(ext) = &mut plan.ext {
                ext.0.entries[f.id.index()] = ExtendedFileEntry::default();
            }
            plan.table.entries[f.id.index()] = entry;
            writes.push((u64::from(at) * BLOCK_SIZE, bytes));
        }

        // The extended file table: always present; encrypted under a fresh metadata key.
        let ext_id = FileId::EXTENDED_FILE_TABLE;
        let mut new_header = plan.header;
        if plan.encrypted || fresh {
            let at = allocate(ext_id, FILE_TABLE_BYTES as u64)?;
            let mut entry = FileEntry {
                offset: U32::new(at),
                allocation_size: U32::new(FILE_TABLE_BLOCKS),
                valid_data_size: U64::new(FILE_TABLE_BYTES as u64),
                ..FileEntry::default()
            };
            let mut bytes = vec![0u8; FILE_TABLE_BYTES];
            if let (true, Some(ext)) = (plan.encrypted, &mut plan.ext) {
                // Key and nonce before the table (every file's key) is copied in the clear.
                let metadata_key = Key::try_random()?;
                let nonce = crypto::new_nonce()?;
                ext.0.entries[0] = ExtendedFileEntry::default();
                // As the reference writer: the table's own entry is marked encrypted, with
                // no key (readers ignore it).
                ext.0.entries[ext_id.index()] = ExtendedFileEntry {
                    attributes: U32::new(ATTR_ENCRYPTED | ATTR_AUTHENTICATED),
                    ..ExtendedFileEntry::default()
                };
                bytes.copy_from_slice(ext.0.as_bytes());
                entry.nonce = nonce;
                entry.tag = crypto::seal(&metadata_key, &entry.nonce, &mut bytes);
                entry.attributes = U32::new(ATTR_ENCRYPTED | ATTR_AUTHENTICATED);
                let u = self.unlocked.as_ref().ok_or(Error::NeedsKey)?;
                wrap_into(
                    &mut new_header.key_slots[u.slot],
                    &u.datastore,
                    &metadata_key,
                )?;
            }
            plan.table.entries[ext_id.index()] = entry;
            writes.push((u64::from(at) * BLOCK_SIZE, bytes));
        }

        plan.table.entries[0] = FileEntry {
            offset: U32::new(table_at),
            allocation_size: U32::new(FILE_TABLE_BLOCKS),
            valid_data_size: U64::new(FILE_TABLE_BYTES as u64),
            ..FileEntry::default()
        };
        writes.insert(
            0,
            (
                u64::from(table_at) * BLOCK_SIZE,
                plan.table.as_bytes().to_vec(),
            ),
        );

        for (offset, mut bytes) in writes {
            // Whole blocks: the tail of the last block is zero, not stale data.
            let padded = (bytes.len() as u64).div_ceil(BLOCK_SIZE).max(1) * BLOCK_SIZE;
            bytes.resize(padded as usize, 0);
            let result = self.storage.write_at(offset, &bytes);
            if !plan.encrypted {
                // Plaintext contents are not left behind in freed memory (ciphertext may be).
                bytes.zeroize();
            }
            result.map_err(Error::io("writing data and tables"))?;
        }
        self.storage
            .flush()
            .map_err(Error::io("flushing data before the header"))?;

        new_header.file_table_offset = U32::new(table_at);
        new_header.file_table_size = U32::new(FILE_TABLE_BLOCKS);
        self.commit_header(new_header)?;
        self.table = plan.table;
        if let (Some(u), Some(ext)) = (&mut self.unlocked, plan.ext) {
            u.ext = ext;
        }
        if plan.encrypted {
            self.zero_metadata_key = false;
        }
        Ok(())
    }

    /// Writes `header` with the next sequence number into the inactive slot and flushes. On
    /// success it is the active state; on failure the handle is poisoned.
    fn commit_header(&mut self, mut header: Header) -> Result<()> {
        let slot = 1 - self.active_slot;
        header.sequence = U32::new(self.header.sequence.get().wrapping_add(1));
        header.checksum = U32::new(0);
        header.checksum = U32::new(header.compute_checksum());
        let mut sector = [0u8; HEADER_SECTOR];
        sector[..HEADER_BYTES as usize].copy_from_slice(header.as_bytes());
        self.poisoned = true;
        self.storage
            .write_at(slot as u64 * vhd::SECTOR, &sector)
            .map_err(Error::io("writing the header"))?;
        self.storage
            .flush()
            .map_err(Error::io("flushing the header"))?;
        self.poisoned = false;
        self.header = header;
        self.active_slot = slot;
        Ok(())
    }
}

/// Wraps `metadata_key` with `datastore` into `slot`, with the slot's next nonce.
fn wrap_into(slot: &mut KeySlot, datastore: &Key, metadata_key: &Key) -> Result<()> {
    let nonce = if slot.nonce == [0; NONCE_BYTES] {
        crypto::new_slot_nonce()?
    } else {
        crypto::next_nonce(&slot.nonce)?
    };
    let mut wrapped = *metadata_key.as_bytes();
    let tag = crypto::seal(datastore, &nonce, &mut wrapped);
    *slot = KeySlot {
        nonce,
        reserved: U32::new(0),
        tag,
        wrapped_key: wrapped,
    };
    Ok(())
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;

    #[test]
    fn best_fit_takes_the_smallest_gap_that_fits() {
        // Used: 2, 3..5, 9; capacity 20. Gaps: 5..9 (4), 10..20 (10).
        let used = [(2, 1), (3, 2), (9, 1)];
        assert_eq!(best_fit(&used, 1, 20), Some(5));
        assert_eq!(best_fit(&used, 4, 20), Some(5));
        assert_eq!(best_fit(&used, 5, 20), Some(10));
        assert_eq!(best_fit(&used, 11, 20), None);
        assert_eq!(best_fit(&[], 3, 20), Some(2));
    }

    #[test]
    fn best_fit_prefers_a_smaller_later_gap_and_the_lowest_of_equal_gaps() {
        // Gaps 2..10 (8) and 11..13 (2): the later, smaller one.
        assert_eq!(best_fit(&[(10, 1)], 2, 13), Some(11));
        // Gaps 2..4, 5..7 and 8..10, all of 2 blocks: the lowest.
        assert_eq!(best_fit(&[(4, 1), (7, 1)], 2, 10), Some(2));
    }

    #[test]
    fn debug_output_shows_the_state_but_no_key_material() {
        let key = Key::from_bytes([0xab; KEY_BYTES]);
        let v = Vmgs::create(crate::MemStorage::default(), 64 << 10, Some(&key)).unwrap();
        let shown = format!("{v:?}");
        for field in [
            "active_slot: 0",
            "sequence: 1",
            "encrypted: true",
            "unlocked: true",
        ] {
            assert!(shown.contains(field), "{field} missing from {shown}");
        }
        assert!(!shown.contains("171"), "{shown}");
    }
}
