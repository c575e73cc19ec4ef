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
    let mut hs = Handshake {
        client,
        server,
        login: Login {
            mode: if credential.is_some() {
                "node-credential"
            } else {
                "relay"
            },
            method: "trust".into(),
            backslash_escapes: false,
        },
        scram: None,
    };
    loop {
        let msg = hs.server.next().await?.ok_or_else(|| {
            PgError::Upstream("the server closed the connection during login".into())
        })?;
        match msg.tag {
            b'R' => {
                hs.authentication(&msg, credential.as_ref(), client_tls, binding)
                    .await?
            }
            b'E' => {
                let fields = codec::error_fields(&msg.body);
                let text = fields
                    .iter()
                    .find(|(c, _)| *c == b'M')
                    .map(|(_, m)| m.clone())
                    .unwrap_or_default();
                send(hs.client, &msg).await?;
                return Err(PgError::LoginRefused(text));
            }
            b'Z' => {
                send(hs.client, &msg).await?;
                return Ok(hs.login);
            }
            b'S' => {
                if let Some(on) = super::backslash_escapes(&msg.body) {
                    hs.login.backslash_escapes = on;
                }
                send(hs.client, &msg).await?;
            }
            // BackendKeyData, notices, NegotiateProtocolVersion.
            _ => send(hs.client, &msg).await?,
        }
    }
}

/// Both ends of a login under way and what it has learnt so far.
struct Handshake<'a> {
    client: &'a mut Reader<Box<dyn Io>>,
    server: &'a mut Reader<Box<dyn Io>>,
    login: Login,
    /// The node's own SCRAM exchange, once the server has asked for it.
    scram: Option<ScramSha256>,
}

impl Handshake<'_> {
    /// One Authentication message: answered by the node with its
    /// credential, or relayed to the client.
    async fn authentication(
        &mut self,
        msg: &Message,
        credential: Option<&NodeCredential<'_>>,
        client_tls: bool,
        binding: Option<&[u8]>,
    ) -> Result<(), PgError> {
        let mut body = &msg.body[..];
        let code = codec::take_i32(&mut body)?;
        match (code, credential) {
            (0, _) => send(self.client, &codec::auth_ok()).await,
            (_, Some(c)) => self.answer(code, body, c, binding).await,
            (_, None) => self.relay(code, body, msg, client_tls).await,
        }
    }

    /// The node answers the server's challenge with its credential.
    async fn answer(
        &mut self,
        code: i32,
        body: &[u8],
        c: &NodeCredential<'_>,
        binding: Option<&[u8]>,
    ) -> Result<(), PgError> {
        match code {
            3 | 5 if !c.weak_auth => Err(refuse_weak(if code == 3 {
                "cleartext password"
            } else {
                "MD5"
            })),
            3 => {
                self.login.method = "password".into();
                let mut b = BytesMut::new();
                frontend::password_message(c.password.as_bytes(), &mut b).map_err(PgError::Io)?;
                self.write_server(&b).await
            }
            5 => {
                self.login.method = "md5".into();
                let mut body = body;
                let salt: [u8; 4] = codec::take_bytes(&mut body, 4)?
                    .try_into()
                    .map_err(|_| PgError::Protocol("MD5 salt".into()))?;
                let hash = md5_hash(c.user.as_bytes(), c.password.as_bytes(), salt);
                let mut b = BytesMut::new();
                frontend::password_message(hash.as_bytes(), &mut b).map_err(PgError::Io)?;
                self.write_server(&b).await
            }
            10 => self.scram_start(body, c, binding).await,
            11 => {
                let s = self
                    .scram
                    .as_mut()
                    .ok_or_else(|| PgError::Protocol("SASLContinue before SASL".into()))?;
                s.update(body)
                    .map_err(|e| PgError::Upstream(format!("SCRAM: {e}")))?;
                let mut b = BytesMut::new();
                frontend::sasl_response(s.message(), &mut b).map_err(PgError::Io)?;
                self.write_server(&b).await
            }
            12 => {
                // Verifies the server's signature: a server that
                // does not know the password is not logged in to.
                let s = self
                    .scram
                    .as_mut()
                    .ok_or_else(|| PgError::Protocol("SASLFinal before SASL".into()))?;
                s.finish(body)
                    .map_err(|e| PgError::Upstream(format!("SCRAM server proof: {e}")))
            }
            code => Err(unsupported(code)),
        }
    }

    /// SASL with the node's credential: the mechanism chosen (PLUS,
    /// bound to the server's certificate, when offered over TLS) and the
    /// first SCRAM message sent.
    async fn scram_start(
        &mut self,
        body: &[u8],
        c: &NodeCredential<'_>,
        binding: Option<&[u8]>,
    ) -> Result<(), PgError> {
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
        if !mechanisms
            .iter()
            .any(|m| m == SCRAM_SHA_256 || m == SCRAM_SHA_256_PLUS)
        {
            return Err(PgError::Upstream(format!(
                "the server offers no SCRAM mechanism the node speaks ({})",
                mechanisms.join(", ")
            )));
        }
        self.login.method = mechanism.into();
        let s = ScramSha256::new(c.password.as_bytes(), cb);
        let mut b = BytesMut::new();
        frontend::sasl_initial_response(mechanism, s.message(), &mut b).map_err(PgError::Io)?;
        self.write_server(&b).await?;
        self.scram = Some(s);
        Ok(())
    }

    /// No node credential: the challenge goes to the client and its
    /// answer back.
    async fn relay(
        &mut self,
        code: i32,
        body: &[u8],
        msg: &Message,
        client_tls: bool,
    ) -> Result<(), PgError> {
        match code {
            10 => {
                let mechanisms = mechanisms(body)?;
                self.login.method = SCRAM_SHA_256.into();
                if client_tls && mechanisms.iter().any(|m| m == SCRAM_SHA_256_PLUS) {
                    return Err(PgError::ChannelBinding);
                }
                let offer = offer_without_plus(&mechanisms);
                relay_challenge(self.client, self.server, &offer).await
            }
            3 | 5 | 11 | 12 => {
                if code == 3 {
                    self.login.method = "password".into();
                } else if code == 5 {
                    self.login.method = "md5".into();
                }
                if code == 12 {
                    send(self.client, msg).await
                } else {
                    relay_challenge(self.client, self.server, msg).await
                }
            }
            code => Err(unsupported(code)),
        }
    }

    /// Writes one of the node's own login messages to the server.
    async fn write_server(&mut self, b: &[u8]) -> Result<(), PgError> {
        self.server
            .get_mut()
            .write_all(b)
            .await
            .map_err(PgError::Io)
    }
}

/// A plaintext client cannot bind (and libpq refuses a PLUS offer
/// without TLS): it is offered what it can do, and answers `n`, which
/// the server takes.
fn offer_without_plus(mechanisms: &[String]) -> Message {
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
    Message::new(b'R', body.freeze())
}

/// An authentication method the node can neither answer nor relay.
fn unsupported(code: i32) -> PgError {
    PgError::Upstream(format!(
        "the server asks for an authentication method the node cannot take part in (code {code}: Kerberos, GSSAPI or SSPI)"
    ))
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
