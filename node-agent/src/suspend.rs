//! Identity suspension for incident response: a suspended workload's new
//! requests (and connections) are refused and its held approvals denied.
//! Two sources: the node's own (the control socket, by identity; lifted
//! only by a signed resume) and the
//! fleet's signed list from the console (by identity, repository or
//! actor; `console.rs` verifies it). Both are kept in sled so a restart
//! does not lift a suspension, and every change is on the audit chain.
use std::{collections::HashMap, sync::RwLock};

use serde::{Deserialize, Serialize};
use sluice_fleet::suspension::{Entry, List};

use crate::{
    approvals::SignedBy,
    identity::WorkloadIdentity,
    record::{now_ms, RecordError, RecordStore},
};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Suspension {
    /// The identity, or for a fleet entry `repository:owner/name`,
    /// `actor:name` or `identity:id`.
    pub identity: String,
    pub reason: String,
    pub by_uid: u32,
    pub at_ms: u64,
    /// Suspended from the console: the person who did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

impl Suspension {
    fn of_entry(e: &Entry) -> Self {
        Self {
            identity: format!("{}:{}", e.scope.as_str(), e.value),
            reason: e.reason.clone(),
            by_uid: 0,
            at_ms: e.at_ms,
            by: Some(e.by.clone()),
        }
    }
}

pub struct Suspensions {
    tree: sled::Tree,
    cache: RwLock<HashMap<String, Suspension>>,
    /// The fleet's list in force (version 0: none yet).
    fleet: RwLock<List>,
}

/// Where the fleet's list is kept, beside the node's own entries (keyed
/// by identity ids, which hold no NUL).
const FLEET_KEY: &[u8] = b"\0fleet-list";

/// Why a fleet list was not applied.
#[derive(Debug, thiserror::Error)]
pub enum FleetListError {
    #[error("version {got} is not newer than the list in force (version {have})")]
    Stale { got: u64, have: u64 },
    #[error(transparent)]
    Record(#[from] RecordError),
}

impl Suspensions {
    pub fn open(store: &RecordStore) -> Result<Self, RecordError> {
        let tree = store.tree("suspensions")?;
        let mut cache = HashMap::new();
        let mut fleet = List::default();
        for item in tree.iter() {
            let (k, v) = item?;
            if k.as_ref() == FLEET_KEY {
                if let Ok(l) = serde_json::from_slice::<List>(&v) {
                    fleet = l;
                }
            } else if let Ok(s) = serde_json::from_slice::<Suspension>(&v) {
                cache.insert(s.identity.clone(), s);
            }
        }
        Ok(Self {
            tree,
            cache: RwLock::new(cache),
            fleet: RwLock::new(fleet),
        })
    }

    /// The suspension in force for a connection of `who`, if any: the
    /// node's own by identity, then the fleet's by identity, repository
    /// or actor.
    pub fn get(&self, who: &WorkloadIdentity) -> Option<Suspension> {
        if let Some(s) = self
            .cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&who.id)
        {
            return Some(s.clone());
        }
        let ci = who.ci.as_ref();
        self.fleet_covering(
            &who.id,
            ci.and_then(|c| c.repository.as_deref()),
            ci.and_then(|c| c.actor.as_deref()),
        )
    }

    /// The fleet entry covering an identity, repository or actor.
    pub fn fleet_covering(
        &self,
        identity: &str,
        repository: Option<&str>,
        actor: Option<&str>,
    ) -> Option<Suspension> {
        self.fleet
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .covering(identity, repository, actor)
            .map(Suspension::of_entry)
    }

    pub fn fleet_version(&self) -> u64 {
        self.fleet.read().unwrap_or_else(|e| e.into_inner()).version
    }

    /// Puts a verified fleet list in force if it is newer than the one in
    /// force; returns the entries it adds. Blocks (an audit on disk).
    pub fn apply_fleet(
        &self,
        store: &RecordStore,
        list: List,
        signer: &str,
    ) -> Result<Vec<Entry>, FleetListError> {
        let have = self.fleet_version();
        if list.version <= have {
            return Err(FleetListError::Stale {
                got: list.version,
                have,
            });
        }
        let old = self.fleet.read().unwrap_or_else(|e| e.into_inner()).clone();
        let added: Vec<Entry> = list
            .entries
            .iter()
            .filter(|e| !old.entries.contains(e))
            .cloned()
            .collect();
        let lifted: Vec<&Entry> = old
            .entries
            .iter()
            .filter(|e| !list.entries.contains(e))
            .collect();
        store.audit(
            "identity.fleet_list",
            &serde_json::json!({
                "version": list.version, "signer": signer, "entries": list.entries.len(),
                "added": added, "lifted": lifted,
            }),
        )?;
        self.tree
            .insert(
                FLEET_KEY,
                serde_json::to_vec(&list).map_err(RecordError::Encode)?,
            )
            .map_err(RecordError::from)?;
        store.flush_blocking()?;
        *self.fleet.write().unwrap_or_else(|e| e.into_inner()) = list;
        Ok(added)
    }

    /// The node's own suspensions, then the fleet's.
    pub fn list(&self) -> Vec<Suspension> {
        let mut v: Vec<_> = self
            .cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|s| s.at_ms);
        v.extend(
            self.fleet
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .entries
                .iter()
                .map(Suspension::of_entry),
        );
        v
    }

    pub fn suspend(
        &self,
        store: &RecordStore,
        identity: &str,
        reason: &str,
        uid: u32,
    ) -> Result<Suspension, RecordError> {
        let s = Suspension {
            identity: identity.to_owned(),
            reason: reason.to_owned(),
            by_uid: uid,
            at_ms: now_ms(),
            by: None,
        };
        store.audit(
            "identity.suspended",
            &serde_json::to_value(&s).unwrap_or_default(),
        )?;
        self.tree.insert(
            identity.as_bytes(),
            serde_json::to_vec(&s).unwrap_or_default(),
        )?;
        store.flush_blocking()?;
        self.cache
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(identity.to_owned(), s.clone());
        Ok(s)
    }

    /// The node's own suspension of `identity` (not the fleet's).
    pub fn local(&self, identity: &str) -> Option<Suspension> {
        self.cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(identity)
            .cloned()
    }

    /// Lifts the node's own suspension of `identity`, on a signed resume
    /// (`decision::Deciders::resume`) sent by `uid`.
    pub fn resume(
        &self,
        store: &RecordStore,
        identity: &str,
        uid: u32,
        signed: &SignedBy,
    ) -> Result<bool, RecordError> {
        let was = self
            .cache
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(identity)
            .is_some();
        if was {
            store.audit(
                "identity.resumed",
                &serde_json::json!({"identity": identity, "by_uid": uid, "signed": signed, "at_ms": now_ms()}),
            )?;
            self.tree.remove(identity.as_bytes())?;
            store.flush_blocking()?;
        }
        Ok(was)
    }
}
