//! Secrets the operator holds outside every sandbox, by name. A value goes
//! into a header the interceptor sends to the server its rule names, and
//! nowhere else: no `Debug`, `Display` or error of this module shows one,
//! and the store's copy is wiped when it is replaced or dropped.
//!
//! Beyond the store, a value passes through the HTTP and TLS layers' own
//! buffers on its way out (hyper's, rustls's), which do not wipe theirs.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use zeroize::Zeroizing;

use crate::rules::{echo, valid_header_bytes, valid_secret_name, MAX_SECRET_NAME};

/// The largest secret value taken, in bytes.
pub const MAX_SECRET_BYTES: usize = 16 << 10;
/// How many secrets one store holds at most.
pub const MAX_SECRETS: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error(
        "invalid secret name {0}: give 1 to {MAX_SECRET_NAME} of letters, digits, '_', '-' or '.'"
    )]
    BadName(String),
    #[error("secret {0}: the value is empty")]
    Empty(String),
    #[error("secret {name}: the value is {len} bytes, at most {MAX_SECRET_BYTES}")]
    TooLong { name: String, len: usize },
    #[error("secret {0}: the value holds a byte a header cannot carry (CR, LF, NUL or another control character)")]
    BadValue(String),
    #[error("too many secrets: at most {MAX_SECRETS}")]
    TooMany,
}

/// One secret's value. Wiped on drop; shown as `Secret(..)`.
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    /// A value for `name`, checked: it must fit in a header. A trailing
    /// newline (a file written with `echo`) is not part of it. The input
    /// is wiped whether or not it is taken.
    pub fn new(name: &str, value: Vec<u8>) -> Result<Secret, SecretError> {
        let mut value = Zeroizing::new(value);
        while value.last().is_some_and(|b| matches!(b, b'\n' | b'\r')) {
            value.pop();
        }
        if value.is_empty() {
            return Err(SecretError::Empty(name.to_string()));
        }
        if value.len() > MAX_SECRET_BYTES {
            return Err(SecretError::TooLong {
                name: name.to_string(),
                len: value.len(),
            });
        }
        if !valid_header_bytes(&value) {
            return Err(SecretError::BadValue(name.to_string()));
        }
        Ok(Secret(value))
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Named secrets, shared by every sandbox of a process; a value replaced
/// here applies to the next request that names it.
#[derive(Clone, Default)]
pub struct SecretStore {
    inner: Arc<RwLock<BTreeMap<String, Arc<Secret>>>>,
}

impl fmt::Debug for SecretStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretStore")
            .field("names", &self.names())
            .finish()
    }
}

impl SecretStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Set (or replace) a secret. The old value is wiped once no request
    /// in flight uses it any more.
    pub fn put(&self, name: &str, value: Vec<u8>) -> Result<(), SecretError> {
        let value = Zeroizing::new(value);
        if !valid_secret_name(name) {
            return Err(SecretError::BadName(echo(name)));
        }
        let secret = Secret::new(name, value.to_vec())?;
        let mut map = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if !map.contains_key(name) && map.len() >= MAX_SECRETS {
            return Err(SecretError::TooMany);
        }
        map.insert(name.to_string(), Arc::new(secret));
        Ok(())
    }

    /// Forget a secret; whether it was there.
    pub fn remove(&self, name: &str) -> bool {
        let mut map = self.inner.write().unwrap_or_else(|e| e.into_inner());
        map.remove(name).is_some()
    }

    pub fn contains(&self, name: &str) -> bool {
        let map = self.inner.read().unwrap_or_else(|e| e.into_inner());
        map.contains_key(name)
    }

    /// The names, sorted; never a value.
    pub fn names(&self) -> Vec<String> {
        let map = self.inner.read().unwrap_or_else(|e| e.into_inner());
        map.keys().cloned().collect()
    }

    pub(crate) fn get(&self, name: &str) -> Option<Arc<Secret>> {
        let map = self.inner.read().unwrap_or_else(|e| e.into_inner());
        map.get(name).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_never_show_in_debug_or_errors() {
        let store = SecretStore::new();
        store.put("KEY", b"sk-live-123\n".to_vec()).unwrap();
        assert_eq!(store.get("KEY").unwrap().expose(), b"sk-live-123");
        let shown = format!("{store:?} {:?}", store.get("KEY").unwrap());
        assert!(!shown.contains("sk-live"), "{shown}");
        assert!(shown.contains("KEY"));
        for (value, want) in [
            (
                b"a\r\nInjected: 1".to_vec(),
                "secret KEY: the value holds a byte",
            ),
            (b"\n".to_vec(), "secret KEY: the value is empty"),
            (
                vec![b'a'; MAX_SECRET_BYTES + 1],
                "secret KEY: the value is 16385 bytes",
            ),
        ] {
            let err = store.put("KEY", value.clone()).unwrap_err().to_string();
            assert!(err.starts_with(want), "{err}");
            assert!(!err.contains("Injected") && !err.contains("aaaa"), "{err}");
        }
        // A refused value leaves the old one in place.
        assert_eq!(store.get("KEY").unwrap().expose(), b"sk-live-123");
        assert!(store.put("bad name", b"x".to_vec()).is_err());
        assert_eq!(store.names(), ["KEY"]);
        assert!(store.remove("KEY"));
        assert!(!store.contains("KEY"));
    }

    #[test]
    fn a_replaced_value_is_what_the_next_reader_gets() {
        let store = SecretStore::new();
        store.put("K", b"one".to_vec()).unwrap();
        let held = store.get("K").unwrap();
        store.put("K", b"two".to_vec()).unwrap();
        assert_eq!(held.expose(), b"one", "a request in flight keeps its value");
        assert_eq!(store.get("K").unwrap().expose(), b"two");
    }
}
