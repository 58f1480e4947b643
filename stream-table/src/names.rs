//! Names of streams and tables: `namespace/name`.
//!
//! Both parts are 1 to 128 characters of `[A-Za-z0-9._-]`, so a name is safe as a metadata key
//! segment and in a URL. Names starting with `_` are reserved for Quire's internal streams (a
//! table range's changelog), which users cannot create or address directly.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// Longest namespace or name part.
pub const PART_MAX: usize = 128;

/// The namespace of internal streams (table changelogs).
pub const INTERNAL_NAMESPACE: &str = "_system";

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Name {
    pub namespace: String,
    pub name: String,
}

impl Name {
    /// A user-facing name, checked.
    pub fn new(namespace: &str, name: &str) -> Result<Name, Error> {
        check_part("namespace", namespace)?;
        check_part("name", name)?;
        for (what, p) in [("namespace", namespace), ("name", name)] {
            if p.starts_with('_') {
                return Err(Error::InvalidArgument(format!(
                    "{what} {p:?}: names starting with '_' are reserved"
                )));
            }
        }
        Ok(Name {
            namespace: namespace.into(),
            name: name.into(),
        })
    }

    /// The changelog stream of range `range` of table `table`.
    pub fn changelog(table: &Name, range: u32) -> Name {
        Name {
            namespace: INTERNAL_NAMESPACE.into(),
            name: format!("{}.{}.{range}", table.namespace, table.name),
        }
    }

    /// Whether this is one of Quire's internal streams.
    pub fn is_internal(&self) -> bool {
        self.namespace == INTERNAL_NAMESPACE
    }

    /// `namespace/name`, the form used in metadata keys.
    pub fn path(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

fn check_part(what: &str, p: &str) -> Result<(), Error> {
    if p.is_empty() || p.len() > PART_MAX {
        return Err(Error::InvalidArgument(format!(
            "{what} must be 1 to {PART_MAX} characters, got {}",
            p.len()
        )));
    }
    if let Some(c) = p
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(Error::InvalidArgument(format!(
            "{what} {p:?} contains {c:?}: use letters, digits, '.', '_' and '-'"
        )));
    }
    Ok(())
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Parses `namespace/name` (a user-facing name).
impl FromStr for Name {
    type Err = Error;
    fn from_str(s: &str) -> Result<Name, Error> {
        let (ns, name) = s
            .split_once('/')
            .ok_or_else(|| Error::InvalidArgument(format!("{s:?}: expected namespace/name")))?;
        Name::new(ns, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_check() {
        let n: Name = "public.ns/events-1".parse().unwrap();
        assert_eq!(n.path(), "public.ns/events-1");
        for bad in [
            "",
            "a",
            "/b",
            "a/",
            "a/b/c",
            "_x/y",
            "x/_y",
            "a b/c",
            "ns/naïve",
        ] {
            assert!(
                matches!(bad.parse::<Name>(), Err(Error::InvalidArgument(_))),
                "{bad}"
            );
        }
        assert!(Name::new("a", &"x".repeat(PART_MAX + 1)).is_err());
        let c = Name::changelog(&n, 3);
        assert!(c.is_internal());
        assert_eq!(c.path(), "_system/public.ns.events-1.3");
    }
}
