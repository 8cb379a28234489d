//! Newtypes shared by every layer: [`Epoch`], [`Generation`], [`RelPath`], and [`Side`] with its
//! per-side container [`PerSide`].
//!
//! `RelPath` is the confinement boundary (Invariant 7): every path that arrives from the network
//! is parsed into one, and a `RelPath` can only name something strictly inside a workspace.

use std::fmt;
use std::path::{Path, PathBuf};

/// The fencing epoch of a pair. Monotonic; failover and cutover increment it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch(pub u64);

impl Epoch {
    pub fn next(self) -> Epoch {
        Epoch(self.0 + 1)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A committed generation of a replica. Generation 0 is the empty (or adopted) replica.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Generation(pub u64);

impl Generation {
    pub fn next(self) -> Generation {
        Generation(self.0 + 1)
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Longest path accepted (Linux PATH_MAX).
pub const MAX_PATH: usize = 4096;
/// Longest path component accepted (Linux NAME_MAX).
pub const MAX_NAME: usize = 255;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("empty path")]
    Empty,
    #[error("absolute path refused")]
    Absolute,
    #[error("path contains a NUL byte")]
    Nul,
    #[error("path has an empty, '.' or '..' component")]
    BadComponent,
    #[error("path longer than {MAX_PATH} bytes")]
    TooLong,
    #[error("path component longer than {MAX_NAME} bytes")]
    NameTooLong,
}

/// A path relative to a workspace root: non-empty, '/'-separated, no leading or trailing '/',
/// no empty, `.` or `..` component, no NUL. Ordered bytewise, so all paths under a directory
/// `d` sort contiguously after `d` itself (`d/` ... `d0`).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelPath(Vec<u8>);

impl RelPath {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<RelPath, PathError> {
        let bytes = bytes.into();
        if bytes.is_empty() {
            return Err(PathError::Empty);
        }
        if bytes.len() > MAX_PATH {
            return Err(PathError::TooLong);
        }
        if bytes[0] == b'/' {
            return Err(PathError::Absolute);
        }
        if bytes.contains(&0) {
            return Err(PathError::Nul);
        }
        for c in bytes.split(|b| *b == b'/') {
            if c.is_empty() || c == b"." || c == b".." {
                return Err(PathError::BadComponent);
            }
            if c.len() > MAX_NAME {
                return Err(PathError::NameTooLong);
            }
        }
        Ok(RelPath(bytes))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }

    /// The path below `root`.
    pub fn to_path(&self, root: &Path) -> PathBuf {
        use std::os::unix::ffi::OsStrExt;
        root.join(std::ffi::OsStr::from_bytes(&self.0))
    }

    /// `a/b/c` -> `a/b`; None for a top-level name.
    pub fn parent(&self) -> Option<RelPath> {
        let i = self.0.iter().rposition(|b| *b == b'/')?;
        Some(RelPath(self.0[..i].to_vec()))
    }

    /// The last component.
    pub fn name(&self) -> &[u8] {
        match self.0.iter().rposition(|b| *b == b'/') {
            Some(i) => &self.0[i + 1..],
            None => &self.0,
        }
    }

    pub fn join(&self, name: &[u8]) -> Result<RelPath, PathError> {
        let mut v = Vec::with_capacity(self.0.len() + 1 + name.len());
        v.extend_from_slice(&self.0);
        v.push(b'/');
        v.extend_from_slice(name);
        RelPath::new(v)
    }

    /// Number of components.
    pub fn depth(&self) -> usize {
        self.0.iter().filter(|b| **b == b'/').count() + 1
    }

    /// Whether `self` is `other` or lies below it.
    pub fn starts_with(&self, other: &RelPath) -> bool {
        self.0 == other.0
            || (self.0.len() > other.0.len()
                && self.0.starts_with(&other.0)
                && self.0[other.0.len()] == b'/')
    }

    /// Every proper ancestor, outermost first: `a/b/c` -> `a`, `a/b`.
    pub fn ancestors(&self) -> impl Iterator<Item = RelPath> + '_ {
        self.0
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'/')
            .map(|(i, _)| RelPath(self.0[..i].to_vec()))
    }

    /// The half-open key range `[self + "/", self + "0")` holding everything below `self`.
    pub fn subtree_range(&self) -> (RelPath, RelPath) {
        let mut lo = self.0.clone();
        lo.push(b'/');
        let mut hi = self.0.clone();
        hi.push(b'/' + 1);
        (RelPath(lo), RelPath(hi))
    }

    pub fn display(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_paths() {
        for p in [
            "a",
            "a/b",
            "a b/ü ñ.txt",
            ".hidden",
            "a/..b",
            "...",
            "x/.y/z",
        ] {
            RelPath::new(p).unwrap_or_else(|e| panic!("{p}: {e}"));
        }
    }

    #[test]
    fn refuses_escapes() {
        assert_eq!(RelPath::new(""), Err(PathError::Empty));
        assert_eq!(RelPath::new("/etc/passwd"), Err(PathError::Absolute));
        assert_eq!(RelPath::new("../x"), Err(PathError::BadComponent));
        assert_eq!(RelPath::new("a/../../x"), Err(PathError::BadComponent));
        assert_eq!(RelPath::new("a/.."), Err(PathError::BadComponent));
        assert_eq!(RelPath::new("./a"), Err(PathError::BadComponent));
        assert_eq!(RelPath::new("a//b"), Err(PathError::BadComponent));
        assert_eq!(RelPath::new("a/"), Err(PathError::BadComponent));
        assert_eq!(RelPath::new(b"a\0b".to_vec()), Err(PathError::Nul));
        assert_eq!(RelPath::new("a".repeat(256)), Err(PathError::NameTooLong));
        assert_eq!(
            RelPath::new("a/".repeat(2100) + "a"),
            Err(PathError::TooLong)
        );
    }

    #[test]
    fn subtree_range_holds_exactly_the_descendants() {
        let d = RelPath::new("d").unwrap();
        let (lo, hi) = d.subtree_range();
        for (p, inside) in [
            ("d", false),
            ("d/a", true),
            ("d/a/b", true),
            ("d.x", false),
            ("d0", false),
            ("da", false),
        ] {
            let p = RelPath::new(p).unwrap();
            assert_eq!(p >= lo && p < hi, inside, "{p}");
            assert_eq!(p.starts_with(&d) && p != d, inside, "{p}");
        }
    }

    #[test]
    fn parent_name_ancestors() {
        let p = RelPath::new("a/b/c").unwrap();
        assert_eq!(p.parent().unwrap().as_bytes(), b"a/b");
        assert_eq!(p.name(), b"c");
        let anc: Vec<_> = p.ancestors().map(|a| a.display()).collect();
        assert_eq!(anc, ["a", "a/b"]);
        assert!(RelPath::new("a").unwrap().parent().is_none());
        assert_eq!(p.depth(), 3);
    }
}

/// One side of a pair: the GPU machine or its CPU standby.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    Gpu,
    Cpu,
}

impl Side {
    /// The side a persisted role names (unspecified is the GPU, as records written before
    /// roles were stored say nothing).
    pub fn from_record(role: crate::proto::Role) -> Side {
        match role {
            crate::proto::Role::Cpu => Side::Cpu,
            crate::proto::Role::Gpu | crate::proto::Role::Unspecified => Side::Gpu,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Side::Gpu => "gpu",
            Side::Cpu => "cpu",
        }
    }

    /// Both sides, GPU first (the order [`PerSide::iter`] follows).
    pub const ALL: [Side; 2] = [Side::Gpu, Side::Cpu];
}

/// One value per [`Side`] of a pair, chosen by indexing with the side (`v[side]`) rather than by
/// matching on it at every use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PerSide<T> {
    pub gpu: T,
    pub cpu: T,
}

impl<T> PerSide<T> {
    pub const fn new(gpu: T, cpu: T) -> PerSide<T> {
        PerSide { gpu, cpu }
    }

    pub fn get(&self, side: Side) -> &T {
        match side {
            Side::Gpu => &self.gpu,
            Side::Cpu => &self.cpu,
        }
    }

    pub fn get_mut(&mut self, side: Side) -> &mut T {
        match side {
            Side::Gpu => &mut self.gpu,
            Side::Cpu => &mut self.cpu,
        }
    }

    /// Each side with its value, GPU first.
    pub fn iter(&self) -> impl Iterator<Item = (Side, &T)> {
        Side::ALL.into_iter().zip([&self.gpu, &self.cpu])
    }

    pub fn map<U>(self, mut f: impl FnMut(T) -> U) -> PerSide<U> {
        PerSide {
            gpu: f(self.gpu),
            cpu: f(self.cpu),
        }
    }
}

impl<T> std::ops::Index<Side> for PerSide<T> {
    type Output = T;

    fn index(&self, side: Side) -> &T {
        self.get(side)
    }
}

impl<T> std::ops::IndexMut<Side> for PerSide<T> {
    fn index_mut(&mut self, side: Side) -> &mut T {
        self.get_mut(side)
    }
}

#[cfg(test)]
mod per_side_tests {
    use super::*;

    #[test]
    fn indexing_selects_the_named_side() {
        let mut v = PerSide::new(1, 2);
        assert_eq!((v[Side::Gpu], v[Side::Cpu]), (1, 2));
        assert_eq!((*v.get(Side::Gpu), *v.get(Side::Cpu)), (1, 2));
        v[Side::Cpu] = 20;
        *v.get_mut(Side::Gpu) += 10;
        assert_eq!(v, PerSide { gpu: 11, cpu: 20 });
    }

    #[test]
    fn iter_and_map_keep_each_value_with_its_side() {
        let v = PerSide::new("g", "c");
        let seen: Vec<_> = v.iter().map(|(s, x)| (s, *x)).collect();
        assert_eq!(seen, [(Side::Gpu, "g"), (Side::Cpu, "c")]);
        assert_eq!(v.map(str::len), PerSide::new(1, 1));
        assert_eq!(
            PerSide::new(2, 3).map(|x| x * 10),
            PerSide { gpu: 20, cpu: 30 }
        );
        assert_eq!(PerSide::<Option<u8>>::default(), PerSide::new(None, None));
    }
}

impl From<Side> for crate::proto::Role {
    fn from(side: Side) -> crate::proto::Role {
        match side {
            Side::Gpu => crate::proto::Role::Gpu,
            Side::Cpu => crate::proto::Role::Cpu,
        }
    }
}
