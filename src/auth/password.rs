//! Password hashes: argon2id in PHC string form (`$argon2id$v=19$m=...,t=...,p=...$salt$hash`),
//! the format `users.password_hash` holds. Hashing is deliberately slow (tens of ms): call
//! it off the request path (`spawn_blocking`), and cache successful verifications.

use argon2::Argon2;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};

/// A new argon2id hash of `password` with a random salt.
pub fn hash(password: &str) -> String {
    return_large_blocks();
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 with default parameters hashes any password")
        .to_string()
}

/// Whether `password` matches `phc`. A malformed stored hash matches nothing.
pub fn verify(phc: &str, password: &str) -> bool {
    return_large_blocks();
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok(),
        Err(_) => false,
    }
}

/// argon2 allocates 19 MiB per hash (its default `m_cost`). glibc serves a block that
/// large from mmap and unmaps it when freed, until its dynamic threshold has risen past
/// that size (it does, on the first such free): from then on each allocator arena keeps
/// one, and RSS grows in 19 MiB steps with the blocking threads that ever checked a
/// password (the soak saw 180 -> 260 MB over 10 minutes; a test hammering wrong passwords,
/// 30 -> 258 MB, against 11 -> 30 MB with a fixed threshold). A fixed threshold keeps
/// every block of 1 MiB or more on mmap, given back as soon as it is freed.
fn return_large_blocks() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        // SAFETY: mallopt only sets an allocator parameter; glibc makes it thread-safe.
        ONCE.call_once(|| unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        });
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
}
