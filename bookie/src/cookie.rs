//! The cookie's local half: the bookie's identity written into each of its directories, so that a
//! bookie never starts on a wiped, swapped or foreign disk and silently serves holes.
//!
//! Each directory holds a `COOKIE` file (TOML: format, version, bookie id, instance id, journal
//! dir, ledger dirs). At start-up:
//! - no directory has a cookie and none holds data: a new bookie; a cookie is written to all;
//! - every directory has the same cookie, matching the configuration: start;
//! - anything else (a directory without a cookie while others have one, a directory with data but
//!   no cookie, different cookies, a changed bookie id or directory list): refuse, saying which
//!   directory and what differs.
//!
//! The metadata half (the same cookie registered in the metadata store) comes with metadata.

use crate::durable;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const COOKIE_FILE: &str = "COOKIE";
const FORMAT: &str = "quire-cookie";
const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cookie {
    pub format: String,
    pub version: u32,
    pub bookie_id: String,
    pub instance_id: String,
    pub journal_dir: PathBuf,
    pub ledger_dirs: Vec<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum CookieError {
    #[error("cookie check failed: {0}")]
    Mismatch(String),
    #[error("cannot read or write the cookie in {dir}: {source}")]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
}

fn read(dir: &Path) -> Result<Option<Cookie>, CookieError> {
    let path = dir.join(COOKIE_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CookieError::Io {
                dir: dir.into(),
                source,
            });
        }
    };
    let c: Cookie = toml::from_str(&text).map_err(|e| {
        CookieError::Mismatch(format!("{} is not a valid cookie: {e}", path.display()))
    })?;
    if c.format != FORMAT || c.version != VERSION {
        return Err(CookieError::Mismatch(format!(
            "{} has format {} version {}, this bookie understands {FORMAT} version {VERSION}",
            path.display(),
            c.format,
            c.version
        )));
    }
    Ok(Some(c))
}

fn has_data(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|mut it| {
            it.any(|e| {
                e.map(|e| e.file_name() != COOKIE_FILE && !is_empty_dir(&e.path()))
                    .unwrap_or(true)
            })
        })
        .unwrap_or(false)
}

fn is_empty_dir(p: &Path) -> bool {
    p.is_dir() && std::fs::read_dir(p).is_ok_and(|mut it| it.next().is_none())
}

/// Checks (or, on a fresh bookie, writes) the cookies. Directories must exist; paths are
/// compared in canonical form. `bookie_id` is the configured identity: `None` adopts the one in
/// the cookie, or `default_id` for a new bookie; an explicit id must match the cookie's.
pub fn check_or_create(
    bookie_id: Option<&str>,
    default_id: &str,
    journal_dir: &Path,
    ledger_dirs: &[PathBuf],
) -> Result<Cookie, CookieError> {
    let canon = |p: &Path| {
        p.canonicalize().map_err(|source| CookieError::Io {
            dir: p.into(),
            source,
        })
    };
    let journal_dir = canon(journal_dir)?;
    let ledger_dirs = ledger_dirs
        .iter()
        .map(|d| canon(d))
        .collect::<Result<Vec<_>, _>>()?;
    let all: Vec<PathBuf> = std::iter::once(journal_dir.clone())
        .chain(ledger_dirs.iter().cloned())
        .collect();
    let found = all
        .iter()
        .map(|d| read(d).map(|c| (d.clone(), c)))
        .collect::<Result<Vec<_>, _>>()?;

    if found.iter().all(|(_, c)| c.is_none()) {
        if let Some(d) = all.iter().find(|d| has_data(d)) {
            return Err(CookieError::Mismatch(format!(
                "{} holds data but no cookie: it belongs to no bookie known here (restore its \
                 COOKIE file or use an empty directory)",
                d.display()
            )));
        }
        let bookie_id = bookie_id.unwrap_or(default_id);
        let cookie = Cookie {
            format: FORMAT.into(),
            version: VERSION,
            bookie_id: bookie_id.into(),
            instance_id: format!("{:032x}", rand::random::<u128>()),
            journal_dir,
            ledger_dirs,
        };
        let text = toml::to_string(&cookie).map_err(|e| CookieError::Mismatch(e.to_string()))?;
        for d in &all {
            durable::write_atomic(&d.join(COOKIE_FILE), text.as_bytes()).map_err(|source| {
                CookieError::Io {
                    dir: d.clone(),
                    source,
                }
            })?;
        }
        tracing::info!(bookie_id, instance = %cookie.instance_id, "new bookie: cookies written");
        return Ok(cookie);
    }

    let (first_dir, first) = found
        .iter()
        .find_map(|(d, c)| c.as_ref().map(|c| (d, c)))
        .expect("some cookie exists");
    for (d, c) in &found {
        match c {
            None => {
                return Err(CookieError::Mismatch(format!(
                    "{} has no cookie while {} has one: the directory was wiped or replaced; \
                     refusing to start with missing data",
                    d.display(),
                    first_dir.display()
                )));
            }
            Some(c) if c != first => {
                return Err(CookieError::Mismatch(format!(
                    "the cookies in {} and {} differ (instance {} vs {}): directories of \
                     different bookies are mixed",
                    d.display(),
                    first_dir.display(),
                    c.instance_id,
                    first.instance_id
                )));
            }
            Some(_) => {}
        }
    }
    if let Some(bookie_id) = bookie_id
        && first.bookie_id != bookie_id
    {
        return Err(CookieError::Mismatch(format!(
            "the directories belong to bookie {:?}, but this bookie is configured as {:?}",
            first.bookie_id, bookie_id
        )));
    }
    if first.journal_dir != journal_dir || first.ledger_dirs != ledger_dirs {
        return Err(CookieError::Mismatch(format!(
            "the directory set changed: the cookie records journal {} and ledger dirs {:?}, the \
             configuration gives journal {} and ledger dirs {:?}",
            first.journal_dir.display(),
            first.ledger_dirs,
            journal_dir.display(),
            ledger_dirs
        )));
    }
    Ok(first.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs(root: &Path) -> (PathBuf, Vec<PathBuf>) {
        let j = root.join("j");
        let l = vec![root.join("l1"), root.join("l2")];
        for d in std::iter::once(&j).chain(&l) {
            std::fs::create_dir_all(d).unwrap();
        }
        (j, l)
    }

    #[test]
    fn fresh_dirs_get_a_cookie_that_then_matches() {
        let t = tempfile::tempdir().unwrap();
        let (j, l) = dirs(t.path());
        let c1 = check_or_create(Some("b1"), "x", &j, &l).unwrap();
        let c2 = check_or_create(Some("b1"), "x", &j, &l).unwrap();
        assert_eq!(c1, c2);
    }

    #[test]
    fn mismatches_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let (j, l) = dirs(t.path());
        check_or_create(Some("b1"), "x", &j, &l).unwrap();
        // Another bookie id; no id adopts the cookie's.
        assert!(check_or_create(Some("b2"), "x", &j, &l).is_err());
        assert_eq!(check_or_create(None, "x", &j, &l).unwrap().bookie_id, "b1");
        // A dropped ledger dir.
        assert!(check_or_create(Some("b1"), "x", &j, &l[..1]).is_err());
        // A wiped ledger dir.
        std::fs::remove_file(l[1].join(COOKIE_FILE)).unwrap();
        let err = check_or_create(Some("b1"), "x", &j, &l)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no cookie"), "{err}");
    }

    #[test]
    fn data_without_cookie_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let (j, l) = dirs(t.path());
        std::fs::write(l[0].join("LEDGERS"), b"x").unwrap();
        assert!(check_or_create(Some("b1"), "x", &j, &l).is_err());
    }

    #[test]
    fn foreign_cookie_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let (j, l) = dirs(t.path());
        check_or_create(Some("b1"), "x", &j, &l).unwrap();
        let other = tempfile::tempdir().unwrap();
        let (j2, l2) = dirs(other.path());
        check_or_create(Some("b1"), "x", &j2, &l2).unwrap();
        std::fs::copy(l2[0].join(COOKIE_FILE), l[0].join(COOKIE_FILE)).unwrap();
        assert!(check_or_create(Some("b1"), "x", &j, &l).is_err());
    }
}
