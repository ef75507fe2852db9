//! The passes over a service's endpoints: what it serves (each endpoint by one service) and
//! calls (each served by some service), and what each call grants beyond the interface: VMGS
//! file ids (each owned by one client), interrupt lines, TPM rights.

use std::collections::BTreeMap;
use std::ops::Range;

use ipc_defs::capability::Grant;
use ipc_defs::services::vmgs::FileId;
use ipc_defs::services::vmgs::FileIdSet;
use ipc_defs::services::vtpm::Localities;
use ipc_defs::services::vtpm::VtpmGrant;
use ipc_defs::Interface;
use toml::Spanned;

use super::Seen;
use super::Validator;
use crate::manifest::schema::RawCall;
use crate::manifest::values::line_col;
use crate::manifest::ServiceSpec;

impl Validator<'_> {
    /// `serves`: each endpoint known, and served by one service only.
    pub(super) fn serves(
        &mut self,
        raw: &[Spanned<String>],
        name: &str,
        seen: &mut Seen,
    ) -> Vec<Interface> {
        let mut serves = Vec::new();
        for ep in raw {
            match Interface::from_name(ep.get_ref()) {
                Some(i) => {
                    if let Some((other, first)) = seen.servers.get(&i) {
                        let (line, _) = line_col(self.source, first.start);
                        self.error(
                            ep.span(),
                            format!(
                                "endpoint \"{i}\" is served twice: by \"{other}\" (line {line}) and by \"{name}\""
                            ),
                            "exactly one service may serve an endpoint; remove one of the two",
                        );
                    } else {
                        seen.servers.insert(i, (name.to_string(), ep.span()));
                    }
                    serves.push(i);
                }
                None => self.unknown_endpoint(ep),
            }
        }
        serves
    }

    /// `calls`: each endpoint known, listed once and not served by the caller itself, with
    /// what the call grants ([`Self::call_grant`]). That some service serves it is checked
    /// once every service is known ([`Self::unserved_calls`]).
    pub(super) fn calls(
        &mut self,
        raw: &[Spanned<RawCall>],
        name: &str,
        serves: &[Interface],
        seen: &mut Seen,
    ) -> (Vec<Interface>, BTreeMap<Interface, Grant>) {
        let mut calls = Vec::new();
        let mut grants = BTreeMap::new();
        for call in raw {
            let ep = &call.get_ref().endpoint;
            match Interface::from_name(ep.get_ref()) {
                Some(i) if calls.contains(&i) => self.error(
                    ep.span(),
                    format!("service \"{name}\" lists a call to \"{i}\" twice"),
                    "list each endpoint once",
                ),
                Some(i) if serves.contains(&i) => self.error(
                    ep.span(),
                    format!("service \"{name}\" calls \"{i}\", which it serves itself"),
                    "a service handles its own endpoint internally; remove the call",
                ),
                Some(i) => {
                    calls.push(i);
                    seen.pending_calls.push((name.to_string(), i, ep.span()));
                    if let Some(g) = self.call_grant(i, call.get_ref(), call.span()) {
                        grants.insert(i, g);
                        seen.call_spans.insert(name.to_string(), call.span());
                    }
                }
                None => self.unknown_endpoint(ep),
            }
        }
        (calls, grants)
    }

    /// Every call has a server (checked once every service is known).
    pub(super) fn unserved_calls(
        &mut self,
        pending_calls: Vec<(String, Interface, Range<usize>)>,
        servers: &BTreeMap<Interface, (String, Range<usize>)>,
    ) {
        for (client, endpoint, span) in pending_calls {
            if !servers.contains_key(&endpoint) {
                self.error(
                    span,
                    format!("service \"{client}\" calls \"{endpoint}\", but no service serves it"),
                    format!("add \"{endpoint}\" to the `serves` of the service that implements it, or remove the call"),
                );
            }
        }
    }

    fn unknown_endpoint(&mut self, ep: &Spanned<String>) {
        let known: Vec<&str> = Interface::ALL.iter().map(|i| i.name()).collect();
        self.error(
            ep.span(),
            format!("unknown endpoint \"{}\"", ep.get_ref()),
            format!(
                "endpoints are the interfaces ipc-defs defines: {}",
                known.join(", ")
            ),
        );
    }

    /// What a call entry grants beyond the endpoint: `file-ids` for vmgs (required there),
    /// `interrupts` for intercept (optional), nothing for the other interfaces.
    fn call_grant(
        &mut self,
        endpoint: Interface,
        call: &RawCall,
        span: Range<usize>,
    ) -> Option<Grant> {
        if let Some(rights) = &call.tpm {
            if endpoint != Interface::Vtpm {
                self.error(
                    rights.span(),
                    format!("tpm applies to calls to \"vtpm\", not to \"{endpoint}\""),
                    "remove tpm from this call",
                );
                return None;
            }
        }
        if endpoint == Interface::Vtpm && call.file_ids.is_none() && call.interrupts.is_none() {
            return Some(Grant::Vtpm(self.tpm_rights(call.tpm.as_ref())));
        }
        if let Some(lines) = &call.interrupts {
            if endpoint != Interface::Intercept {
                self.error(
                    lines.span(),
                    format!("interrupts applies to calls to \"intercept\", not to \"{endpoint}\""),
                    "ask intercept for interrupts: move the list to the call to intercept",
                );
                return None;
            }
            if lines.get_ref().is_empty() {
                self.error(
                    lines.span(),
                    "interrupts is empty",
                    "list the IOAPIC lines the service raises, or remove the list",
                );
            }
            return Some(Grant::Interrupts(self.interrupt_list(lines.get_ref())));
        }
        match (endpoint, &call.file_ids) {
            (Interface::Vmgs, None) => {
                self.error(
                    span,
                    "a call to \"vmgs\" must say which file ids it may use",
                    "add file-ids = [\"TPM_NVRAM\", ...] (names or numbers of VMGS file ids)",
                );
                None
            }
            (Interface::Vmgs, Some(ids)) => {
                let mut set = FileIdSet::EMPTY;
                for id in ids.get_ref() {
                    match FileId::parse(id.get_ref()) {
                        Some(f) if !f.is_user_file() => self.error(
                            id.span(),
                            format!("file id {f} is the store's own table and cannot be granted"),
                            "grant the ids of the files the service keeps, e.g. TPM_NVRAM",
                        ),
                        Some(f) if set.contains(f) => self.error(
                            id.span(),
                            format!("file id {f} is listed twice"),
                            "list each file id once",
                        ),
                        Some(f) => set = set.with(f),
                        None => self.error(
                            id.span(),
                            format!("\"{}\" is not a VMGS file id", id.get_ref()),
                            format!(
                                "use a number 1..=62 or a name: {}",
                                FileId::NAMED
                                    .iter()
                                    .filter(|(f, _)| f.is_user_file())
                                    .map(|(_, n)| *n)
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        ),
                    }
                }
                if ids.get_ref().is_empty() {
                    self.error(
                        ids.span(),
                        "file-ids is empty: the call could do nothing",
                        "list the file ids the service keeps, or remove the call",
                    );
                }
                Some(Grant::VmgsFiles(set))
            }
            (other, Some(ids)) => {
                self.error(
                    ids.span(),
                    format!("file-ids applies to calls to \"vmgs\", not to \"{other}\""),
                    "remove file-ids from this call",
                );
                None
            }
            (_, None) => None,
        }
    }

    /// `tpm = ["commands", "platform"]` of a call to vtpm: TPM commands (at locality 0, and
    /// at the localities the caller's listeners are granted) and platform signals. Nothing
    /// without it: a client of vtpm may only ping it. The register interface is the guest
    /// partition's and cannot be granted.
    fn tpm_rights(&mut self, rights: Option<&Spanned<Vec<Spanned<String>>>>) -> VtpmGrant {
        let mut grant = VtpmGrant::NONE;
        let Some(rights) = rights else {
            return grant;
        };
        if rights.get_ref().is_empty() {
            self.error(
                rights.span(),
                "tpm is empty: the call could do nothing but ping",
                "list what the service may ask of the TPM (\"commands\", \"platform\"), or remove tpm",
            );
        }
        let mut seen: Vec<&str> = Vec::new();
        for r in rights.get_ref() {
            let name = r.get_ref().as_str();
            if seen.contains(&name) {
                self.error(
                    r.span(),
                    format!("\"{name}\" is listed twice"),
                    "list it once",
                );
                continue;
            }
            seen.push(name);
            match name {
                "commands" => grant.commands = Localities::ZERO,
                "platform" => grant.platform = true,
                "registers" | "mmio" => self.error(
                    r.span(),
                    "the TPM's register interface cannot be granted to a service",
                    "only the guest partition (client `guest`) drives the registers; the microkernel grants them to its channel alone",
                ),
                other => self.error(
                    r.span(),
                    format!("\"{other}\" is not something a client may ask of the TPM"),
                    "use \"commands\" (TPM commands) and/or \"platform\" (power, NV, cancel, established flag)",
                ),
            }
        }
        grant
    }

    /// Each VMGS file id belongs to one client: two clients writing the same id would
    /// overwrite each other (a retried write could even undo the other's newer one).
    pub(super) fn vmgs_file_owners(
        &mut self,
        services: &[ServiceSpec],
        call_spans: &BTreeMap<String, Range<usize>>,
    ) {
        let mut owners: BTreeMap<FileId, String> = BTreeMap::new();
        for s in services {
            if let Some(Grant::VmgsFiles(set)) = s.grants.get(&Interface::Vmgs) {
                for id in set.iter() {
                    if let Some(other) = owners.insert(id, s.name.clone()) {
                        let span = call_spans.get(&s.name).cloned().unwrap_or(0..0);
                        self.error(
                            span,
                            format!(
                                "file id {id} is granted to both \"{other}\" and \"{}\"",
                                s.name
                            ),
                            "grant each VMGS file id to one client only",
                        );
                    }
                }
            }
        }
    }
}
