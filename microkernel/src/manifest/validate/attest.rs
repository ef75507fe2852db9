//! The `[attest]` table (sealing policy, key release, the platform's directory), and the rules
//! that tie services to the platform: one service, the one that serves attest, holds the
//! secure processor, and a sealed key is kept in its own guest-state file.

use std::ops::Range;
use std::path::PathBuf;

use ipc_defs::capability::Grant;
use ipc_defs::services::vmgs::FileId;
use ipc_defs::Interface;

use super::Validator;
use crate::manifest::schema::RawAttest;
use crate::manifest::values::parse_key_release;
use crate::manifest::AttestSettings;
use crate::manifest::Missing;
use crate::manifest::Sealing;
use crate::manifest::ServiceSpec;

impl Validator<'_> {
    /// The `[attest]` table, and the rules of the platform capability and sealed keys.
    pub(super) fn attest_settings(
        &mut self,
        raw: Option<RawAttest>,
        services: &[ServiceSpec],
        sealed_keys: &[(String, String, Range<usize>)],
        platform_holders: &[(String, Range<usize>)],
    ) -> AttestSettings {
        let mut settings = AttestSettings::default();
        for (holder, span) in platform_holders {
            let serves_attest = services
                .iter()
                .any(|s| &s.name == holder && s.serves.contains(&Interface::Attest));
            if !serves_attest {
                self.error(
                    span.clone(),
                    format!("service \"{holder}\" holds the platform but does not serve attest"),
                    "only the attestation service may reach the secure processor; remove `platform = true`",
                );
            }
        }
        if platform_holders.len() > 1 {
            self.error(
                platform_holders[1].1.clone(),
                "more than one service holds the platform",
                "`platform = true` belongs to the one service that serves attest",
            );
        }
        if sealed_keys.len() > 1 {
            self.error(
                sealed_keys[1].2.clone(),
                "more than one sealed key",
                "the paravisor seals one key, the guest-state file's datastore key",
            );
        }
        if !sealed_keys.is_empty() {
            // The microkernel writes the key protectors itself; a client holding one could
            // replace it and lose the key.
            for s in services {
                if let Some(Grant::VmgsFiles(set)) = s.grants.get(&Interface::Vmgs) {
                    for id in [FileId::HW_KEY_PROTECTOR, FileId::KEY_PROTECTOR] {
                        if set.contains(id) {
                            self.error(
                                sealed_keys[0].2.clone(),
                                format!("service \"{}\" is granted {id}, which holds the sealed datastore key", s.name),
                                "with a sealed key, HW_KEY_PROTECTOR and KEY_PROTECTOR belong to the microkernel: remove them from the service's file-ids",
                            );
                        }
                    }
                }
            }
        }
        for (service, key, span) in sealed_keys {
            let stored = services.iter().any(|s| {
                &s.name == service
                    && s.files.iter().any(
                        |f| matches!(&f.missing, Missing::CreateVmgs { key: k, .. } if k == key),
                    )
            });
            if !stored {
                self.error(
                    span.clone(),
                    format!("sealed key \"{key}\" is not the key of a guest-state file of \"{service}\""),
                    "a sealed key is kept in the guest-state file it encrypts: add `key = \"<this key>\"` to that file (missing = \"create-vmgs\")",
                );
            }
            if !services.iter().any(|s| s.platform) {
                self.error(
                    span.clone(),
                    format!("sealed key \"{key}\" needs the attest service to hold the platform"),
                    "add `platform = true` to the service that serves attest",
                );
            }
        }
        let Some(raw) = raw else {
            return settings;
        };
        if let Some(p) = raw.sealing {
            match p.get_ref().as_str() {
                "platform" => settings.sealing = Sealing::Platform,
                "measurement" => settings.sealing = Sealing::Measurement,
                other => self.error(
                    p.span(),
                    format!("sealing = \"{other}\" is unknown"),
                    "use \"platform\" (chip and TCB only: survives rebuilds) or \"measurement\" (also the launch measurement: production)",
                ),
            }
        }
        // Key release: the tenant key's id is measured (it decides which key may open the
        // state); the broker's address is a host setting (a default here, `--host` overrides).
        if let Some(a) = &raw.key_release {
            match parse_key_release(a.get_ref()) {
                Ok(addr) => settings.key_release = Some(addr),
                Err((message, help)) => self.error(a.span(), message, help),
            }
            if raw.key_release_id.is_none() {
                self.error(
                    a.span(),
                    "key-release without key-release-id",
                    "pin the tenant key's id (`paravisor kbs init-key` prints it): without it, a broker the host runs could hand over a key of its own",
                );
            }
        }
        if let Some(id) = &raw.key_release_id {
            if id.get_ref().len() == 64 && id.get_ref().bytes().all(|b| b.is_ascii_hexdigit()) {
                settings.key_release_id = Some(id.get_ref().to_ascii_lowercase());
            } else {
                self.error(
                    id.span(),
                    "key-release-id is not a key id",
                    "the 64 hex digits `paravisor kbs init-key` prints for the tenant key",
                );
            }
            if sealed_keys.is_empty() {
                self.error(
                    id.span(),
                    "key release without a sealed key",
                    "key release protects the sealed datastore key: declare it with `sealed = true`",
                );
            }
        }
        if let Some(d) = raw.platform_dir {
            if d.get_ref().is_empty() {
                self.error(
                    d.span(),
                    "platform-dir is empty",
                    "name a directory, e.g. \"platform\"",
                );
            } else {
                settings.platform_dir = Some(PathBuf::from(d.get_ref()));
            }
        }
        settings
    }
}
