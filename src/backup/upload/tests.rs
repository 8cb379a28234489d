use super::*;
use crate::backup::layout::Name;

const P1: &str = "packs/1111111111111111111111111111111111111111111111111111111111111111.pack";
const P2: &str = "packs/2222222222222222222222222222222222222222222222222222222222222222.pack";
const S1: &str = "snapshots/0000000000000001.snap";

fn file(local: &str, len: u64) -> LocalFile {
    LocalFile {
        name: Name::parse(local).unwrap(),
        path: PathBuf::from("/nowhere").join(local),
        len,
        mtime_ns: 7,
    }
}

fn key() -> BackupKey {
    BackupKey::from_bytes([3; 32])
}

fn held(files: &[&LocalFile]) -> BTreeMap<Kind, BTreeMap<String, u64>> {
    let mut out: BTreeMap<Kind, BTreeMap<String, u64>> = BTreeMap::new();
    for kind in Kind::ALL {
        out.insert(kind, BTreeMap::new());
    }
    for f in files {
        out.get_mut(&f.name.kind)
            .unwrap()
            .insert(key().object_name(&f.name.local()), sealed_len(f));
    }
    out
}

fn recorded(f: &LocalFile) -> Uploaded {
    Uploaded {
        local: f.name.local(),
        object: key().object_name(&f.name.local()),
        sealed: sealed_len(f),
        mtime_ns: f.mtime_ns,
    }
}

#[test]
fn a_new_store_uploads_everything() {
    let local = [file(P1, 10), file(P2, 20), file(S1, 5)];
    let p = plan(&local, &held(&[]), &BTreeMap::new(), &key());
    assert_eq!(p.upload[&Kind::Pack].len(), 2);
    assert_eq!(p.upload[&Kind::Snapshot].len(), 1);
    assert!(p.adopt.is_empty() && p.delete.is_empty());
}

#[test]
fn an_object_up_but_not_recorded_is_adopted_not_sent_again() {
    let (a, b) = (file(P1, 10), file(S1, 5));
    let p = plan(
        &[a.clone(), b.clone()],
        &held(&[&a, &b]),
        &BTreeMap::new(),
        &key(),
    );
    assert_eq!(p.adopt, vec![recorded(&a), recorded(&b)]);
    assert!(p.upload.is_empty());
}

#[test]
fn a_recorded_object_the_bucket_lost_or_cut_is_sent_again() {
    let (a, b) = (file(P1, 10), file(P2, 10));
    let mut listing = held(&[&b]);
    listing
        .get_mut(&Kind::Pack)
        .unwrap()
        .insert(key().object_name(P2), 3);
    let journal = BTreeMap::from([
        (P1.to_string(), recorded(&a)),
        (P2.to_string(), recorded(&b)),
    ]);
    let p = plan(&[a.clone(), b.clone()], &listing, &journal, &key());
    assert_eq!(p.upload[&Kind::Pack], vec![a, b]);
}

#[test]
fn only_recorded_objects_of_gone_files_are_deleted() {
    let (a, s) = (file(P1, 10), file(S1, 5));
    let journal = BTreeMap::from([
        (P1.to_string(), recorded(&a)),
        (S1.to_string(), recorded(&s)),
    ]);
    // Both files are gone locally; the bucket also holds an object nobody recorded.
    let mut listing = held(&[&a, &s]);
    listing
        .get_mut(&Kind::Pack)
        .unwrap()
        .insert("f".repeat(64), 100);
    let p = plan(&[], &listing, &journal, &key());
    assert_eq!(p.delete[&Kind::Snapshot], vec![recorded(&s)]);
    assert_eq!(p.delete[&Kind::Pack], vec![recorded(&a)]);
    assert_eq!(p.foreign, 1);
    assert!(p.upload.is_empty());
}

#[test]
fn an_empty_store_never_deletes_what_it_did_not_record() {
    let other = file(P1, 10);
    let p = plan(&[], &held(&[&other]), &BTreeMap::new(), &key());
    assert!(p.delete.is_empty());
    assert_eq!(p.foreign, 1);
}
