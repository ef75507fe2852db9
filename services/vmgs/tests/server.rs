//! The service's request handling, without processes: grants, chunking, sequence errors,
//! sizes, and recovery after a commit that failed midway.

use ipc_defs::services::vmgs::Chunk;
use ipc_defs::services::vmgs::FileIdSet;
use ipc_defs::services::vmgs::Request;
use ipc_defs::services::vmgs::Response;
use ipc_defs::services::vmgs::VmgsError;
use ipc_defs::services::vmgs::MAX_CHUNK;
use pv_vmgs::fault::Fault;
use pv_vmgs::fault::FaultyStorage;
use pv_vmgs::server::Server;
use pv_vmgs::FileId;
use pv_vmgs::Key;
use pv_vmgs::MemStorage;
use pv_vmgs::Storage;
use pv_vmgs::Vmgs;

fn key() -> Key {
    Key::from_bytes([9; 32])
}

fn image() -> Vec<u8> {
    let mut v = Vmgs::create(MemStorage::default(), 1 << 20, Some(&key())).unwrap();
    v.write_file(FileId::ATTEST, b"attest's secret").unwrap();
    v.into_storage().bytes
}

fn tpm() -> FileIdSet {
    FileIdSet::EMPTY
        .with(FileId::TPM_NVRAM)
        .with(FileId::TPM_PPI)
}

/// Writes `data` in chunks; returns the last response.
fn write<S: Storage>(server: &mut Server<S>, file: FileId, data: &[u8]) -> Response {
    let mut offset = 0;
    loop {
        let end = (offset + MAX_CHUNK).min(data.len());
        let r = server.handle(
            "vtpm",
            tpm(),
            Request::Write {
                file,
                total: data.len() as u32,
                offset: offset as u32,
                data: Chunk::new(&data[offset..end]).unwrap(),
            },
        );
        match r {
            Response::Staged { received } => offset = received as usize,
            other => return other,
        }
    }
}

fn read<S: Storage>(server: &mut Server<S>, file: FileId) -> Result<Vec<u8>, VmgsError> {
    let mut out = Vec::new();
    loop {
        match server.handle(
            "vtpm",
            tpm(),
            Request::Read {
                file,
                offset: out.len() as u32,
            },
        ) {
            Response::Data { total, data } => {
                out.extend_from_slice(data.as_slice());
                if out.len() == total as usize {
                    return Ok(out);
                }
            }
            Response::Error(e) => return Err(e),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn a_client_reaches_only_its_granted_ids() {
    let mut s = Server::open(MemStorage::new(image()), Some(key())).unwrap();
    for file in [
        FileId::ATTEST,
        FileId::FILE_TABLE,
        FileId::EXTENDED_FILE_TABLE,
    ] {
        for request in [
            Request::Size { file },
            Request::Read { file, offset: 0 },
            Request::Delete { file },
            Request::Write {
                file,
                total: 1,
                offset: 0,
                data: Chunk::new(b"x").unwrap(),
            },
        ] {
            assert_eq!(
                s.handle("vtpm", tpm(), request),
                Response::Error(VmgsError::NotPermitted(file))
            );
        }
    }
    // Even a grant that names the tables does not open them.
    let all = (1..63)
        .filter_map(FileId::new)
        .chain([FileId::FILE_TABLE])
        .collect::<FileIdSet>();
    assert_eq!(
        s.handle(
            "x",
            all,
            Request::Read {
                file: FileId::FILE_TABLE,
                offset: 0
            }
        ),
        Response::Error(VmgsError::NotPermitted(FileId::FILE_TABLE))
    );
    assert_eq!(s.counters.refused, 13);
    // List shows the caller's files only.
    assert_eq!(write(&mut s, FileId::TPM_NVRAM, b"nv"), Response::Written);
    match s.handle("vtpm", tpm(), Request::List) {
        Response::Files(files) => {
            assert_eq!(files.len(), 1);
            assert_eq!(files[0].file, FileId::TPM_NVRAM);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn multi_chunk_writes_and_reads_round_trip() {
    let mut s = Server::open(MemStorage::new(image()), Some(key())).unwrap();
    let data: Vec<u8> = (0..3 * MAX_CHUNK + 17).map(|i| i as u8).collect();
    assert_eq!(write(&mut s, FileId::TPM_NVRAM, &data), Response::Written);
    assert_eq!(read(&mut s, FileId::TPM_NVRAM).unwrap(), data);
    assert_eq!(
        s.handle(
            "vtpm",
            tpm(),
            Request::Size {
                file: FileId::TPM_NVRAM
            }
        ),
        Response::Size {
            bytes: data.len() as u64
        }
    );
    assert_eq!(write(&mut s, FileId::TPM_PPI, b""), Response::Written);
    assert_eq!(read(&mut s, FileId::TPM_PPI).unwrap(), b"");
    assert_eq!(
        s.handle(
            "vtpm",
            tpm(),
            Request::Delete {
                file: FileId::TPM_PPI
            }
        ),
        Response::Deleted
    );
    assert_eq!(
        read(&mut s, FileId::TPM_PPI),
        Err(VmgsError::NotFound(FileId::TPM_PPI))
    );
}

#[test]
fn chunks_out_of_sequence_and_oversized_files_are_typed_errors() {
    let mut s = Server::open(MemStorage::new(image()), Some(key())).unwrap();
    let f = FileId::TPM_NVRAM;
    let chunk = Chunk::new(&[1; 100]).unwrap();
    // A chunk that does not start at 0 with nothing staged.
    assert_eq!(
        s.handle(
            "vtpm",
            tpm(),
            Request::Write {
                file: f,
                total: 300,
                offset: 100,
                data: chunk.clone()
            }
        ),
        Response::Error(VmgsError::OutOfSequence {
            file: f,
            expected: 0
        })
    );
    // A gap.
    assert_eq!(
        s.handle(
            "vtpm",
            tpm(),
            Request::Write {
                file: f,
                total: 300,
                offset: 0,
                data: chunk.clone()
            }
        ),
        Response::Staged { received: 100 }
    );
    assert_eq!(
        s.handle(
            "vtpm",
            tpm(),
            Request::Write {
                file: f,
                total: 300,
                offset: 200,
                data: chunk.clone()
            }
        ),
        Response::Error(VmgsError::OutOfSequence {
            file: f,
            expected: 100
        })
    );
    // More bytes than announced.
    assert!(matches!(
        s.handle(
            "vtpm",
            tpm(),
            Request::Write {
                file: f,
                total: 50,
                offset: 0,
                data: chunk
            }
        ),
        Response::Error(VmgsError::OutOfSequence { .. })
    ));
    // A read past 0 without a snapshot.
    assert_eq!(
        s.handle(
            "vtpm",
            tpm(),
            Request::Read {
                file: f,
                offset: 10
            }
        ),
        Response::Error(VmgsError::OutOfSequence {
            file: f,
            expected: 0
        })
    );
    // Larger than the image (1 MiB) or the interface's limit.
    for total in [2 << 20, u32::MAX] {
        assert!(matches!(
            s.handle(
                "vtpm",
                tpm(),
                Request::Write {
                    file: f,
                    total,
                    offset: 0,
                    data: Chunk::default()
                }
            ),
            Response::Error(VmgsError::TooLarge { .. })
        ));
    }
    // Nothing of it reached the file.
    assert_eq!(read(&mut s, f), Err(VmgsError::NotFound(f)));
}

#[test]
fn a_commit_that_fails_after_its_header_landed_is_recovered_from() {
    let mut dev = FaultyStorage::new(image());
    // Operations of a write: table, data, extended table, flush, header, flush. The final
    // flush reports an error although it took effect.
    dev.fail_at(5, Fault::FailAfter);
    let mut s = Server::open(&mut dev, Some(key())).unwrap();
    assert_eq!(
        write(&mut s, FileId::TPM_NVRAM, b"new"),
        Response::Error(VmgsError::Storage(FileId::TPM_NVRAM))
    );
    assert!(s.healthy(), "reopened");
    assert_eq!(s.counters.reopens, 1);
    // The header did land: the store now says so, and goes on from there.
    assert_eq!(read(&mut s, FileId::TPM_NVRAM).unwrap(), b"new");
    assert_eq!(
        write(&mut s, FileId::TPM_NVRAM, b"newer"),
        Response::Written
    );
    drop(s);
    let mut v = Vmgs::open(MemStorage::new(dev.image().to_vec()), Some(&key())).unwrap();
    assert_eq!(v.read_file(FileId::TPM_NVRAM).unwrap(), b"newer");
}
