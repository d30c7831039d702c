//! Who the caller is. For now only who they *claim* to be, read from the `authorization`
//! header exactly as the Milvus SDKs send it; verification comes with authentication.

pub mod authority;
pub mod identity;
pub mod password;
pub mod policy;

use base64::Engine;
use http::HeaderMap;

/// The user named by `authorization: base64("user:password")`. A token without a colon
/// (an API key) names no user. The password is never kept.
pub fn claimed_user(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(http::header::AUTHORIZATION)?.as_bytes();
    let decoded = base64::engine::general_purpose::STANDARD.decode(value).ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    let user = std::str::from_utf8(&decoded[..colon]).ok()?;
    (!user.is_empty()).then(|| user.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, value.parse().unwrap());
        h
    }

    #[test]
    fn user_comes_from_base64_user_colon_password() {
        // base64("alice:s3cr:et") — the password may itself contain colons.
        assert_eq!(claimed_user(&headers("YWxpY2U6czNjcjpldA==")).as_deref(), Some("alice"));
    }

    #[test]
    fn tokens_garbage_and_absence_name_nobody() {
        assert_eq!(claimed_user(&HeaderMap::new()), None);
        assert_eq!(claimed_user(&headers("dG9rZW4=")), None, "base64(token), no colon");
        assert_eq!(claimed_user(&headers("not base64!")), None);
        assert_eq!(claimed_user(&headers("OnB3")), None, "base64(':pw'), empty user");
    }
}
