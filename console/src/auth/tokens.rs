//! API tokens for automation. The file holds only each token's SHA-256
//! (lines `ROLE NAME SHA256HEX`), so reading it does not give a token
//! away; it is still refused when group or others can read it, as a
//! file of credentials' fingerprints should be kept.
use std::{os::unix::fs::PermissionsExt, path::Path};

use super::{random_token, sha256, AuthError, Role};

struct Entry {
    role: Role,
    name: String,
    hash: [u8; 32],
}

pub struct Tokens {
    entries: Vec<Entry>,
}

impl Tokens {
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let bad =
            |why: String| AuthError::Config(format!("API tokens file {}: {why}", path.display()));
        let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(bad(format!(
                "readable or writable by group or others (mode {:o}); chmod 600 it",
                meta.permissions().mode() & 0o777
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        Self::parse(&text).map_err(bad)
    }

    fn parse(text: &str) -> Result<Self, String> {
        let mut entries: Vec<Entry> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = |why: &str| format!("line {}: {why}", n + 1);
            let f: Vec<&str> = line.split_whitespace().collect();
            let [role, name, hash] = f[..] else {
                return Err(at("expected `ROLE NAME SHA256HEX`"));
            };
            let role: Role = role.parse().map_err(|e: String| at(&e))?;
            let mut h = [0u8; 32];
            hex::decode_to_slice(hash, &mut h)
                .map_err(|_| at("the hash is not 64 hex digits (a SHA-256)"))?;
            if entries.iter().any(|e| e.name == name) {
                return Err(at(&format!("{name} is named twice")));
            }
            if entries.iter().any(|e| e.hash == h) {
                return Err(at("the same token is listed twice"));
            }
            entries.push(Entry {
                role,
                name: name.to_string(),
                hash: h,
            });
        }
        Ok(Self { entries })
    }

    /// The name and role of `token`, comparing against every entry in
    /// constant time (no early exit that would time the match).
    pub fn check(&self, token: &str) -> Option<(String, Role)> {
        let h = sha256(token.as_bytes());
        let mut found = None;
        for e in &self.entries {
            if super::ct_eq(&e.hash, &h) {
                found = Some((e.name.clone(), e.role));
            }
        }
        found
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

/// `sluice-console token …`
#[derive(clap::Subcommand, Debug)]
pub enum TokenCmd {
    /// Prints a new random API token and the line for --api-tokens-file.
    New {
        #[arg(long)]
        role: Role,
        /// Who uses it (audits and decisions name it `token:NAME`).
        #[arg(long)]
        name: String,
    },
}

impl clap::ValueEnum for Role {
    fn value_variants<'a>() -> &'a [Self] {
        &[Role::Viewer, Role::Approver, Role::Admin]
    }
    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.as_str()))
    }
}

/// A token and its file line.
pub fn new_token(role: Role, name: &str) -> Result<(String, String), AuthError> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_graphic()) {
        return Err(AuthError::Config(
            "--name must be printable ASCII without spaces".into(),
        ));
    }
    let token = format!("sluice_{}", random_token());
    let line = format!(
        "{} {name} {}",
        role.as_str(),
        hex::encode(sha256(token.as_bytes()))
    );
    Ok((token, line))
}

pub fn run(cmd: TokenCmd) -> Result<(), AuthError> {
    match cmd {
        TokenCmd::New { role, name } => {
            let (token, line) = new_token(role, &name)?;
            println!("token (give it to {name}; it is not shown again):\n{token}");
            println!("line for the --api-tokens-file:\n{line}");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_token_checks_against_its_line_and_nothing_else() {
        let (token, line) = new_token(Role::Approver, "ci-bot")
            .map_err(|e| e.to_string())
            .unwrap();
        let t = Tokens::parse(&format!("# comment\n\n{line}\n")).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(
            t.check(&token),
            Some(("ci-bot".to_string(), Role::Approver))
        );
        assert_eq!(t.check(&format!("{token}x")), None);
        assert_eq!(t.check(""), None);
    }

    #[test]
    fn malformed_lines_are_refused_with_their_number() {
        let h = "00".repeat(32);
        for (text, want) in [
            (format!("root x {h}"), "line 1: unknown role"),
            ("viewer x\n".to_string(), "line 1: expected"),
            ("viewer x abcd".to_string(), "64 hex"),
            (
                format!("viewer x {h}\nadmin x {}", "11".repeat(32)),
                "line 2: x is named twice",
            ),
            (format!("viewer x {h}\nadmin y {h}"), "listed twice"),
        ] {
            let err = Tokens::parse(&text).err().unwrap_or_default();
            assert!(err.contains(want), "{text:?}: {err}");
        }
        assert!(new_token(Role::Viewer, "two words").is_err());
    }
}
