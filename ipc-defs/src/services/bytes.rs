//! A bounded byte string for messages: inline (no allocation, `no_std`), encoded by postcard
//! as one length-prefixed byte string (copied in one piece, not element by element), and
//! never printed (its contents are guest data).

use core::fmt;

use serde::de::Visitor;
use serde::Deserialize;
use serde::Deserializer;
use serde::Serialize;
use serde::Serializer;

/// Up to `N` bytes.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Bytes<const N: usize>(heapless::Vec<u8, N>);

impl<const N: usize> Bytes<N> {
    /// The byte string holding `bytes`, or `None` if they are more than `N`.
    pub fn new(bytes: &[u8]) -> Option<Bytes<N>> {
        heapless::Vec::from_slice(bytes).ok().map(Bytes)
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<const N: usize> fmt::Debug for Bytes<N> {
    // Never the bytes: they are guest secrets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bytes({} bytes)", self.0.len())
    }
}

impl<const N: usize> Serialize for Bytes<N> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de, const N: usize> Deserialize<'de> for Bytes<N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Bytes<N>, D::Error> {
        struct BytesVisitor<const N: usize>;
        impl<'de, const N: usize> Visitor<'de> for BytesVisitor<N> {
            type Value = Bytes<N>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "at most {N} bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Bytes<N>, E> {
                Bytes::new(v).ok_or_else(|| E::invalid_length(v.len(), &self))
            }
        }
        d.deserialize_bytes(BytesVisitor::<N>)
    }
}
