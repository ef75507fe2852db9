//! `pv-vmgs`: the encrypted, crash-consistent guest-state file. It never sees the guest; it
//! only answers `vmgs::Request` from the services the manifest connects to it, each limited to
//! the file ids its `calls` entry grants (the grant comes from the bootstrap record, never from
//! a message).
//!
//! Capabilities expected: its control channel; the serving end of one `vmgs` channel per
//! client; exactly one read-write file (the VMGS file, opened by the microkernel); and at most
//! one key (the 32-byte datastore key, as a sealed memfd). It never logs key material or file
//! contents: requests are logged by kind, file id and size only.
#![forbid(unsafe_code)]

use std::os::unix::fs::FileExt;
use std::process::ExitCode;

use ipc_defs::capability::Grant;
use ipc_defs::endpoint::Response;
use ipc_defs::hosted::runtime;
use ipc_defs::services::vmgs;
use ipc_defs::services::vmgs::FileIdSet;
use ipc_defs::Interface;
use pv_vmgs::server::is_refusal;
use pv_vmgs::server::Server;
use pv_vmgs::FileStorage;
use pv_vmgs::Key;

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("--broker") {
        return broker();
    }
    let mut started = match runtime::enter() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vmgs: cannot start: {e}");
            return ExitCode::from(2);
        }
    };
    let mut server = match open_store(&mut started.context) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    started.serve(
        Interface::Vmgs,
        move |_context, caller, request: vmgs::Request| {
            let granted = match caller.grant {
                Grant::VmgsFiles(set) => set,
                Grant::Interface
                | Grant::Interrupts(_)
                | Grant::PciDevices(_)
                | Grant::Vtpm(_)
                | Grant::Localities(_)
                | Grant::GuestPartition
                | Grant::GuestMemory { .. }
                | Grant::Doorbells { .. }
                | Grant::FdStore { .. } => FileIdSet::EMPTY,
            };
            let what = describe(&request);
            let response = server.handle(&caller.name, granted, request);
            if is_refusal(&response) {
                caller.refuse(format_args!("{what} (grants: {granted})"));
            } else {
                tracing::debug!(client = %caller.name, "{what}");
            }
            if !server.healthy() {
                // The store could not be reopened after a failed commit: exit so the supervisor
                // restarts the service, which opens the file afresh.
                tracing::error!("guest-state file unusable; exiting for a restart");
                std::process::exit(1);
            }
            Response::Service(response)
        },
    )
}

/// `pv-vmgs --broker`: started by the microkernel with the guest-state file and no key and
/// no client, it answers the microkernel's guest-state requests on its control channel
/// (reading and writing key protectors, rotating the key, making a new sealed file) until
/// told to shut down. The host's file is parsed here, in the sandbox, not in the microkernel.
fn broker() -> ExitCode {
    let mut started = match runtime::enter() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vmgs broker: cannot start: {e}");
            return ExitCode::from(2);
        }
    };
    let context = &mut started.context;
    if context.files.len() != 1 || !context.keys.is_empty() {
        tracing::error!(
            "the broker takes exactly one file and no key; got {} file(s), {} key(s)",
            context.files.len(),
            context.keys.len()
        );
        return ExitCode::FAILURE;
    }
    let (name, fd) = context.files.pop_first().expect("one file");
    let mut storage = Some(FileStorage::new(std::fs::File::from(fd)));
    context.guest_state = Some(Box::new(move |request| {
        let what = describe_broker(&request);
        let response = pv_vmgs::broker::answer(&mut storage, request);
        match &response {
            vmgs::BrokerResponse::Failed(why) => tracing::warn!(file = %name, "{what}: {why}"),
            _ => tracing::info!(file = %name, "{what}: done"),
        }
        response
    }));
    // No client holds a vmgs channel to the broker: only its control channel is served.
    started.serve(
        Interface::Vmgs,
        |_context, _caller, _request: vmgs::Request| {
            Response::<vmgs::Response>::Error(ipc_defs::endpoint::ErrorCode::NotPermitted)
        },
    )
}

/// A broker request without keys or contents, for logs.
fn describe_broker(request: &vmgs::BrokerRequest) -> String {
    match request {
        vmgs::BrokerRequest::ReadPlain { file } => format!("read key protector {file}"),
        vmgs::BrokerRequest::WritePlain { file, data, .. } => {
            format!("write key protector {file} ({} bytes)", data.len())
        }
        vmgs::BrokerRequest::Rotate { protectors, .. } => {
            format!(
                "rotate the datastore key ({} protector(s))",
                protectors.len()
            )
        }
        vmgs::BrokerRequest::Create {
            size, protectors, ..
        } => format!(
            "create a {size}-byte sealed image ({} protector(s))",
            protectors.len()
        ),
    }
}

/// The request without its contents, for logs.
fn describe(request: &vmgs::Request) -> String {
    match request {
        vmgs::Request::Size { file } => format!("size {file}"),
        vmgs::Request::Read { file, offset } => format!("read {file} at {offset}"),
        vmgs::Request::Write {
            file,
            total,
            offset,
            data,
        } => format!("write {file}: {} bytes at {offset} of {total}", data.len()),
        vmgs::Request::Delete { file } => format!("delete {file}"),
        vmgs::Request::List => "list".into(),
    }
}

fn open_store(context: &mut runtime::Context) -> Result<Server<FileStorage>, String> {
    if context.files.len() != 1 {
        return Err(format!(
            "expected exactly one file capability (the VMGS file), got {}",
            context.files.len()
        ));
    }
    let (name, fd) = context.files.pop_first().expect("one file");
    let key = match context.keys.len() {
        0 => None,
        1 => {
            let (key_name, fd) = context.keys.pop_first().expect("one key");
            let file = std::fs::File::from(fd);
            let mut bytes = [0u8; 33];
            let n = file
                .read_at(&mut bytes, 0)
                .map_err(|e| format!("key \"{key_name}\": {e}"))?;
            let key = Key::from_slice(&bytes[..n])
                .ok_or_else(|| format!("key \"{key_name}\" is {n} bytes, not 32"));
            zeroize::Zeroize::zeroize(&mut bytes);
            Some(key?)
        }
        n => return Err(format!("expected at most one key capability, got {n}")),
    };
    let storage = FileStorage::new(std::fs::File::from(fd));
    let server =
        Server::open(storage, key).map_err(|e| format!("guest-state file \"{name}\": {e}"))?;
    let vmgs = server.store().expect("just opened");
    if vmgs.is_encrypted() && !vmgs.is_unlocked() {
        return Err(format!(
            "guest-state file \"{name}\" is encrypted but the manifest grants this service no key"
        ));
    }
    for w in vmgs.warnings() {
        tracing::warn!("guest-state file \"{name}\": {w}");
    }
    if !vmgs.is_encrypted() {
        tracing::warn!("guest-state file \"{name}\" is NOT encrypted: the host can read it");
    }
    tracing::info!(
        file = %name,
        encrypted = vmgs.is_encrypted(),
        files = vmgs.files().len(),
        "guest-state file open"
    );
    Ok(server)
}
