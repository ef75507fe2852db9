//! The container: a VMGS file is a fixed VHD (version 1), i.e. the raw image followed by a
//! 512-byte footer with big-endian fields. This module checks and makes that footer; the
//! image itself is what [`crate::store`] works on.

use zerocopy::big_endian::U32;
use zerocopy::big_endian::U64;
use zerocopy::FromBytes;
use zerocopy::Immutable;
use zerocopy::IntoBytes;
use zerocopy::KnownLayout;

use crate::error::ContainerError;

/// Bytes of the footer.
pub const FOOTER_BYTES: u64 = 512;
/// `conectix`.
pub const COOKIE: [u8; 8] = *b"conectix";
/// "Reserved" feature bit that every VHD sets.
pub const FEATURES: u32 = 2;
/// VHD format 1.0.
pub const FORMAT_VERSION: u32 = 0x0001_0000;
/// A fixed disk has no dynamic header.
pub const NO_DATA_OFFSET: u64 = u64::MAX;
/// What the reference tool writes as the creator version.
pub const CREATOR_VERSION: u32 = 0x000A_0000;
/// `disk_type` of a fixed disk.
pub const DISK_TYPE_FIXED: u32 = 2;

/// Smallest image (without the footer) a VMGS file may have.
pub const MIN_IMAGE: u64 = 16 << 10;
/// Largest image: 4 GiB.
pub const MAX_IMAGE: u64 = 4 << 30;
/// Image size when none is given: 4 MiB.
pub const DEFAULT_IMAGE: u64 = 4 << 20;
/// Image sizes are whole sectors.
pub const SECTOR: u64 = 512;

/// The VHD footer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct Footer {
    pub cookie: [u8; 8],
    pub features: U32,
    pub format_version: U32,
    pub data_offset: U64,
    pub time_stamp: U32,
    pub creator_application: [u8; 4],
    pub creator_version: U32,
    pub creator_host_os: U32,
    pub original_size: U64,
    pub current_size: U64,
    pub disk_geometry: U32,
    pub disk_type: U32,
    /// One's complement of the byte sum of the footer without this field.
    pub checksum: U32,
    pub unique_id: [u8; 16],
    pub saved_state: u8,
    pub reserved: [u8; 427],
}

const _: () = assert!(core::mem::size_of::<Footer>() == FOOTER_BYTES as usize);

impl Footer {
    /// A footer for a fixed image of `image_size` bytes.
    pub fn new(image_size: u64, unique_id: [u8; 16]) -> Footer {
        let mut footer = Footer {
            cookie: COOKIE,
            features: U32::new(FEATURES),
            format_version: U32::new(FORMAT_VERSION),
            data_offset: U64::new(NO_DATA_OFFSET),
            time_stamp: U32::new(0),
            creator_application: [0; 4],
            creator_version: U32::new(CREATOR_VERSION),
            creator_host_os: U32::new(0),
            original_size: U64::new(image_size),
            current_size: U64::new(image_size),
            disk_geometry: U32::new(0),
            disk_type: U32::new(DISK_TYPE_FIXED),
            checksum: U32::new(0),
            unique_id,
            saved_state: 0,
            reserved: [0; 427],
        };
        footer.checksum = U32::new(footer.compute_checksum());
        footer
    }

    pub fn compute_checksum(&self) -> u32 {
        let mut copy = *self;
        copy.checksum = U32::new(0);
        !copy
            .as_bytes()
            .iter()
            .fold(0u32, |sum, b| sum.wrapping_add(u32::from(*b)))
    }

    /// Checks the footer of a file of `file_len` bytes and returns the image size.
    pub fn image_size(&self, file_len: u64) -> Result<u64, ContainerError> {
        if self.cookie != COOKIE {
            return Err(ContainerError::NoFooter);
        }
        let (stored, computed) = (self.checksum.get(), self.compute_checksum());
        if stored != computed {
            return Err(ContainerError::FooterChecksum { stored, computed });
        }
        if self.format_version.get() != FORMAT_VERSION {
            return Err(ContainerError::FooterVersion(self.format_version.get()));
        }
        if self.disk_type.get() != DISK_TYPE_FIXED {
            return Err(ContainerError::NotFixed(self.disk_type.get()));
        }
        let size = self.current_size.get();
        let room = file_len.saturating_sub(FOOTER_BYTES);
        if size > room || !size.is_multiple_of(SECTOR) {
            return Err(ContainerError::FooterSize { size, room });
        }
        check_image_size(size)?;
        Ok(size)
    }
}

/// Checks a requested or stored image size against the format's bounds.
pub fn check_image_size(size: u64) -> Result<(), ContainerError> {
    if !(MIN_IMAGE..=MAX_IMAGE).contains(&size) || !size.is_multiple_of(SECTOR) {
        return Err(ContainerError::ImageSize(size));
    }
    Ok(())
}
