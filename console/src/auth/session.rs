//! Login sessions and logins under way, in memory (a restart logs everyone
//! out). Both tables are keyed by the SHA-256 of the secret the browser
//! holds, expire, and are bounded: a flood of logins started and never
//! finished evicts the oldest, it does not grow the process.
use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use super::{random_token, sha256, Role};

/// How long a login lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// How long a person has at the identity provider to finish a login.
pub const PENDING_TTL: Duration = Duration::from_secs(600);
const MAX_SESSIONS: usize = 10_000;
const MAX_PENDING: usize = 1_000;

#[derive(Clone)]
pub struct Live {
    pub name: String,
    pub role: Role,
    pub csrf: String,
    expires: Instant,
}

/// A login under way, found again by its `state`.
pub struct Pending {
    /// SHA-256 of the login cookie: the callback must come from the
    /// browser that started it (no logging a victim in as someone else).
    pub binding: [u8; 32],
    pub nonce: String,
    pub verifier: String,
    pub next: String,
    expires: Instant,
}

#[derive(Default)]
pub struct Sessions {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    live: HashMap<[u8; 32], Live>,
    pending: HashMap<[u8; 32], Pending>,
}

/// Makes room for one more entry: drops the expired, then the soonest to
/// expire.
fn make_room<V>(map: &mut HashMap<[u8; 32], V>, max: usize, expires: impl Fn(&V) -> Instant) {
    if map.len() < max {
        return;
    }
    let now = Instant::now();
    map.retain(|_, v| expires(v) > now);
    while map.len() >= max {
        let Some(k) = map.iter().min_by_key(|(_, v)| expires(v)).map(|(k, _)| *k) else {
            break;
        };
        map.remove(&k);
    }
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves plain maps behind,
        // still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new session; returns the cookie value.
    pub fn create(&self, name: String, role: Role) -> String {
        let id = random_token();
        let mut g = self.lock();
        make_room(&mut g.live, MAX_SESSIONS, |l| l.expires);
        g.live.insert(
            sha256(id.as_bytes()),
            Live {
                name,
                role,
                csrf: random_token(),
                expires: Instant::now() + SESSION_TTL,
            },
        );
        id
    }

    pub fn get(&self, id: &str) -> Option<Live> {
        let key = sha256(id.as_bytes());
        let mut g = self.lock();
        match g.live.get(&key) {
            Some(l) if l.expires > Instant::now() => Some(l.clone()),
            Some(_) => {
                g.live.remove(&key);
                None
            }
            None => None,
        }
    }

    pub fn remove(&self, id: &str) {
        self.lock().live.remove(&sha256(id.as_bytes()));
    }

    pub fn start(&self, state: &str, binding: &str, nonce: String, verifier: String, next: String) {
        let mut g = self.lock();
        make_room(&mut g.pending, MAX_PENDING, |p| p.expires);
        g.pending.insert(
            sha256(state.as_bytes()),
            Pending {
                binding: sha256(binding.as_bytes()),
                nonce,
                verifier,
                next,
                expires: Instant::now() + PENDING_TTL,
            },
        );
    }

    /// The login for `state`, once: a replayed callback finds nothing.
    pub fn finish(&self, state: &str) -> Option<Pending> {
        let p = self.lock().pending.remove(&sha256(state.as_bytes()))?;
        (p.expires > Instant::now()).then_some(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_found_by_their_id_only_and_bounded() {
        let s = Sessions::default();
        let id = s.create("alice".into(), Role::Viewer);
        assert_eq!(s.get(&id).map(|l| l.name), Some("alice".to_string()));
        assert!(s.get("not-the-id").is_none());
        s.remove(&id);
        assert!(s.get(&id).is_none());
        for _ in 0..MAX_SESSIONS + 5 {
            s.create("bob".into(), Role::Viewer);
        }
        assert_eq!(s.lock().live.len(), MAX_SESSIONS);
    }

    #[test]
    fn a_pending_login_is_taken_once() {
        let s = Sessions::default();
        s.start("st", "bind", "n".into(), "v".into(), "/".into());
        assert!(s.finish("other").is_none());
        let p = s.finish("st").map(|p| p.nonce);
        assert_eq!(p.as_deref(), Some("n"));
        assert!(s.finish("st").is_none());
    }
}
