//! Login, roles, CSRF and API tokens, end to end: the real console binary
//! against an OIDC provider stand-in (discovery, JWKS, authorize, token;
//! ID tokens signed with keys made at test time), driven by a small HTTP
//! client that keeps cookies as a browser does. Everything is on loopback.
use std::{
    collections::HashMap,
    io::Read,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use axum::{
    extract::{Query, State},
    http::{header, HeaderMap, StatusCode, Uri},
    response::{IntoResponse, Response},
    routing::{get, post},
    Form, Json, Router,
};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD as B64, Engine};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey};
use num_bigint::BigUint;
use ring::{
    rand::{SecureRandom, SystemRandom},
    signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING},
};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_sluice-console");
const CLIENT_ID: &str = "sluice-console";

// ---- keys, made at test time ------------------------------------------

#[derive(Clone)]
struct Key {
    alg: Algorithm,
    kid: String,
    enc: EncodingKey,
    jwk: Value,
}

fn es256(kid: &str) -> Key {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let kp =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    // Uncompressed point: 0x04 || x || y.
    let pk = kp.public_key().as_ref();
    Key {
        alg: Algorithm::ES256,
        kid: kid.into(),
        enc: EncodingKey::from_ec_der(pkcs8.as_ref()),
        jwk: json!({"kty": "EC", "crv": "P-256", "x": B64.encode(&pk[1..33]),
                    "y": B64.encode(&pk[33..65]), "kid": kid, "alg": "ES256", "use": "sig"}),
    }
}

fn random_big(bytes: usize) -> BigUint {
    let mut b = vec![0u8; bytes];
    SystemRandom::new().fill(&mut b).unwrap();
    BigUint::from_bytes_be(&b)
}

fn probably_prime(n: &BigUint) -> bool {
    let one = BigUint::from(1u32);
    let two = BigUint::from(2u32);
    for p in [
        3u32, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71,
    ] {
        if (n % p) == BigUint::from(0u32) {
            return false;
        }
    }
    let n1 = n - &one;
    let s = n1.trailing_zeros().unwrap_or(0);
    let d = &n1 >> s;
    'rounds: for _ in 0..24 {
        let a = random_big(128) % (n - BigUint::from(3u32)) + &two;
        let mut x = a.modpow(&d, n);
        if x == one || x == n1 {
            continue;
        }
        for _ in 1..s {
            x = x.modpow(&two, n);
            if x == n1 {
                continue 'rounds;
            }
        }
        return false;
    }
    true
}

fn prime_1024() -> BigUint {
    loop {
        let mut b = vec![0u8; 128];
        SystemRandom::new().fill(&mut b).unwrap();
        // Top two bits set (the product has 2048 bits), odd.
        b[0] |= 0xC0;
        b[127] |= 1;
        let c = BigUint::from_bytes_be(&b);
        if probably_prime(&c) {
            return c;
        }
    }
}

fn der_len(n: usize) -> Vec<u8> {
    if n < 128 {
        return vec![n as u8];
    }
    let b: Vec<u8> = n
        .to_be_bytes()
        .into_iter()
        .skip_while(|x| *x == 0)
        .collect();
    let mut out = vec![0x80 | b.len() as u8];
    out.extend(b);
    out
}

fn der_int(v: &BigUint) -> Vec<u8> {
    let mut b = v.to_bytes_be();
    if b[0] & 0x80 != 0 {
        b.insert(0, 0);
    }
    let mut out = vec![0x02];
    out.extend(der_len(b.len()));
    out.extend(b);
    out
}

/// A 2048-bit RSA key (PKCS#1 DER for signing, a JWK for the JWKS). Made
/// once per test run: finding primes takes a moment.
fn rs256(kid: &str) -> Key {
    static PAIR: OnceLock<(Vec<u8>, Vec<u8>, Vec<u8>)> = OnceLock::new();
    let (der, n, e) = PAIR.get_or_init(|| {
        let one = BigUint::from(1u32);
        let e = BigUint::from(65537u32);
        loop {
            let (a, b) = (prime_1024(), prime_1024());
            if a == b {
                continue;
            }
            let (p, q) = if a > b { (a, b) } else { (b, a) };
            let phi = (&p - &one) * (&q - &one);
            let Some(d) = e.modinv(&phi) else { continue };
            let n = &p * &q;
            let dp = &d % (&p - &one);
            let dq = &d % (&q - &one);
            let qinv = q.modinv(&p).unwrap();
            let mut body = der_int(&BigUint::from(0u32));
            for v in [&n, &e, &d, &p, &q, &dp, &dq, &qinv] {
                body.extend(der_int(v));
            }
            let mut der = vec![0x30];
            der.extend(der_len(body.len()));
            der.extend(body);
            return (der, n.to_bytes_be(), e.to_bytes_be());
        }
    });
    Key {
        alg: Algorithm::RS256,
        kid: kid.into(),
        enc: EncodingKey::from_rsa_der(der),
        jwk: json!({"kty": "RSA", "n": B64.encode(n), "e": B64.encode(e), "kid": kid,
                    "alg": "RS256", "use": "sig"}),
    }
}

// ---- the OIDC provider stand-in ---------------------------------------

#[derive(Clone, Copy, PartialEq, Debug)]
enum Fault {
    None,
    BadSignature,
    WrongAudience,
    WrongNonce,
    Expired,
    WrongIssuer,
}

struct Grant {
    redirect_uri: String,
    nonce: String,
    challenge: String,
    user: String,
    groups: Vec<String>,
}

struct IdpState {
    issuer: String,
    secret: String,
    /// Published keys; the first signs.
    keys: Vec<Key>,
    user: String,
    groups: Vec<String>,
    fault: Fault,
    codes: HashMap<String, Grant>,
}

#[derive(Clone)]
struct Idp {
    url: String,
    st: Arc<Mutex<IdpState>>,
}

impl Idp {
    async fn start(signing: Key) -> Idp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let other = es256("other-key");
        let st = Arc::new(Mutex::new(IdpState {
            issuer: url.clone(),
            secret: hex::encode(random_big(16).to_bytes_be()),
            keys: vec![signing, other],
            user: "alice".into(),
            groups: vec!["staff".into()],
            fault: Fault::None,
            codes: HashMap::new(),
        }));
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(jwks))
            .route("/authorize", get(authorize))
            .route("/token", post(token))
            .with_state(st.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Idp { url, st }
    }

    fn next_login(&self, user: &str, groups: &[&str], fault: Fault) {
        let mut s = self.st.lock().unwrap();
        s.user = user.into();
        s.groups = groups.iter().map(|g| g.to_string()).collect();
        s.fault = fault;
    }

    fn secret(&self) -> String {
        self.st.lock().unwrap().secret.clone()
    }
}

type Shared = State<Arc<Mutex<IdpState>>>;

async fn discovery(State(st): Shared) -> Json<Value> {
    let i = st.lock().unwrap().issuer.clone();
    Json(json!({
        "issuer": i,
        "authorization_endpoint": format!("{i}/authorize"),
        "token_endpoint": format!("{i}/token"),
        "jwks_uri": format!("{i}/jwks"),
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256", "ES256"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic"],
    }))
}

async fn jwks(State(st): Shared) -> Json<Value> {
    let mut keys: Vec<Value> = st
        .lock()
        .unwrap()
        .keys
        .iter()
        .map(|k| k.jwk.clone())
        .collect();
    // A key of a kind the console does not know must not spoil the rest.
    keys.push(json!({"kty": "AKP", "alg": "ML-DSA-44", "pub": "AAAA", "kid": "pq"}));
    Json(json!({ "keys": keys }))
}

fn bad(why: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": "invalid_request", "error_description": why})),
    )
        .into_response()
}

async fn authorize(State(st): Shared, Query(q): Query<HashMap<String, String>>) -> Response {
    let p = |k: &str| q.get(k).cloned().unwrap_or_default();
    if p("response_type") != "code" || p("client_id") != CLIENT_ID {
        return bad("response_type or client_id");
    }
    if p("code_challenge_method") != "S256" || p("code_challenge").len() != 43 {
        return bad("PKCE S256 is required");
    }
    if !p("scope").split(' ').any(|s| s == "openid")
        || p("state").is_empty()
        || p("nonce").is_empty()
    {
        return bad("scope, state or nonce");
    }
    let code = hex::encode(random_big(16).to_bytes_be());
    let mut s = st.lock().unwrap();
    let grant = Grant {
        redirect_uri: p("redirect_uri"),
        nonce: p("nonce"),
        challenge: p("code_challenge"),
        user: s.user.clone(),
        groups: s.groups.clone(),
    };
    s.codes.insert(code.clone(), grant);
    let q = serde_urlencoded::to_string([("code", code), ("state", p("state"))]).unwrap();
    (
        StatusCode::SEE_OTHER,
        [(header::LOCATION, format!("{}?{q}", p("redirect_uri")))],
    )
        .into_response()
}

async fn token(
    State(st): Shared,
    headers: HeaderMap,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    let p = |k: &str| f.get(k).cloned().unwrap_or_default();
    let mut s = st.lock().unwrap();
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{CLIENT_ID}:{}", s.secret))
    );
    if headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        != Some(basic.as_str())
    {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "invalid_client"})),
        )
            .into_response();
    }
    if p("grant_type") != "authorization_code" || p("client_id") != CLIENT_ID {
        return bad("grant_type or client_id");
    }
    let Some(g) = s.codes.remove(&p("code")) else {
        return bad("unknown code");
    };
    let digest = ring::digest::digest(&ring::digest::SHA256, p("code_verifier").as_bytes());
    if B64.encode(digest.as_ref()) != g.challenge {
        return bad("PKCE verifier does not match the challenge");
    }
    if p("redirect_uri") != g.redirect_uri {
        return bad("redirect_uri differs");
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let fault = s.fault;
    let claims = json!({
        "iss": if fault == Fault::WrongIssuer { "http://127.0.0.1:1".to_string() } else { s.issuer.clone() },
        "sub": format!("sub-{}", g.user),
        "aud": if fault == Fault::WrongAudience { "another-client" } else { CLIENT_ID },
        "exp": if fault == Fault::Expired { now - 3600 } else { now + 300 },
        "iat": if fault == Fault::Expired { now - 7200 } else { now },
        "nonce": if fault == Fault::WrongNonce { "not-this-login".to_string() } else { g.nonce },
        "preferred_username": g.user,
        "groups": g.groups,
    });
    let key = &s.keys[0];
    let mut h = jsonwebtoken::Header::new(key.alg);
    h.kid = Some(key.kid.clone());
    let mut id_token = jsonwebtoken::encode(&h, &claims, &key.enc).unwrap();
    if fault == Fault::BadSignature {
        // A signed token whose claims were changed afterwards.
        let mut forged = claims.clone();
        forged["preferred_username"] = json!("root");
        let parts: Vec<&str> = id_token.split('.').collect();
        id_token = format!(
            "{}.{}.{}",
            parts[0],
            B64.encode(forged.to_string()),
            parts[2]
        );
    }
    Json(json!({"access_token": "opaque", "token_type": "Bearer", "expires_in": 300, "id_token": id_token}))
        .into_response()
}

// ---- the console under test -------------------------------------------

struct Console {
    base: String,
    /// Origin of the redirect URL (differs from `base` when https).
    redirect_origin: String,
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Console {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn write_private(path: &PathBuf, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// `tokens`: lines for the API tokens file, if any. `https_redirect`:
/// the console's external URL is https (cookies `Secure`, `__Host-`).
async fn console(idp: &Idp, tokens: Option<&str>, https_redirect: bool) -> Console {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let redirect_origin = if https_redirect {
        "https://console.example".to_string()
    } else {
        base.clone()
    };
    let secret = dir.path().join("client-secret");
    write_private(&secret, &format!("{}\n", idp.secret()));
    let mut cmd = Command::new(BIN);
    cmd.args([
        "run",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--nats",
        "nats://127.0.0.1:1",
    ])
    .arg("--state-dir")
    .arg(dir.path().join("state"))
    .args(["--oidc-issuer", &idp.url, "--oidc-client-id", CLIENT_ID])
    .arg("--oidc-client-secret-file")
    .arg(&secret)
    .args([
        "--oidc-redirect-url",
        &format!("{redirect_origin}/auth/callback"),
    ])
    .args([
        "--role-group",
        "viewer=staff",
        "--role-group",
        "approver=oncall",
    ])
    .args(["--role-group", "admin=security"]);
    if let Some(t) = tokens {
        let f = dir.path().join("tokens");
        write_private(&f, t);
        cmd.arg("--api-tokens-file").arg(&f);
    }
    let log = std::fs::File::create(dir.path().join("console.log")).unwrap();
    cmd.stdout(log.try_clone().unwrap())
        .stderr(log)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    let child = cmd.spawn().unwrap();
    let mut c = Console {
        base,
        redirect_origin,
        child,
        dir,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(st)) = c.child.try_wait() {
            panic!("console exited ({st}):\n{}", c.log());
        }
        if Browser::default()
            .try_get(&format!("{}/healthz", c.base))
            .await
            .is_some()
        {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "console did not come up:\n{}",
            c.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---- a browser-like client: cookies, no script, redirects by hand ----

struct Resp {
    status: u16,
    headers: HeaderMap,
    body: String,
}

impl Resp {
    fn location(&self) -> String {
        self.headers
            .get(header::LOCATION)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_else(|| panic!("no Location ({}): {}", self.status, self.body))
    }
    fn set_cookie(&self, name: &str) -> Option<String> {
        self.headers
            .get_all(header::SET_COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .find(|c| c.starts_with(&format!("{name}=")))
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|_| panic!("not JSON: {}", self.body))
    }
}

#[derive(Default)]
struct Browser {
    jar: HashMap<String, String>,
}

impl Browser {
    async fn try_send(
        &mut self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Option<Resp> {
        let uri: Uri = url.parse().unwrap();
        let addr = format!("{}:{}", uri.host().unwrap(), uri.port_u16().unwrap_or(80));
        let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .ok()?;
        tokio::spawn(conn);
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"));
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            req = req.header(header::HOST, uri.authority().unwrap().as_str());
        }
        if !self.jar.is_empty() {
            let c: Vec<String> = self.jar.iter().map(|(k, v)| format!("{k}={v}")).collect();
            req = req.header(header::COOKIE, c.join("; "));
        }
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(hyper::body::Bytes::from(
                body.unwrap_or("").to_string(),
            )))
            .unwrap();
        let resp = tx.send_request(req).await.ok()?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        for c in headers.get_all(header::SET_COOKIE) {
            let c = c.to_str().unwrap();
            let (nv, attrs) = c.split_once(';').unwrap_or((c, ""));
            let (n, v) = nv.split_once('=').unwrap();
            if attrs.contains("Max-Age=0") {
                self.jar.remove(n);
            } else {
                self.jar.insert(n.to_string(), v.to_string());
            }
        }
        Some(Resp {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    async fn try_get(&mut self, url: &str) -> Option<Resp> {
        self.try_send("GET", url, &[], None).await
    }

    async fn get(&mut self, url: &str) -> Resp {
        self.try_send("GET", url, &[], None).await.expect(url)
    }

    async fn post(&mut self, url: &str, headers: &[(&str, &str)], body: &str) -> Resp {
        self.try_send("POST", url, headers, Some(body))
            .await
            .expect(url)
    }

    /// Up to the identity provider's redirect back: the callback URL, on
    /// the console's own address.
    async fn authorize(&mut self, c: &Console, idp: &Idp, next: &str) -> String {
        let q = serde_urlencoded::to_string([("next", next)]).unwrap();
        let r = self.get(&format!("{}/auth/login?{q}", c.base)).await;
        assert_eq!(r.status, 303, "{}", r.body);
        let authz = r.location();
        assert!(
            authz.starts_with(&format!("{}/authorize?", idp.url)),
            "{authz}"
        );
        let r = self.get(&authz).await;
        assert_eq!(r.status, 303, "the stand-in refused: {}", r.body);
        let cb = r.location();
        let cb = cb
            .strip_prefix(&c.redirect_origin)
            .unwrap_or_else(|| panic!("callback to {cb}"));
        format!("{}{cb}", c.base)
    }

    /// A whole login; the console's answer to the callback.
    async fn login(&mut self, c: &Console, idp: &Idp, next: &str) -> Resp {
        let cb = self.authorize(c, idp, next).await;
        self.get(&cb).await
    }
}

fn csrf_of(page: &str) -> String {
    let at = page
        .find("name=\"csrf\" value=\"")
        .expect("a logout form with its CSRF token")
        + 19;
    page[at..at + 64].to_string()
}

// ---- the tests ----------------------------------------------------------

#[tokio::test]
async fn viewer_logs_in_sees_who_and_cannot_change_what_a_viewer_may_not() {
    let idp = Idp::start(es256("k1")).await;
    let c = console(&idp, None, false).await;
    let mut b = Browser::default();

    // Not logged in: the API says 401, pages go to the login.
    let r = b.get(&format!("{}/api/sessions", c.base)).await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.json()["error"], "log in first");
    let r = b.get(&format!("{}/sessions?node=a", c.base)).await;
    assert_eq!(r.status, 303);
    assert_eq!(r.location(), "/auth/login?next=%2Fsessions%3Fnode%3Da");

    idp.next_login("alice", &["staff", "unrelated"], Fault::None);
    let r = b.login(&c, &idp, "/sessions?node=a").await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(r.location(), "/sessions?node=a");
    let cookie = r.set_cookie("sluice_session").expect("a session cookie");
    for attr in ["HttpOnly", "SameSite=Lax", "Path=/"] {
        assert!(cookie.contains(attr), "{cookie}");
    }
    assert!(!cookie.contains("Secure"), "http console: {cookie}");

    let r = b.get(&format!("{}/sessions", c.base)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("alice · viewer"), "{}", r.body);
    assert!(r.body.contains("action=\"/auth/logout\""), "{}", r.body);
    assert_eq!(r.headers[header::CACHE_CONTROL], "no-store");
    let csrf = csrf_of(&r.body);
    let r = b.get(&format!("{}/api/whoami", c.base)).await;
    assert_eq!(
        r.json(),
        json!({"name": "alice", "role": "viewer", "via": "session", "csrf": csrf})
    );

    let check = format!("{}/api/whoami/check", c.base);
    // The right token and role: allowed (so the refusals below are about
    // what they change).
    let r = b
        .post(&check, &[], &format!("role=viewer&csrf={csrf}"))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // A viewer asking for what needs an approver.
    let r = b
        .post(&check, &[], &format!("role=approver&csrf={csrf}"))
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("needs the approver role"), "{}", r.body);
    // No CSRF token, a wrong one, or none and no form at all.
    for body in ["role=viewer", "role=viewer&csrf=0000", ""] {
        let r = b.post(&check, &[], body).await;
        assert_eq!(r.status, 403, "{body:?}: {}", r.body);
        assert!(
            r.body.contains("CSRF token is missing or stale"),
            "{}",
            r.body
        );
    }
    // The token in a header, as an API client with cookies sends it.
    let r = b
        .post(&check, &[("x-csrf-token", &csrf)], "role=viewer")
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Cross-site, even with the right token.
    let good = format!("role=viewer&csrf={csrf}");
    for h in [
        ("origin", "https://evil.example"),
        ("origin", "null"),
        ("sec-fetch-site", "cross-site"),
        ("sec-fetch-site", "same-site"),
    ] {
        let r = b.post(&check, &[h], &good).await;
        assert_eq!(r.status, 403, "{h:?}: {}", r.body);
        assert!(r.body.contains("cross-site"), "{}", r.body);
    }
    let r = b
        .post(
            &check,
            &[("origin", &c.base), ("sec-fetch-site", "same-origin")],
            &good,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);

    // Logout is a state change too.
    let logout = format!("{}/auth/logout", c.base);
    let r = b.post(&logout, &[], "").await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(b.get(&format!("{}/api/whoami", c.base)).await.status, 200);
    let old = b.jar.clone();
    let r = b.post(&logout, &[], &format!("csrf={csrf}")).await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(r.location(), "/auth/logged-out");
    assert_eq!(b.get(&format!("{}/api/whoami", c.base)).await.status, 401);
    // The old cookie is dead on the server, not only forgotten here.
    b.jar = old;
    assert_eq!(b.get(&format!("{}/api/whoami", c.base)).await.status, 401);
}

#[tokio::test]
async fn roles_come_from_groups_and_unmapped_people_are_refused() {
    let idp = Idp::start(es256("k1")).await;
    let c = console(&idp, None, false).await;

    let mut b = Browser::default();
    idp.next_login("mallory", &["contractors"], Fault::None);
    let r = b.login(&c, &idp, "/").await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(
        r.body
            .contains("mallory is in no group that this console maps to a role"),
        "{}",
        r.body
    );
    assert!(r.body.contains("contractors"), "{}", r.body);
    assert!(r.set_cookie("sluice_session").is_none());
    assert_eq!(b.get(&format!("{}/api/whoami", c.base)).await.status, 401);

    // The highest role that applies.
    let mut b = Browser::default();
    idp.next_login("olga", &["staff", "oncall"], Fault::None);
    assert_eq!(b.login(&c, &idp, "/").await.status, 303);
    let r = b.get(&format!("{}/nodes", c.base)).await;
    assert!(r.body.contains("olga · approver"), "{}", r.body);
    let csrf = csrf_of(&r.body);
    let check = format!("{}/api/whoami/check", c.base);
    assert_eq!(
        b.post(&check, &[], &format!("role=approver&csrf={csrf}"))
            .await
            .status,
        200
    );
    assert_eq!(
        b.post(&check, &[], &format!("role=admin&csrf={csrf}"))
            .await
            .status,
        403
    );
}

#[tokio::test]
async fn bad_id_tokens_fail_the_login_with_a_clear_message() {
    // RSA here (ES256 in the other tests).
    let idp = Idp::start(rs256("rsa-1")).await;
    let c = console(&idp, None, false).await;
    for (fault, says) in [
        (Fault::BadSignature, "signature does not verify"),
        (Fault::WrongAudience, "issued for another client"),
        (Fault::WrongNonce, "nonce mismatch"),
        (Fault::Expired, "has expired"),
        (Fault::WrongIssuer, "issued by another issuer"),
    ] {
        let mut b = Browser::default();
        idp.next_login("alice", &["security"], fault);
        let r = b.login(&c, &idp, "/").await;
        assert_eq!(r.status, 401, "{fault:?}: {}", r.body);
        assert!(r.body.contains(says), "{fault:?}: {}", r.body);
        assert!(r.set_cookie("sluice_session").is_none(), "{fault:?}");
        assert_eq!(
            b.get(&format!("{}/api/whoami", c.base)).await.status,
            401,
            "{fault:?}"
        );
    }
    // The same provider, a good token: in.
    let mut b = Browser::default();
    idp.next_login("alice", &["security"], Fault::None);
    assert_eq!(b.login(&c, &idp, "/").await.status, 303);
    let r = b.get(&format!("{}/api/whoami", c.base)).await;
    assert_eq!(r.json()["role"], "admin");
}

#[tokio::test]
async fn no_open_redirect_no_replayed_or_transplanted_callback() {
    let idp = Idp::start(es256("k1")).await;
    let c = console(&idp, None, false).await;
    idp.next_login("alice", &["staff"], Fault::None);
    for next in [
        "https://evil.example/",
        "//evil.example/",
        "/\\evil.example",
        "javascript:alert(1)",
    ] {
        let mut b = Browser::default();
        let r = b.login(&c, &idp, next).await;
        assert_eq!(r.status, 303, "{next}: {}", r.body);
        assert_eq!(r.location(), "/", "{next}");
    }

    // A callback is good once.
    let mut b = Browser::default();
    let cb = b.authorize(&c, &idp, "/nodes").await;
    assert_eq!(b.get(&cb).await.location(), "/nodes");
    let r = Browser::default().get(&cb).await;
    assert_eq!(r.status, 401);
    assert!(
        r.body.contains("unknown, already used or expired"),
        "{}",
        r.body
    );

    // A callback from a login started in another browser (an attacker's
    // own login, handed to a victim) does not log the victim in.
    let mut attacker = Browser::default();
    let cb = attacker.authorize(&c, &idp, "/").await;
    let mut victim = Browser::default();
    let r = victim.get(&cb).await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(r.body.contains("started in another browser"), "{}", r.body);
    assert!(victim.jar.is_empty(), "{:?}", victim.jar);
}

#[tokio::test]
async fn https_console_cookies_are_secure_host_only() {
    let idp = Idp::start(es256("k1")).await;
    let c = console(&idp, None, true).await;
    let mut b = Browser::default();
    let r = b.get(&format!("{}/auth/login", c.base)).await;
    let login = r.set_cookie("__Host-sluice_login").expect("a login cookie");
    assert!(
        login.contains("; Secure") && login.contains("HttpOnly"),
        "{login}"
    );
    idp.next_login("alice", &["staff"], Fault::None);
    let r = b.login(&c, &idp, "/nodes").await;
    let s = r
        .set_cookie("__Host-sluice_session")
        .expect("a session cookie");
    for attr in ["Secure", "HttpOnly", "SameSite=Lax", "Path=/"] {
        assert!(s.contains(attr), "{s}");
    }
    let r = b.get(&format!("{}/nodes", c.base)).await;
    assert!(r.body.contains("alice · viewer"), "{}", r.body);
    let csrf = csrf_of(&r.body);
    // Our origin is the external one.
    let check = format!("{}/api/whoami/check", c.base);
    let good = format!("role=viewer&csrf={csrf}");
    assert_eq!(
        b.post(&check, &[("origin", "https://console.example")], &good)
            .await
            .status,
        200
    );
    assert_eq!(
        b.post(&check, &[("origin", &c.base)], &good).await.status,
        403
    );
}

fn new_token(role: &str, name: &str) -> (String, String) {
    let out = Command::new(BIN)
        .args(["token", "new", "--role", role, "--name", name])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let token = lines
        .iter()
        .find(|l| l.starts_with("sluice_"))
        .expect("a token")
        .to_string();
    let line = lines
        .iter()
        .find(|l| l.starts_with(&format!("{role} {name} ")))
        .expect("a file line")
        .to_string();
    assert!(!line.contains(&token), "the file line holds only a hash");
    (token, line)
}

#[tokio::test]
async fn api_tokens_carry_their_role_and_nothing_else_passes() {
    let (approver, line) = new_token("approver", "ci-bot");
    let (viewer, vline) = new_token("viewer", "dashboards");
    let idp = Idp::start(es256("k1")).await;
    let c = console(
        &idp,
        Some(&format!("# automation\n{line}\n{vline}\n")),
        false,
    )
    .await;
    let mut b = Browser::default();
    let bearer = format!("Bearer {approver}");
    let check = format!("{}/api/whoami/check", c.base);

    let r = b
        .try_send(
            "GET",
            &format!("{}/api/sessions", c.base),
            &[("authorization", &bearer)],
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    // No CSRF token needed: nothing ambient to forge with.
    let r = b
        .post(&check, &[("authorization", &bearer)], "role=approver")
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["name"], "token:ci-bot");
    let r = b
        .post(&check, &[("authorization", &bearer)], "role=admin")
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    let vb = format!("Bearer {viewer}");
    assert_eq!(
        b.post(&check, &[("authorization", &vb)], "role=approver")
            .await
            .status,
        403
    );

    for wrong in [
        format!("Bearer {approver}0"),
        "Bearer ".into(),
        format!("Basic {approver}"),
    ] {
        let r = b
            .try_send(
                "GET",
                &format!("{}/api/sessions", c.base),
                &[("authorization", &wrong)],
                None,
            )
            .await
            .unwrap();
        assert_eq!(r.status, 401, "{wrong}: {}", r.body);
        assert_eq!(r.json()["error"], "the API token is not valid");
        let r = b
            .post(&check, &[("authorization", &wrong)], "role=viewer")
            .await;
        assert_eq!(r.status, 401, "{wrong}: {}", r.body);
    }
}

/// Runs the console expecting it to refuse to start; its stderr.
fn refused(args: &[&str], extra: impl FnOnce(&mut Command)) -> String {
    let mut cmd = Command::new(BIN);
    cmd.args(args).stdout(Stdio::null()).stderr(Stdio::piped());
    extra(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the console started with {args:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!child.wait().unwrap().success());
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn unsafe_configurations_are_refused_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let state = state.to_str().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "").unwrap();
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o644)).unwrap();
    let oidc = [
        "run",
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        state,
        "--nats",
        "nats://127.0.0.1:1",
        "--oidc-issuer",
        "http://127.0.0.1:1",
        "--oidc-client-id",
        CLIENT_ID,
        "--oidc-redirect-url",
        "http://127.0.0.1:8470/auth/callback",
        "--role-group",
        "viewer=staff",
    ];
    let clean = |c: &mut Command| {
        c.env_remove("SLUICE_CONSOLE_ROLE_GROUPS");
    };

    let err = refused(
        &[&oidc[..], &["--api-tokens-file", tokens.to_str().unwrap()]].concat(),
        clean,
    );
    assert!(
        err.contains("readable or writable by group or others"),
        "{err}"
    );

    let mut args = oidc.to_vec();
    args[8] = "http://idp.example";
    let err = refused(&args, clean);
    assert!(
        err.contains("plain http is allowed to loopback only"),
        "{err}"
    );

    let mut args = oidc.to_vec();
    args[12] = "http://console.example/auth/callback";
    let err = refused(&args, clean);
    assert!(err.contains("--oidc-redirect-url"), "{err}");

    let err = refused(&oidc[..13], clean);
    assert!(err.contains("no --role-group"), "{err}");

    // No login: loopback only.
    let err = refused(
        &[
            "run",
            "--listen",
            "0.0.0.0:0",
            "--state-dir",
            state,
            "--nats",
            "nats://127.0.0.1:1",
        ],
        clean,
    );
    assert!(err.contains("not a loopback address"), "{err}");
    let err = refused(
        &[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            state,
            "--role-group",
            "viewer=x",
        ],
        clean,
    );
    assert!(err.contains("need --oidc-issuer"), "{err}");
}

#[tokio::test]
async fn local_mode_is_admin_on_loopback_names_only() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let log = std::fs::File::create(dir.path().join("console.log")).unwrap();
    let child = Command::new(BIN)
        .args([
            "run",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--nats",
            "nats://127.0.0.1:1",
        ])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env_remove("SLUICE_CONSOLE_OIDC_ISSUER")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let c = Console {
        base: format!("http://127.0.0.1:{port}"),
        redirect_origin: String::new(),
        child,
        dir,
    };
    let mut b = Browser::default();
    let deadline = Instant::now() + Duration::from_secs(20);
    let r = loop {
        if let Some(r) = b.try_get(&format!("{}/sessions", c.base)).await {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "console did not come up:\n{}",
            c.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("local · admin"), "{}", r.body);
    assert!(
        !r.body.contains("/auth/logout"),
        "no session, no logout: {}",
        r.body
    );
    // A page on another site whose name now points at 127.0.0.1.
    let r = b
        .try_send(
            "GET",
            &format!("{}/sessions", c.base),
            &[("host", "rebound.example")],
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 403, "{}", r.body);
}

// ---- a real browser: Debian's Chromium through the whole login ---------

/// Runs `tests/fixtures/browser.py` (Chromium headless over WebDriver) off
/// the runtime, so the provider stand-in keeps answering meanwhile.
async fn chromium(steps: Vec<String>) -> Vec<Value> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(format!("{root}/tests/fixtures/browser.py"))
            .arg("--shots")
            .arg(format!("{root}/target/e2e-artifacts/console-login"))
            .args(&steps)
            .output()
            .expect("run the browser (chromium, chromium-driver and selenium come from scripts/setup.sh)")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "browser: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn a_real_browser_logs_in_through_the_provider_and_gets_its_role() {
    let idp = Idp::start(es256("k1")).await;
    let c = console(&idp, None, false).await;

    // A viewer: the page asked for, through the provider and back, with
    // who and the role in the header and no suspend form; a request the
    // page's own script makes with its cookies and CSRF token is refused.
    idp.next_login("vera", &["staff"], Fault::None);
    let steps = vec![
        format!("open:{}/identities", c.base),
        "shot:login-viewer-identities".into(),
        r#"js:fetch('/api/whoami').then(r => r.json()).then(w => fetch('/identities/suspend', {method: 'POST', headers: {'content-type': 'application/x-www-form-urlencoded'}, body: 'csrf=' + w.csrf + '&scope=repository&value=acme%2Fwidgets&reason=x'})).then(r => done(r.status), e => done(String(e)))"#.into(),
        "click:form#logout button".into(),
    ];
    let s = chromium(steps).await;
    assert_eq!(s[0]["url"], format!("{}/identities", c.base), "{s:#?}");
    let page = s[0]["text"].as_str().unwrap();
    assert!(page.contains("vera · viewer"), "{page}");
    assert!(!page.contains("Suspend on every node"), "{page}");
    assert_eq!(s[1]["js"], 403, "a viewer's suspend: {s:#?}");
    // Logged out: the header no longer names her.
    assert!(
        !s[2]["text"].as_str().unwrap().contains("vera · viewer"),
        "{s:#?}"
    );

    // An admin (another person, another browser profile): the same page
    // offers the suspend form, and the console's audit names them.
    idp.next_login("sam", &["security"], Fault::None);
    let s = chromium(vec![
        format!("open:{}/identities", c.base),
        "wait:form#suspend".into(),
        "shot:login-admin-identities".into(),
    ])
    .await;
    let page = s[0]["text"].as_str().unwrap();
    assert!(page.contains("sam · admin"), "{page}");
    assert!(page.contains("Suspend on every node"), "{page}");

    // A person the groups do not map is told so by the console, in the
    // browser, and gets no session.
    idp.next_login("mallory", &["contractors"], Fault::None);
    let s = chromium(vec![format!("open:{}/identities", c.base)]).await;
    let page = s[0]["text"].as_str().unwrap();
    assert!(!page.contains("mallory ·"), "{page}");
    assert!(
        page.contains("mallory is in no group that this console maps to a role"),
        "the refusal says why: {page}"
    );
}
