//! Moving a workspace from a sender to a receiver, generation by generation.
//!
//! The life of one write (ARCHITECTURE.md): `watch` notices it, `scan` plans it into a
//! generation against the [`manifest`], `send` ships [`delta`]s (`compress`ed), and
//! [`receive`] stages, verifies, journals and applies it, recording the result in its
//! `catalog`. `continuous` is the loop that keeps doing this.

pub mod attrs;
pub mod catalog;
pub mod chunkmap;
pub(crate) mod compress;
pub(crate) mod continuous;
pub mod delta;
pub(crate) mod exclude;
pub mod manifest;
pub mod receive;
pub(crate) mod scan;
pub(crate) mod send;
pub(crate) mod watch;
