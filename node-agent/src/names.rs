//! DNS names as the node compares them: one normal form (ASCII
//! lowercase, one trailing dot stripped) for target names, TLS SNI and the
//! HTTP authority, so `API.Fake.Test.` and `api.fake.test` are the same
//! name everywhere and no comparison is done on raw client text.
use std::{fmt, net::IpAddr};

/// A host name in normal form. Never an IP literal.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DnsName(String);

/// Why a client-supplied name is not a DNS name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("empty name")]
    Empty,
    #[error("`{0}` is an IP address literal, not a DNS name")]
    IpLiteral(String),
    #[error("`{0}` is not a valid DNS name")]
    Invalid(String),
}

impl DnsName {
    /// Normalises and checks `raw` (LDH labels, at most 253 bytes).
    pub fn parse(raw: &str) -> Result<Self, NameError> {
        let s = raw.strip_suffix('.').unwrap_or(raw);
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        let bracketed = s.strip_prefix('[').and_then(|s| s.strip_suffix(']'));
        if s.parse::<IpAddr>().is_ok() || bracketed.is_some_and(|b| b.parse::<IpAddr>().is_ok()) {
            return Err(NameError::IpLiteral(raw.to_owned()));
        }
        if !valid_ldh(s) {
            return Err(NameError::Invalid(raw.to_owned()));
        }
        // A dotted quad with a trailing dot, or all-numeric labels, would
        // pass LDH: refuse a name whose last label is all digits (no TLD is).
        if s.rsplit('.')
            .next()
            .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(NameError::IpLiteral(raw.to_owned()));
        }
        Ok(Self(s.to_ascii_lowercase()))
    }

    /// The host part of an HTTP authority (`host`, `host:port`,
    /// `[v6]:port`); userinfo is not allowed in `Host`.
    pub fn from_authority(authority: &str) -> Result<Self, NameError> {
        let host = if authority.starts_with('[') {
            match authority.find(']') {
                Some(end) => &authority[..=end],
                None => authority,
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
                _ => authority,
            }
        };
        if host.contains('@') {
            return Err(NameError::Invalid(authority.to_owned()));
        }
        Self::parse(host)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DnsName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A configured name: exact (`api.example.com`) or one wildcard label
/// (`*.example.com`: any name strictly below `example.com`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NamePattern {
    Exact(DnsName),
    Subdomains(DnsName),
}

impl NamePattern {
    pub fn parse(raw: &str) -> Result<Self, NameError> {
        match raw.strip_prefix("*.") {
            Some(base) => DnsName::parse(base).map(Self::Subdomains),
            None => DnsName::parse(raw).map(Self::Exact),
        }
    }

    pub fn matches(&self, name: &DnsName) -> bool {
        match self {
            Self::Exact(n) => n == name,
            Self::Subdomains(base) => name
                .as_str()
                .strip_suffix(base.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        }
    }
}

pub(crate) fn valid_ldh(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_dot_and_case_are_normalised() {
        let a = DnsName::parse("API.Fake.Test.").unwrap();
        assert_eq!(a.as_str(), "api.fake.test");
        assert_eq!(a, DnsName::parse("api.fake.test").unwrap());
        assert_eq!(
            DnsName::from_authority("Api.Fake.Test.:443").unwrap(),
            a,
            "port ignored"
        );
    }

    #[test]
    fn literals_and_junk_are_not_names() {
        for ip in ["10.0.0.1", "10.0.0.1.", "::1", "[::1]", "1.2.3.4"] {
            assert!(
                matches!(DnsName::parse(ip), Err(NameError::IpLiteral(_))),
                "{ip}"
            );
        }
        assert!(matches!(
            DnsName::from_authority("[2001:db8::1]:443"),
            Err(NameError::IpLiteral(_))
        ));
        for bad in [
            "",
            ".",
            "a..b",
            "-a.b",
            "a b",
            "a.b..",
            "user@api.fake.test",
        ] {
            assert!(DnsName::from_authority(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn wildcards_match_strict_subdomains_only() {
        let p = NamePattern::parse("*.Fake.Test").unwrap();
        assert!(p.matches(&DnsName::parse("api.fake.test.").unwrap()));
        assert!(p.matches(&DnsName::parse("a.b.fake.test").unwrap()));
        assert!(!p.matches(&DnsName::parse("fake.test").unwrap()));
        assert!(!p.matches(&DnsName::parse("evilfake.test").unwrap()));
        let e = NamePattern::parse("api.fake.test").unwrap();
        assert!(e.matches(&DnsName::parse("API.FAKE.TEST.").unwrap()));
        assert!(!e.matches(&DnsName::parse("x.api.fake.test").unwrap()));
    }
}
