//! The input formats of pv-storage's fuzz targets, read by the targets and written by the seed
//! generator (`examples/seeds.rs`, which encodes the start sequence QEMU sends). One
//! definition of each format, so a seed always means what the target reads.

pub mod messages {
    //! `vhost_user_messages`: a front end's session, as a pool of descriptors to send and a
    //! sequence of actions.
    //!
    //! ```text
    //! byte 0        bit 0: the device is virtio-scsi (else virtio-blk)
    //! bytes 1..4    the sizes of memfds 0, 1, 2: indexes into MEMFD_SIZES
    //! then actions, each starting with a tag byte:
    //!   tag & 0xc0 == 0xc0   guest write: pool entry tag & 7, offset u32 LE, length u16 LE,
    //!                        bytes (written into that memfd, within its size)
    //!   otherwise            message: tag & 7 descriptors, one pool index byte each, then
    //!                        length u16 LE and that many bytes, sent in one sendmsg with the
    //!                        descriptors (a vhost-user header and body, or anything)
    //! ```
    //!
    //! The bytes of a message are the wire bytes: the header's size field may disagree with
    //! the bytes that follow, as a hostile front end's may.

    /// Sizes a memfd of the pool may have: empty, a page, not a whole number of pages, and
    /// enough for rings, buffers and an in-flight record.
    pub const MEMFD_SIZES: [u64; 8] = [0, 4096, 6000, 3 * 4096, 64 << 10, 1 << 20, 2 << 20, 100];
    /// Descriptors the pool holds: memfds 0..=2, an eventfd, /dev/null, and the last
    /// descriptor the back end sent (its in-flight record).
    pub const POOL: usize = 6;
    pub const POOL_EVENTFD: u8 = 3;
    pub const POOL_DEV_NULL: u8 = 4;
    pub const POOL_RECEIVED: u8 = 5;
    /// Most descriptors one message carries (a tag's three bits).
    pub const MAX_FDS: usize = 7;
    const WRITE: u8 = 0xc0;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Action<'a> {
        /// Bytes for the socket, with descriptors (pool indexes, taken modulo [`POOL`]).
        Message { fds: &'a [u8], bytes: &'a [u8] },
        /// The guest writes `bytes` at `offset` of pool entry `target`.
        Write {
            target: u8,
            offset: u32,
            bytes: &'a [u8],
        },
    }

    /// A parsed input: the device, the pool's memfd sizes, and the actions (read lazily).
    pub struct Input<'a> {
        pub scsi: bool,
        pub memfd_sizes: [u64; 3],
        rest: &'a [u8],
    }

    impl<'a> Input<'a> {
        pub fn parse(data: &'a [u8]) -> Option<Input<'a>> {
            let (&[flags, a, b, c], rest) = data.split_first_chunk::<4>()?;
            let size = |i: u8| MEMFD_SIZES[usize::from(i) % MEMFD_SIZES.len()];
            Some(Input {
                scsi: flags & 1 != 0,
                memfd_sizes: [size(a), size(b), size(c)],
                rest,
            })
        }
    }

    fn take<'a>(data: &mut &'a [u8], n: usize) -> &'a [u8] {
        let (head, tail) = data.split_at(n.min(data.len()));
        *data = tail;
        head
    }

    fn u16_of(data: &mut &[u8]) -> u16 {
        let b = take(data, 2);
        u16::from(b.first().copied().unwrap_or(0)) | u16::from(b.get(1).copied().unwrap_or(0)) << 8
    }

    impl<'a> Iterator for Input<'a> {
        type Item = Action<'a>;

        fn next(&mut self) -> Option<Action<'a>> {
            let (&tag, mut rest) = self.rest.split_first()?;
            let action = if tag & WRITE == WRITE {
                let offset = take(&mut rest, 4);
                let offset = offset
                    .iter()
                    .rev()
                    .fold(0u32, |v, b| v << 8 | u32::from(*b));
                let len = u16_of(&mut rest);
                Action::Write {
                    target: tag & 7,
                    offset,
                    bytes: take(&mut rest, usize::from(len)),
                }
            } else {
                let fds = take(&mut rest, usize::from(tag & 7));
                let len = u16_of(&mut rest);
                Action::Message {
                    fds,
                    bytes: take(&mut rest, usize::from(len)),
                }
            };
            self.rest = rest;
            Some(action)
        }
    }

    /// Writes an input (for seeds).
    pub struct Script(Vec<u8>);

    impl Script {
        /// `memfds`: indexes into [`MEMFD_SIZES`].
        pub fn new(scsi: bool, memfds: [u8; 3]) -> Script {
            let mut v = vec![u8::from(scsi)];
            v.extend_from_slice(&memfds);
            Script(v)
        }

        /// A message (`bytes`: header and body) sent with descriptors from the pool.
        pub fn message(&mut self, fds: &[u8], bytes: &[u8]) -> &mut Script {
            assert!(fds.len() <= MAX_FDS);
            self.0.push(fds.len() as u8);
            self.0.extend_from_slice(fds);
            self.0
                .extend_from_slice(&u16::try_from(bytes.len()).unwrap().to_le_bytes());
            self.0.extend_from_slice(bytes);
            self
        }

        /// The guest writes `bytes` at `offset` of pool entry `target`.
        pub fn write(&mut self, target: u8, offset: u32, bytes: &[u8]) -> &mut Script {
            assert!(usize::from(target) < POOL);
            self.0.push(WRITE | target);
            self.0.extend_from_slice(&offset.to_le_bytes());
            self.0
                .extend_from_slice(&u16::try_from(bytes.len()).unwrap().to_le_bytes());
            self.0.extend_from_slice(bytes);
            self
        }

        pub fn bytes(&self) -> &[u8] {
            &self.0
        }
    }
}

pub mod record {
    //! `inflight_record`: a record's bytes, its parameters, and calls on it.
    //!
    //! ```text
    //! byte 0        queues (u8)
    //! bytes 1..3    queue size (u16 LE, any value)
    //! byte 3        most queues the device has (u8)
    //! bytes 4..8    the record file's size (u32 LE, modulo MAX_RECORD + 1)
    //! byte 8        number of calls n
    //! n × 12 bytes  calls: kind u8 (modulo 6: prepare, recover, start, completing,
    //!               completed, clear), queue u8, a u16 LE (size or head), b u64 LE (used
    //!               index or counter)
    //! the rest      the record's bytes from offset 0 (within its size)
    //! ```

    /// Largest record file the target creates: 8 queues of 32768 descriptors need 4 MiB.
    pub const MAX_RECORD: u32 = 4 << 20;
    const CALL: usize = 12;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Call {
        Prepare { queue: u16, size: u16 },
        Recover { queue: u16, size: u16, used: u16 },
        Start { queue: u16, head: u16, counter: u64 },
        Completing { queue: u16, head: u16 },
        Completed { queue: u16, head: u16, used: u16 },
        Clear { queue: u16 },
    }

    #[derive(Debug)]
    pub struct Input<'a> {
        pub queues: u16,
        pub queue_size: u16,
        pub max_queues: u16,
        pub file_size: u32,
        pub calls: Vec<Call>,
        pub bytes: &'a [u8],
    }

    impl<'a> Input<'a> {
        pub fn parse(data: &'a [u8]) -> Option<Input<'a>> {
            let (head, rest) = data.split_first_chunk::<9>()?;
            let n = usize::from(head[8]);
            let calls_len = (n * CALL).min(rest.len() / CALL * CALL);
            let (calls, bytes) = rest.split_at(calls_len);
            let calls = calls
                .chunks_exact(CALL)
                .map(|c| {
                    let queue = u16::from(c[1]);
                    let a = u16::from_le_bytes([c[2], c[3]]);
                    let b = u64::from_le_bytes(c[4..12].try_into().expect("8 bytes"));
                    match c[0] % 6 {
                        0 => Call::Prepare { queue, size: a },
                        1 => Call::Recover {
                            queue,
                            size: a,
                            used: b as u16,
                        },
                        2 => Call::Start {
                            queue,
                            head: a,
                            counter: b,
                        },
                        3 => Call::Completing { queue, head: a },
                        4 => Call::Completed {
                            queue,
                            head: a,
                            used: b as u16,
                        },
                        _ => Call::Clear { queue },
                    }
                })
                .collect();
            Some(Input {
                queues: u16::from(head[0]),
                queue_size: u16::from_le_bytes([head[1], head[2]]),
                max_queues: u16::from(head[3]),
                file_size: u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"))
                    % (MAX_RECORD + 1),
                calls,
                bytes,
            })
        }
    }

    /// Writes an input (for seeds).
    pub fn encode(
        queues: u8,
        queue_size: u16,
        max_queues: u8,
        file_size: u32,
        calls: &[Call],
        bytes: &[u8],
    ) -> Vec<u8> {
        let mut v = vec![queues];
        v.extend_from_slice(&queue_size.to_le_bytes());
        v.push(max_queues);
        v.extend_from_slice(&file_size.to_le_bytes());
        v.push(u8::try_from(calls.len()).expect("at most 255 calls"));
        for call in calls {
            let (kind, queue, a, b) = match *call {
                Call::Prepare { queue, size } => (0, queue, size, 0),
                Call::Recover { queue, size, used } => (1, queue, size, u64::from(used)),
                Call::Start {
                    queue,
                    head,
                    counter,
                } => (2, queue, head, counter),
                Call::Completing { queue, head } => (3, queue, head, 0),
                Call::Completed { queue, head, used } => (4, queue, head, u64::from(used)),
                Call::Clear { queue } => (5, queue, 0, 0),
            };
            v.push(kind);
            v.push(u8::try_from(queue).expect("queue fits a byte"));
            v.extend_from_slice(&a.to_le_bytes());
            v.extend_from_slice(&b.to_le_bytes());
        }
        v.extend_from_slice(bytes);
        v
    }
}
