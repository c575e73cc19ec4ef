//! Identity suspension for incident response: a suspended workload's new
//! requests (and connections) are refused and its held approvals denied.
//! Kept in sled so a restart does not lift a suspension, and every change
//! is on the audit chain.
use std::{collections::HashMap, sync::RwLock};

use serde::{Deserialize, Serialize};

use crate::record::{now_ms, RecordError, RecordStore};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Suspension {
    pub identity: String,
    pub reason: String,
    pub by_uid: u32,
    pub at_ms: u64,
}

pub struct Suspensions {
    tree: sled::Tree,
    cache: RwLock<HashMap<String, Suspension>>,
}

impl Suspensions {
    pub fn open(store: &RecordStore) -> Result<Self, RecordError> {
        let tree = store.tree("suspensions")?;
        let mut cache = HashMap::new();
        for item in tree.iter() {
            let (_, v) = item?;
            if let Ok(s) = serde_json::from_slice::<Suspension>(&v) {
                cache.insert(s.identity.clone(), s);
            }
        }
        Ok(Self {
            tree,
            cache: RwLock::new(cache),
        })
    }

    pub fn get(&self, identity: &str) -> Option<Suspension> {
        self.cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(identity)
            .cloned()
    }

    pub fn list(&self) -> Vec<Suspension> {
        let mut v: Vec<_> = self
            .cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|s| s.at_ms);
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

    pub fn resume(
        &self,
        store: &RecordStore,
        identity: &str,
        uid: u32,
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
                &serde_json::json!({"identity": identity, "by_uid": uid, "at_ms": now_ms()}),
            )?;
            self.tree.remove(identity.as_bytes())?;
            store.flush_blocking()?;
        }
        Ok(was)
    }
}
