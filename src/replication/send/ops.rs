//! The wire operations and index changes a generation is made of. Every upsert carries the
//! wire form of its entry ([`wire_entry`]: local fields stripped).

use prost::Message;

use crate::proto::state::Change;
use crate::proto::{Entry, Op, op, upsert};
use crate::replication::manifest::{Kind, wire_entry};
use crate::types::RelPath;

/// The index change that records `e` at `p`.
pub(super) fn change(p: &RelPath, e: Entry) -> Change {
    Change {
        path: p.as_bytes().to_vec(),
        entry: Some(e),
        ..Default::default()
    }
}

/// The index change that removes `p` (the replica holds an `old` there).
pub(super) fn delete_change(p: RelPath, old: Kind) -> Change {
    Change {
        path: p.into_bytes(),
        entry: None,
        old_kind: old.to_proto(),
        ..Default::default()
    }
}

pub(super) fn delete_op(p: &RelPath, old: Kind) -> Op {
    Op {
        path: p.as_bytes().to_vec(),
        change: Some(op::Change::Delete(old.to_proto())),
    }
}

/// An upsert whose content is neither compressed nor a delta.
pub(super) fn upsert_op(p: &RelPath, e: &Entry, content: upsert::Content) -> Op {
    upsert(p, e, content, false, false)
}

/// A small file's bytes, inside the batch.
pub(super) fn inline_op(p: &RelPath, e: &Entry, data: Vec<u8>, zstd: bool) -> Op {
    upsert(p, e, upsert::Content::Inline(data.into()), zstd, false)
}

/// A big file whose content follows as chunks of stream `id`: deltas when `delta`, copies of
/// the receiver's copy when `base_blake3` names its content (empty: no copies).
pub(super) fn stream_op(p: &RelPath, e: &Entry, id: u32, delta: bool, base_blake3: Vec<u8>) -> Op {
    let mut op = upsert(p, e, upsert::Content::Stream(id), false, delta);
    if let Some(op::Change::Upsert(u)) = &mut op.change {
        u.base_blake3 = base_blake3;
    }
    op
}

fn upsert(p: &RelPath, e: &Entry, content: upsert::Content, zstd: bool, delta: bool) -> Op {
    Op {
        path: p.as_bytes().to_vec(),
        change: Some(op::Change::Upsert(crate::proto::Upsert {
            entry: Some(wire_entry(e)),
            content: Some(content),
            zstd,
            delta,
            base_blake3: Vec::new(),
        })),
    }
}

/// Splits ops into messages of at most ~1 MiB.
pub(super) fn batches(ops: Vec<Op>) -> Vec<Vec<Op>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut size = 0;
    for o in ops {
        size += o.encoded_len();
        cur.push(o);
        if size >= 1 << 20 || cur.len() >= 4096 {
            out.push(std::mem::take(&mut cur));
            size = 0;
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_hold_at_most_4096_ops_or_about_1_mib() {
        let p = RelPath::new("f").unwrap();
        let small: Vec<Op> = (0..5000).map(|_| delete_op(&p, Kind::File)).collect();
        let sizes: Vec<usize> = batches(small).iter().map(Vec::len).collect();
        assert_eq!(sizes, [4096, 904]);
        let e = Entry::default();
        let big: Vec<Op> = (0..3)
            .map(|_| inline_op(&p, &e, vec![0; 600 << 10], false))
            .collect();
        let sizes: Vec<usize> = batches(big).iter().map(Vec::len).collect();
        assert_eq!(sizes, [2, 1]);
        assert!(batches(Vec::new()).is_empty());
    }
}
