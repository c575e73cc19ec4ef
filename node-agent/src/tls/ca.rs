//! The node's internal CA: created once per node in the state directory
//! (key mode 0600, never logged), constrained by X.509 name constraints to
//! the configured target names so that a stolen key cannot impersonate any
//! other site, and used to mint short-lived leaf certificates on demand.
use std::{
    collections::HashMap,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, KeyPair, KeyUsagePurpose, NameConstraints,
};
use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    sign::CertifiedKey,
};
use sha2::{Digest, Sha256};

/// Name the node's CA has in every subject, so operators recognise it.
const CA_ORG: &str = "Sluice node CA";
/// Leaf lifetime: short, so a leaked leaf key is worth little.
const LEAF_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// Re-mint well before expiry.
const LEAF_REFRESH: Duration = Duration::from_secs(12 * 3600);
const LEAF_CACHE_MAX: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CA file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("CA certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("CA certificate {path} does not parse: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("refusing to issue a certificate for `{0}`: not a target name (outside the CA's name constraints)")]
    NotPermitted(String),
    #[error("no CA in {0}; run `sluice ca init`")]
    Missing(PathBuf),
    #[error("TLS key: {0}")]
    Key(#[from] rustls::Error),
}

pub struct Ca {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: rcgen::Certificate,
    key: KeyPair,
    /// DNS subtrees the CA may issue for (its name constraints).
    permitted: Vec<String>,
    leaves: Mutex<HashMap<String, (Instant, Arc<CertifiedKey>)>>,
}

pub fn cert_path(dir: &Path) -> PathBuf {
    dir.join("ca.pem")
}
pub fn key_path(dir: &Path) -> PathBuf {
    dir.join("ca.key")
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Normalises a target name to a name-constraint subtree: `*.x.y` → `x.y`.
fn subtree(name: &str) -> String {
    name.trim_start_matches("*.")
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

/// DNS name constraint semantics: `name` is `base` or ends in `.base`.
pub fn within(name: &str, base: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == base || name.ends_with(&format!(".{base}"))
}

impl Ca {
    /// Creates a new CA in `dir`, constrained to `names`. Refuses to
    /// overwrite an existing one unless `force`.
    pub fn init(dir: &Path, names: &[String], force: bool) -> Result<Self, CaError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        if cert_path(dir).exists() && !force {
            return Self::load(dir);
        }
        let mut permitted: Vec<String> = names.iter().map(|n| subtree(n)).collect();
        permitted.sort();
        permitted.dedup();
        let key = KeyPair::generate()?;
        let params = ca_params(&permitted);
        let cert = params.self_signed(&key)?;
        let kp = key_path(dir);
        // Key first, created 0600: never a moment with wider permissions.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&kp)
            .map_err(io(&kp))?;
        f.write_all(key.serialize_pem().as_bytes())
            .map_err(io(&kp))?;
        let _ = std::fs::set_permissions(&kp, std::fs::Permissions::from_mode(0o600));
        let cp = cert_path(dir);
        std::fs::write(&cp, cert.pem()).map_err(io(&cp))?;
        Self::load(dir)
    }

    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let cp = cert_path(dir);
        if !cp.exists() {
            return Err(CaError::Missing(dir.to_owned()));
        }
        let cert_pem = std::fs::read_to_string(&cp).map_err(io(&cp))?;
        let kp = key_path(dir);
        let key_pem = std::fs::read_to_string(&kp).map_err(io(&kp))?;
        let key = KeyPair::from_pem(&key_pem)?;
        let params =
            CertificateParams::from_ca_cert_pem(&cert_pem).map_err(|e| CaError::Parse {
                path: cp.clone(),
                message: e.to_string(),
            })?;
        let permitted = params
            .name_constraints
            .as_ref()
            .map(|nc| {
                nc.permitted_subtrees
                    .iter()
                    .filter_map(|s| match s {
                        GeneralSubtree::DnsName(n) => Some(n.clone()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let cert_der =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| CaError::Parse {
                path: cp.clone(),
                message: e.to_string(),
            })?;
        // rcgen signs with an issuer `Certificate`; re-create it from the
        // stored parameters and key (same subject, same key identifier).
        let issuer = params.self_signed(&key)?;
        Ok(Self {
            cert_pem,
            cert_der,
            issuer,
            key,
            permitted,
            leaves: Mutex::new(HashMap::new()),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    pub fn permitted(&self) -> &[String] {
        &self.permitted
    }

    pub fn fingerprint(&self) -> String {
        hex::encode(Sha256::digest(self.cert_der.as_ref()))
    }

    pub fn permits(&self, name: &str) -> bool {
        self.permitted.iter().any(|b| within(name, b))
    }

    /// A leaf certificate for `name`, from the cache while it is fresh.
    pub fn leaf(&self, name: &str) -> Result<Arc<CertifiedKey>, CaError> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if !self.permits(&name) {
            return Err(CaError::NotPermitted(name));
        }
        {
            let leaves = self.leaves.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((at, ck)) = leaves.get(&name) {
                if at.elapsed() < LEAF_REFRESH {
                    return Ok(ck.clone());
                }
            }
        }
        let ck = Arc::new(self.mint(&name)?);
        let mut leaves = self.leaves.lock().unwrap_or_else(|e| e.into_inner());
        if leaves.len() >= LEAF_CACHE_MAX {
            // Bounded: drop the oldest entry.
            if let Some(oldest) = leaves
                .iter()
                .min_by_key(|(_, (at, _))| *at)
                .map(|(k, _)| k.clone())
            {
                leaves.remove(&oldest);
            }
        }
        leaves.insert(name, (Instant::now(), ck.clone()));
        Ok(ck)
    }

    fn mint(&self, name: &str) -> Result<CertifiedKey, CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![name.to_owned()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, CA_ORG);
        params.distinguished_name = dn;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::seconds(LEAF_VALIDITY.as_secs() as i64);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer, &self.key)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let provider = rustls::crypto::ring::default_provider();
        let signing = provider.key_provider.load_private_key(key_der)?;
        Ok(CertifiedKey::new(
            vec![cert.der().clone(), self.cert_der.clone()],
            signing,
        ))
    }
}

fn ca_params(permitted: &[String]) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    dn.push(DnType::CommonName, format!("{CA_ORG} {}", host.trim()));
    dn.push(DnType::OrganizationName, CA_ORG);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(365);
    // With no target names, permit only a reserved name: an empty
    // constraint list would mean "unconstrained".
    let dns: Vec<GeneralSubtree> = if permitted.is_empty() {
        vec![GeneralSubtree::DnsName("invalid".into())]
    } else {
        permitted
            .iter()
            .map(|n| GeneralSubtree::DnsName(n.clone()))
            .collect()
    };
    params.name_constraints = Some(NameConstraints {
        permitted_subtrees: dns,
        // No IP-address certificates at all.
        excluded_subtrees: vec![
            GeneralSubtree::IpAddress(CidrSubnet::V4([0; 4], [0; 4])),
            GeneralSubtree::IpAddress(CidrSubnet::V6([0; 16], [0; 16])),
        ],
    });
    params
}

/// Human-readable facts about a CA certificate, for `sluice ca show`.
pub fn describe(der: &[u8]) -> Result<Vec<(String, String)>, String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let mut out = vec![
        ("subject".to_owned(), cert.subject().to_string()),
        (
            "not before".to_owned(),
            cert.validity().not_before.to_string(),
        ),
        (
            "not after".to_owned(),
            cert.validity().not_after.to_string(),
        ),
        (
            "sha256 fingerprint".to_owned(),
            hex::encode(Sha256::digest(der)),
        ),
    ];
    if let Ok(Some(nc)) = cert.name_constraints() {
        let fmt = |subs: &Option<Vec<x509_parser::extensions::GeneralSubtree>>| {
            subs.as_ref()
                .map(|v| {
                    v.iter()
                        .map(|s| s.base.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default()
        };
        out.push((
            "permitted names".to_owned(),
            fmt(&nc.value.permitted_subtrees),
        ));
        out.push((
            "excluded names".to_owned(),
            fmt(&nc.value.excluded_subtrees),
        ));
    } else {
        out.push(("name constraints".to_owned(), "NONE".to_owned()));
    }
    Ok(out)
}

/// Where `sluice ca install` puts the certificate (Debian's local store).
pub fn system_store_path(fingerprint: &str) -> PathBuf {
    PathBuf::from(format!(
        "/usr/local/share/ca-certificates/sluice-{}.crt",
        &fingerprint[..16]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_is_constrained_and_refuses_other_names() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init(
            dir.path(),
            &["api.example.test".into(), "*.cursor.test".into()],
            false,
        )
        .unwrap();
        let mode = std::fs::metadata(key_path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(ca.leaf("api.example.test").is_ok());
        assert!(ca.leaf("repo.cursor.test").is_ok());
        assert!(matches!(
            ca.leaf("example.test"),
            Err(CaError::NotPermitted(_))
        ));
        assert!(matches!(ca.leaf("evil.com"), Err(CaError::NotPermitted(_))));
        let facts = describe(ca.cert_der()).unwrap();
        let permitted = &facts
            .iter()
            .find(|(k, _)| k == "permitted names")
            .unwrap()
            .1;
        assert!(
            permitted.contains("api.example.test") && permitted.contains("cursor.test"),
            "{permitted}"
        );
        // Reloading gives the same CA and the same constraints.
        let again = Ca::load(dir.path()).unwrap();
        assert_eq!(again.fingerprint(), ca.fingerprint());
        assert_eq!(again.permitted(), ca.permitted());
        // The leaf chains to the CA (issuer name matches).
        let leaf = again.leaf("api.example.test").unwrap();
        use x509_parser::prelude::*;
        let (_, l) = X509Certificate::from_der(leaf.cert[0].as_ref()).unwrap();
        let (_, c) = X509Certificate::from_der(ca.cert_der().as_ref()).unwrap();
        assert_eq!(l.issuer(), c.subject());
    }

    #[test]
    fn no_names_means_nothing_is_permitted() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init(dir.path(), &[], false).unwrap();
        assert!(ca.leaf("anything.test").is_err());
        let facts = describe(ca.cert_der()).unwrap();
        assert!(facts
            .iter()
            .any(|(k, v)| k == "permitted names" && v.contains("invalid")));
    }
}
