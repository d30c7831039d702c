//! Reading the `authorization` header the way Milvus does, with Milvus's own refusals.

use base64::Engine;
use http::HeaderMap;

/// What the header says, before it is checked against the users table.
#[derive(PartialEq)]
pub enum Credential {
    Password {
        user: String,
        password: String,
    },
    /// `base64(token)` without a colon: an API key. The sidecar has none; refused.
    Token,
}

impl std::fmt::Debug for Credential {
    // Never print the password, even in a debug dump.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Password { user, .. } => write!(f, "Password {{ user: {user:?}, password: <redacted> }}"),
            Credential::Token => write!(f, "Token"),
        }
    }
}

/// Milvus's messages, so SDK users see the same thing through the sidecar.
pub const MISSING: &str = "missing authorization in header";
pub const BAD_PASSWORD: &str = "auth check failure, please check username and password are correct";
pub const BAD_API_KEY: &str = "auth check failure, please check api key is correct";
pub const BAD_FORMAT: &str = "invalid token format";

/// The credential in `headers`, or the message to refuse it with.
pub fn credential(headers: &HeaderMap) -> Result<Credential, &'static str> {
    let value = headers.get(http::header::AUTHORIZATION).ok_or(MISSING)?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(value.as_bytes()).map_err(|_| BAD_FORMAT)?;
    let text = String::from_utf8(decoded).map_err(|_| BAD_FORMAT)?;
    match text.split_once(':') {
        Some((user, password)) => Ok(Credential::Password { user: user.to_owned(), password: password.to_owned() }),
        None => Ok(Credential::Token),
    }
}

/// The database the `dbname` header names: Milvus's `default` when it is absent, empty or
/// not visible ASCII.
pub fn database(headers: &HeaderMap) -> &str {
    headers
        .get(crate::milvus::headers::DBNAME)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .unwrap_or(crate::facts::DEFAULT_DATABASE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, value.parse().unwrap());
        h
    }

    #[test]
    fn headers_read_like_milvus_reads_them() {
        assert_eq!(credential(&HeaderMap::new()), Err(MISSING));
        assert_eq!(credential(&with("***not base64***")), Err(BAD_FORMAT));
        assert_eq!(credential(&with("dG9rZW4=")), Ok(Credential::Token));
        assert_eq!(
            credential(&with("cm9vdDpNaWx2dXM=")),
            Ok(Credential::Password { user: "root".into(), password: "Milvus".into() })
        );
    }

    #[test]
    fn debug_output_hides_the_password() {
        let c = Credential::Password { user: "root".into(), password: "Milvus".into() };
        assert!(!format!("{c:?}").contains("Milvus"));
    }
}
