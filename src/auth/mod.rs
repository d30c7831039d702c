//! Who the caller is and what they may do: the `authorization` header read as the Milvus
//! SDKs send it (identity), password hashes, the permission rule (policy), and the cached
//! decisions the proxy asks for (authority).

pub mod authority;
pub mod identity;
pub mod password;
pub mod policy;

use http::HeaderMap;

/// The user named by `authorization: base64("user:password")`, before any check. A token
/// without a colon (an API key) names no user. The password is never kept.
pub fn claimed_user(headers: &HeaderMap) -> Option<String> {
    match identity::credential(headers) {
        Ok(identity::Credential::Password { user, .. }) if !user.is_empty() => Some(user),
        _ => None,
    }
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
