//! Authentication. Two designs, chosen per connection:
//!
//! - **Node-held credential** (a bundle credential for the target and the
//!   role the job asks for): the node logs in to the server itself (SCRAM,
//!   with channel binding to the server's real certificate when the
//!   server offers `SCRAM-SHA-256-PLUS`; MD5; password) and tells the job
//!   `AuthenticationOk`. The job is admitted on the identity the kernel
//!   gave it and never holds the database password.
//! - **Relay**: the server's challenge goes to the job and its answers back.
//!   This works for password, MD5 and SCRAM without channel binding; it
//!   cannot work for SCRAM-PLUS once the node terminates the job's TLS
//!   (the job would bind to the node's certificate, or send the `y` flag
//!   the server rejects as a downgrade), so that case is refused with an
//!   error that says so.
use bytes::{Buf, BufMut, BytesMut};
use postgres_protocol::{
    authentication::{
        md5_hash,
        sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256, SCRAM_SHA_256_PLUS},
    },
    message::frontend,
};
use tokio::io::AsyncWriteExt;

use super::{
    codec::{self, Message, Reader},
    Io, PgError,
};

/// How the job was let in, for the record.
#[derive(Debug, Clone)]
pub struct Login {
    /// `node-credential` or `relay`.
    pub mode: &'static str,
    /// `trust`, `password`, `md5`, `SCRAM-SHA-256` or `SCRAM-SHA-256-PLUS`.
    pub method: String,
    /// The server starts the session with `standard_conforming_strings`
    /// off (a role or database setting, or the client's `options`).
    pub backslash_escapes: bool,
}

pub struct NodeCredential<'a> {
    pub user: &'a str,
    pub password: &'a str,
    /// The bundle allows answering cleartext and MD5 challenges.
    pub weak_auth: bool,
}

/// A server that asks for the password itself (cleartext) or a hash a
/// replay can reuse (MD5) is not given the node's secret unless the
/// credential says so: any server reachable on a target address could
/// ask.
fn refuse_weak(method: &str) -> PgError {
    PgError::Upstream(format!(
        "the server asks for the password by {method}; the node's credential is only used with SCRAM (set `weak_auth: true` on the credential to allow {method})"
    ))
}

/// Runs the login until the server's first ReadyForQuery, which is
/// forwarded to the client with everything before it (ParameterStatus,
/// BackendKeyData, notices).
pub async fn login(
    client: &mut Reader<Box<dyn Io>>,
    server: &mut Reader<Box<dyn Io>>,
    startup: bytes::Bytes,
    credential: Option<NodeCredential<'_>>,
    client_tls: bool,
    binding: Option<&[u8]>,
) -> Result<Login, PgError> {
    server
        .get_mut()
        .write_all(&startup)
        .await
        .map_err(PgError::Io)?;
    let mut login = Login {
        mode: if credential.is_some() {
            "node-credential"
        } else {
            "relay"
        },
        method: "trust".into(),
        backslash_escapes: false,
    };
    let mut scram: Option<ScramSha256> = None;
    loop {
        let msg = server.next().await?.ok_or_else(|| {
            PgError::Upstream("the server closed the connection during login".into())
        })?;
        match msg.tag {
            b'R' => {
                let mut body = &msg.body[..];
                let code = codec::take_i32(&mut body)?;
                match (code, &credential) {
                    (0, _) => send(client, &codec::auth_ok()).await?,
                    (3 | 5, Some(c)) if !c.weak_auth => {
                        return Err(refuse_weak(if code == 3 { "cleartext password" } else { "MD5" }))
                    }
                    (3, Some(c)) => {
                        login.method = "password".into();
                        let mut b = BytesMut::new();
                        frontend::password_message(c.password.as_bytes(), &mut b)
                            .map_err(PgError::Io)?;
                        server.get_mut().write_all(&b).await.map_err(PgError::Io)?;
                    }
                    (5, Some(c)) => {
                        login.method = "md5".into();
                        let salt: [u8; 4] = codec::take_bytes(&mut body, 4)?
                            .try_into()
                            .map_err(|_| PgError::Protocol("MD5 salt".into()))?;
                        let hash = md5_hash(c.user.as_bytes(), c.password.as_bytes(), salt);
                        let mut b = BytesMut::new();
                        frontend::password_message(hash.as_bytes(), &mut b).map_err(PgError::Io)?;
                        server.get_mut().write_all(&b).await.map_err(PgError::Io)?;
                    }
                    (10, Some(c)) => {
                        let mechanisms = mechanisms(body)?;
                        let (mechanism, cb) = match binding {
                            Some(hash) if mechanisms.iter().any(|m| m == SCRAM_SHA_256_PLUS) => (
                                SCRAM_SHA_256_PLUS,
                                ChannelBinding::tls_server_end_point(hash.to_vec()),
                            ),
                            // Over TLS without PLUS on offer: say we could
                            // bind (`y`), so a stripped offer is detected.
                            Some(_) => (SCRAM_SHA_256, ChannelBinding::unrequested()),
                            None => (SCRAM_SHA_256, ChannelBinding::unsupported()),
                        };
                        if !mechanisms.iter().any(|m| m == SCRAM_SHA_256 || m == SCRAM_SHA_256_PLUS) {
                            return Err(PgError::Upstream(format!(
                                "the server offers no SCRAM mechanism the node speaks ({})",
                                mechanisms.join(", ")
                            )));
                        }
                        login.method = mechanism.into();
                        let s = ScramSha256::new(c.password.as_bytes(), cb);
                        let mut b = BytesMut::new();
                        frontend::sasl_initial_response(mechanism, s.message(), &mut b)
                            .map_err(PgError::Io)?;
                        server.get_mut().write_all(&b).await.map_err(PgError::Io)?;
                        scram = Some(s);
                    }
                    (11, Some(_)) => {
                        let s = scram
                            .as_mut()
                            .ok_or_else(|| PgError::Protocol("SASLContinue before SASL".into()))?;
                        s.update(body)
                            .map_err(|e| PgError::Upstream(format!("SCRAM: {e}")))?;
                        let mut b = BytesMut::new();
                        frontend::sasl_response(s.message(), &mut b).map_err(PgError::Io)?;
                        server.get_mut().write_all(&b).await.map_err(PgError::Io)?;
                    }
                    (12, Some(_)) => {
                        // Verifies the server's signature: a server that
                        // does not know the password is not logged in to.
                        let s = scram
                            .as_mut()
                            .ok_or_else(|| PgError::Protocol("SASLFinal before SASL".into()))?;
                        s.finish(body)
                            .map_err(|e| PgError::Upstream(format!("SCRAM server proof: {e}")))?;
                    }
                    (10, None) => {
                        let mechanisms = mechanisms(body)?;
                        login.method = SCRAM_SHA_256.into();
                        if client_tls && mechanisms.iter().any(|m| m == SCRAM_SHA_256_PLUS) {
                            return Err(PgError::ChannelBinding);
                        }
                        // A plaintext client cannot bind (and libpq refuses
                        // a PLUS offer without TLS): it is offered what it
                        // can do, and answers `n`, which the server takes.
                        let offer: Vec<&String> = mechanisms
                            .iter()
                            .filter(|m| *m != SCRAM_SHA_256_PLUS)
                            .collect();
                        let mut body = BytesMut::new();
                        body.put_i32(10);
                        for m in offer {
                            body.put_slice(m.as_bytes());
                            body.put_u8(0);
                        }
                        body.put_u8(0);
                        relay_challenge(client, server, &Message::new(b'R', body.freeze())).await?;
                    }
                    (3 | 5 | 11 | 12, None) => {
                        if code == 3 {
                            login.method = "password".into();
                        } else if code == 5 {
                            login.method = "md5".into();
                        }
                        if code == 12 {
                            send(client, &msg).await?;
                        } else {
                            relay_challenge(client, server, &msg).await?;
                        }
                    }
                    (code, _) => {
                        return Err(PgError::Upstream(format!(
                            "the server asks for an authentication method the node cannot take part in (code {code}: Kerberos, GSSAPI or SSPI)"
                        )))
                    }
                }
            }
            b'E' => {
                let fields = codec::error_fields(&msg.body);
                let text = fields
                    .iter()
                    .find(|(c, _)| *c == b'M')
                    .map(|(_, m)| m.clone())
                    .unwrap_or_default();
                send(client, &msg).await?;
                return Err(PgError::LoginRefused(text));
            }
            b'Z' => {
                send(client, &msg).await?;
                return Ok(login);
            }
            b'S' => {
                if let Some(on) = super::backslash_escapes(&msg.body) {
                    login.backslash_escapes = on;
                }
                send(client, &msg).await?;
            }
            // BackendKeyData, notices, NegotiateProtocolVersion.
            _ => send(client, &msg).await?,
        }
    }
}

/// Relays one challenge to the client and its answer to the server.
async fn relay_challenge(
    client: &mut Reader<Box<dyn Io>>,
    server: &mut Reader<Box<dyn Io>>,
    challenge: &Message,
) -> Result<(), PgError> {
    send(client, challenge).await?;
    let answer = client
        .next()
        .await?
        .ok_or_else(|| PgError::Protocol("the client left during login".into()))?;
    if answer.tag != b'p' {
        return Err(PgError::Protocol(format!(
            "expected a password message, got `{}`",
            answer.tag.escape_ascii()
        )));
    }
    server
        .get_mut()
        .write_all(&answer.to_bytes())
        .await
        .map_err(PgError::Io)
}

async fn send(client: &mut Reader<Box<dyn Io>>, msg: &Message) -> Result<(), PgError> {
    client
        .get_mut()
        .write_all(&msg.to_bytes())
        .await
        .map_err(PgError::Io)
}

fn mechanisms(mut body: &[u8]) -> Result<Vec<String>, PgError> {
    let mut out = Vec::new();
    while body.has_remaining() {
        let m = codec::cstr(&mut body)?;
        if m.is_empty() {
            break;
        }
        out.push(m);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use tokio::io::{duplex, AsyncReadExt};

    use super::*;

    /// A server that opens with `code` (3 cleartext, 5 MD5); returns the
    /// login's result and every byte the server was sent.
    async fn challenged(code: i32, weak_auth: bool) -> (Result<Login, PgError>, Vec<u8>) {
        let (client_side, _job) = duplex(1 << 16);
        let (server_side, mut fake_server) = duplex(1 << 16);
        let mut client = Reader::new(Box::new(client_side) as Box<dyn Io>, 1 << 20);
        let mut server = Reader::new(Box::new(server_side) as Box<dyn Io>, 1 << 20);
        let mut body = BytesMut::new();
        body.put_i32(code);
        if code == 5 {
            body.put_slice(&[1, 2, 3, 4]);
        }
        fake_server
            .write_all(&Message::new(b'R', body.freeze()).to_bytes())
            .await
            .unwrap();
        let cred = NodeCredential {
            user: "app",
            password: "node-secret-7f3a",
            weak_auth,
        };
        let result = tokio::time::timeout(
            std::time::Duration::from_millis(500),
            login(
                &mut client,
                &mut server,
                bytes::Bytes::from_static(b"startup"),
                Some(cred),
                false,
                None,
            ),
        )
        .await
        .unwrap_or_else(|_| Err(PgError::Upstream("still waiting for the server".into())));
        drop(server);
        let mut sent = Vec::new();
        fake_server.read_to_end(&mut sent).await.unwrap();
        (result, sent)
    }

    #[tokio::test]
    async fn the_node_secret_is_not_given_to_a_server_that_asks_for_it() {
        for code in [3, 5] {
            let (result, sent) = challenged(code, false).await;
            let err = result.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains("weak_auth"), "code {code}: {err}");
            assert_eq!(sent, b"startup", "code {code}: only the startup went out");
        }
        // Allowed explicitly: answered (cleartext carries the secret).
        let (_, sent) = challenged(3, true).await;
        assert!(
            sent.windows(16).any(|w| w == b"node-secret-7f3a"),
            "{sent:?}"
        );
        let (_, sent) = challenged(5, true).await;
        assert!(sent.len() > b"startup".len() && sent.windows(3).any(|w| w == b"md5"));
    }
}
