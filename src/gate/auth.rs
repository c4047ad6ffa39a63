//! Authentication at CONNECT and the access rules in force.
//!
//! Users and password hashes come from the store's user file, re-read when its modification
//! time changes (so `relaybox user add` takes effect for the next CONNECT, without a restart).
//! Password checks (argon2id, deliberately slow) run on the blocking pool. A TLS client
//! certificate's common name is the client's user name without a password.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::acl::Acl;
use super::client::ConnectRefusal;
use crate::broker::codec::Connect as ConnectInfo;
use crate::config::AclRule;
use crate::store::users::{UserDb, Users};

/// What the current rules are made of.
struct Current {
    users: Arc<UserDb>,
    rules: Vec<AclRule>,
    groups: HashMap<String, Vec<String>>,
    acl: Arc<Acl>,
}

pub struct Auth {
    users: Users,
    allow_anonymous: bool,
    current: Mutex<Current>,
    /// When the last check of the user file started; one check runs at a time.
    checked: tokio::sync::Mutex<Option<Instant>>,
}

impl Auth {
    pub fn new(
        users: Users,
        allow_anonymous: bool,
        rules: Vec<AclRule>,
        groups: HashMap<String, Vec<String>>,
    ) -> Auth {
        let db = match users.load() {
            Ok(db) => db,
            Err(error) => {
                tracing::error!(%error, "cannot read users; no user can log in until this is fixed");
                UserDb::default()
            }
        };
        let acl = Arc::new(Acl::new(rules.clone(), groups.clone(), !db.is_empty()));
        Auth {
            users,
            allow_anonymous,
            current: Mutex::new(Current {
                users: Arc::new(db),
                rules,
                groups,
                acl,
            }),
            checked: tokio::sync::Mutex::new(None),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Current> {
        match self.current.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Replaces the ACL rules (SIGHUP).
    pub fn set_rules(&self, rules: Vec<AclRule>, groups: HashMap<String, Vec<String>>) {
        let mut c = self.lock();
        c.acl = Arc::new(Acl::new(rules.clone(), groups.clone(), !c.users.is_empty()));
        c.rules = rules;
        c.groups = groups;
    }

    /// The rules to check packets against now.
    pub fn acl(&self) -> Arc<Acl> {
        self.lock().acl.clone()
    }

    /// The users as the file holds them now: re-read if it changed since a check that started
    /// before this call. Checking the file is a stat (and at times a read) of the store's disk,
    /// done on the blocking pool, so that a disk that hangs stalls logins, not the runtime.
    /// Logins that arrive together share one check: each waits for the check in progress and
    /// takes the result of the next one, which started after it came. So a burst of clients
    /// connecting uses one blocking thread, not one per CONNECT in flight (each with its stack
    /// and allocator cache: docs/BENCHMARKS.md, idle connections).
    async fn fresh_users(&self) -> Arc<UserDb> {
        let arrived = Instant::now();
        let mut checked = self.checked.lock().await;
        if checked.is_some_and(|started| started >= arrived) {
            return self.lock().users.clone();
        }
        *checked = Some(Instant::now());
        let known = self.lock().users.modified;
        let file = self.users.clone();
        let read = tokio::task::spawn_blocking(move || {
            let modified = file.modified();
            (modified != known).then(|| file.load())
        })
        .await;
        let mut c = self.lock();
        match read {
            Ok(Some(Ok(db))) => {
                let db = Arc::new(db);
                c.acl = Arc::new(Acl::new(c.rules.clone(), c.groups.clone(), !db.is_empty()));
                c.users = db;
                tracing::info!("users reloaded");
            }
            Ok(Some(Err(error))) => {
                tracing::warn!(%error, "cannot re-read users; keeping the ones loaded")
            }
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(%error, "cannot check the user file; keeping the users loaded")
            }
        }
        c.users.clone()
    }

    /// Whether `name` is a user of the user file and `password` is theirs (checked on the
    /// blocking pool).
    pub async fn verify(&self, name: &str, password: &str) -> bool {
        let users = self.fresh_users().await;
        let (name, password) = (name.to_owned(), password.to_owned());
        tokio::task::spawn_blocking(move || users.verify(&name, password.as_bytes()))
            .await
            .unwrap_or(false)
    }

    /// Whether `user` is in the config's group `group`.
    pub fn in_group(&self, user: &str, group: &str) -> bool {
        self.lock()
            .groups
            .get(group)
            .is_some_and(|members| members.iter().any(|m| m == user))
    }

    /// The user name a client is known by (`None`: anonymous), or why it is refused.
    pub async fn authenticate(
        &self,
        connect: &ConnectInfo,
        cert_user: Option<String>,
    ) -> Result<Option<String>, ConnectRefusal> {
        if let Some(user) = cert_user {
            return Ok(Some(user));
        }
        let users = self.fresh_users().await;
        match (&connect.username, &connect.password) {
            (Some(name), Some(password)) => {
                let name = name.clone();
                let password = password.clone();
                let check = users.clone();
                let verified = tokio::task::spawn_blocking(move || {
                    check.verify(&name, password.as_bytes()).then_some(name)
                })
                .await
                .ok()
                .flatten();
                verified.map(Some).ok_or(ConnectRefusal::BadCredentials)
            }
            // A name without a password cannot be checked: it is no identity.
            (Some(_), None) if !self.allow_anonymous => Err(ConnectRefusal::BadCredentials),
            _ if self.allow_anonymous => Ok(None),
            _ => Err(ConnectRefusal::NotAuthorized),
        }
    }
}
