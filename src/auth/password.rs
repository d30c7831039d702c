//! Password hashes: argon2id in PHC string form (`$argon2id$v=19$m=...,t=...,p=...$salt$hash`),
//! the format `users.password_hash` holds. Hashing is deliberately slow (tens of ms): call
//! it off the request path (`spawn_blocking`), and cache successful verifications.

use argon2::Argon2;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};

/// A new argon2id hash of `password` with a random salt.
pub fn hash(password: &str) -> String {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 with default parameters hashes any password")
        .to_string()
}

/// A hash as a query parameter. tokio-postgres logs every parameter at debug level, and
/// a hash in a log line is a password away from anyone who can guess it offline (the
/// default `Milvus`, a weak initial one): this one shows itself as `<password hash>`.
pub struct HashParam<'a>(pub &'a str);

impl std::fmt::Debug for HashParam<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<password hash>")
    }
}

impl tokio_postgres::types::ToSql for HashParam<'_> {
    fn to_sql(
        &self,
        ty: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        self.0.to_sql(ty, out)
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        <&str as tokio_postgres::types::ToSql>::accepts(ty)
    }

    tokio_postgres::types::to_sql_checked!();
}

/// Whether `password` matches `phc`. A malformed stored hash matches nothing.
pub fn verify(phc: &str, password: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_argon2id_salted_and_verify() {
        let a = hash("Milvus");
        let b = hash("Milvus");
        assert!(a.starts_with("$argon2id$"), "{a}");
        assert_ne!(a, b, "a random salt each time");
        assert!(verify(&a, "Milvus"));
        assert!(!verify(&a, "milvus"));
        assert!(!verify("not a phc string", "Milvus"));
    }

    #[test]
    fn a_hash_parameter_does_not_show_itself() {
        let h = hash("Milvus");
        assert_eq!(format!("{:?}", [HashParam(&h)]), "[<password hash>]");
    }
}
