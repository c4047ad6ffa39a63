//! Users and their password hashes (argon2id, PHC strings).
//!
//! They live in `<data_dir>/users.redb`, a file of their own beside the outbox: the running
//! relay keeps `relaybox.redb` open (redb allows one process per file), so `relaybox user …`
//! must be able to change users while the relay runs. Both sides open `users.redb` only for the
//! moment of one transaction and retry briefly while the other holds it. The relay notices a
//! change by the file's modification time and reloads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

const USERS: TableDefinition<&str, &str> = TableDefinition::new("users");
/// How long to wait for the other process to let go of the file.
const OPEN_PATIENCE: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("user name {0:?} must be 1 to 64 characters without spaces, control characters, '/', '+', '#' or ':'")]
    BadName(String),
    #[error("user {0:?} exists already (use `relaybox user passwd` to change the password)")]
    Exists(String),
    #[error("there is no user {0:?}")]
    Missing(String),
    #[error("the password is empty")]
    EmptyPassword,
    #[error("user store {path}: {reason}")]
    Store { path: PathBuf, reason: String },
}

/// Checks a user name: it may be put into topic filters (`%u` in ACLs), so it may not hold
/// MQTT wildcards or level separators.
pub fn check_name(name: &str) -> Result<(), UserError> {
    let ok = !name.is_empty()
        && name.chars().count() <= 64
        && !name
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '/' | '+' | '#' | ':'));
    if ok {
        Ok(())
    } else {
        Err(UserError::BadName(name.to_owned()))
    }
}

/// The user file of one data directory.
#[derive(Debug, Clone)]
pub struct Users {
    path: PathBuf,
}

/// A snapshot of the users, for checking passwords.
#[derive(Debug, Default, Clone)]
pub struct UserDb {
    hashes: HashMap<String, String>,
    /// The file's modification time when this snapshot was read.
    pub modified: Option<SystemTime>,
}

impl UserDb {
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.hashes.contains_key(name)
    }

    /// Whether `password` is the password of `name`. Costly by design (argon2id): call it off
    /// the async threads.
    pub fn verify(&self, name: &str, password: &[u8]) -> bool {
        let Some(hash) = self.hashes.get(name) else {
            // Spend the same work for an unknown user, so that timing does not tell which
            // names exist.
            let _ = Argon2::default().hash_password(password, &salt());
            return false;
        };
        match PasswordHash::new(hash) {
            Ok(parsed) => Argon2::default().verify_password(password, &parsed).is_ok(),
            Err(_) => false,
        }
    }
}

fn salt() -> SaltString {
    let bytes: [u8; 16] = rand::random();
    // 16 random bytes always make a valid salt; the fallback is never taken.
    SaltString::encode_b64(&bytes).unwrap_or_else(|_| {
        SaltString::from_b64("c2FsdHNhbHRzYWx0").expect("static salt is valid base64")
    })
}

fn hash(password: &str) -> Result<String, UserError> {
    if password.is_empty() {
        return Err(UserError::EmptyPassword);
    }
    Argon2::default()
        .hash_password(password.as_bytes(), &salt())
        .map(|h| h.to_string())
        .map_err(|e| UserError::Store {
            path: PathBuf::new(),
            reason: format!("hashing failed: {e}"),
        })
}

impl Users {
    pub fn at(data_dir: &Path) -> Users {
        Users {
            path: data_dir.join("users.redb"),
        }
    }

    fn err(&self, reason: impl std::fmt::Display) -> UserError {
        UserError::Store {
            path: self.path.clone(),
            reason: reason.to_string(),
        }
    }

    /// Opens the file, waiting while another process has it open.
    fn open(&self) -> Result<Database, UserError> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| self.err(e))?;
        }
        let started = std::time::Instant::now();
        loop {
            match Database::create(&self.path) {
                Ok(db) => return Ok(db),
                Err(redb::DatabaseError::DatabaseAlreadyOpen)
                    if started.elapsed() < OPEN_PATIENCE =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(self.err(e)),
            }
        }
    }

    fn write(
        &self,
        change: impl FnOnce(&mut redb::Table<&str, &str>) -> Result<(), UserError>,
    ) -> Result<(), UserError> {
        let db = self.open()?;
        let txn = db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut table = txn.open_table(USERS).map_err(|e| self.err(e))?;
            change(&mut table)?;
        }
        txn.commit().map_err(|e| self.err(e))
    }

    pub fn add(&self, name: &str, password: &str) -> Result<(), UserError> {
        check_name(name)?;
        let hash = hash(password)?;
        self.write(|t| {
            if t.get(name).map_err(|e| self.err(e))?.is_some() {
                return Err(UserError::Exists(name.to_owned()));
            }
            t.insert(name, hash.as_str()).map_err(|e| self.err(e))?;
            Ok(())
        })
    }

    pub fn set_password(&self, name: &str, password: &str) -> Result<(), UserError> {
        let hash = hash(password)?;
        self.write(|t| {
            if t.get(name).map_err(|e| self.err(e))?.is_none() {
                return Err(UserError::Missing(name.to_owned()));
            }
            t.insert(name, hash.as_str()).map_err(|e| self.err(e))?;
            Ok(())
        })
    }

    pub fn delete(&self, name: &str) -> Result<(), UserError> {
        self.write(|t| match t.remove(name).map_err(|e| self.err(e))? {
            Some(_) => Ok(()),
            None => Err(UserError::Missing(name.to_owned())),
        })
    }

    /// The file's modification time, if it exists.
    pub fn modified(&self) -> Option<SystemTime> {
        std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok()
    }

    /// Reads every user. A missing file is no users.
    pub fn load(&self) -> Result<UserDb, UserError> {
        let modified = self.modified();
        if modified.is_none() {
            return Ok(UserDb::default());
        }
        let db = self.open()?;
        let txn = db.begin_read().map_err(|e| self.err(e))?;
        let table = match txn.open_table(USERS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(UserDb::default()),
            Err(e) => return Err(self.err(e)),
        };
        let mut hashes = HashMap::new();
        for item in table.iter().map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            hashes.insert(k.value().to_owned(), v.value().to_owned());
        }
        Ok(UserDb { hashes, modified })
    }

    pub fn list(&self) -> Result<Vec<String>, UserError> {
        let mut names: Vec<String> = self.load()?.hashes.into_keys().collect();
        names.sort();
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_added_checked_changed_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let users = Users::at(dir.path());
        assert!(users.load().unwrap().is_empty());
        users.add("alice", "s3cret").unwrap();
        assert!(matches!(users.add("alice", "x"), Err(UserError::Exists(_))));
        let db = users.load().unwrap();
        assert!(db.verify("alice", b"s3cret"));
        assert!(!db.verify("alice", b"wrong"));
        assert!(!db.verify("bob", b"s3cret"));
        users.set_password("alice", "n3w").unwrap();
        assert!(users.load().unwrap().verify("alice", b"n3w"));
        assert!(matches!(
            users.set_password("bob", "x"),
            Err(UserError::Missing(_))
        ));
        assert_eq!(users.list().unwrap(), vec!["alice".to_owned()]);
        users.delete("alice").unwrap();
        assert!(users.load().unwrap().is_empty());
        assert!(matches!(users.delete("alice"), Err(UserError::Missing(_))));
    }

    #[test]
    fn names_that_could_widen_a_topic_filter_are_refused() {
        for bad in ["", "a b", "a/b", "a+", "#", "a:b", "tab\t"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        for good in ["alice", "meter-1", "dev_2", "ünï"] {
            assert!(check_name(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn hashes_are_argon2id_and_never_the_password() {
        let dir = tempfile::tempdir().unwrap();
        let users = Users::at(dir.path());
        users.add("alice", "s3cret").unwrap();
        let db = users.load().unwrap();
        let stored = db.hashes.get("alice").unwrap();
        assert!(stored.starts_with("$argon2id$"), "{stored}");
        assert!(!stored.contains("s3cret"));
    }
}
