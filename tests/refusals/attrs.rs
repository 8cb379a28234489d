//! Owner and extended attributes from a hostile sender: over the limits, outside the carried
//! namespaces, with a NUL, unsorted, or an owner the kernel would read as "unchanged".

use super::*;

fn xattrs(items: &[(&[u8], &[u8])]) -> Option<Xattrs> {
    Some(Xattrs {
        items: items
            .iter()
            .map(|(n, v)| Xattr {
                name: n.to_vec(),
                value: v.to_vec(),
            })
            .collect(),
    })
}

/// An inline upsert of `path` whose entry `edit` spoils.
fn upsert_with(path: &[u8], edit: impl Fn(&mut Entry)) -> Op {
    let mut op = inline(path, b"evil");
    if let Some(op::Change::Upsert(u)) = &mut op.change {
        edit(u.entry.as_mut().unwrap());
    }
    op
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_owners_and_extended_attributes_are_refused() {
    let s = Setup::new();
    let gtls = s.pki.node("p", Role::Gpu);
    let long_name = [b"user.".as_slice(), &[b'n'; 300]].concat();
    let big = vec![b'v'; (64 << 10) + 1];
    let half = vec![b'v'; 32 << 10];
    let many: Vec<Vec<u8>> = (0..65)
        .map(|i| format!("user.{i:03}").into_bytes())
        .collect();
    type Edit = Box<dyn Fn(&mut Entry)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "name of",
            Box::new(move |e| e.xattrs = xattrs(&[(&long_name, b"")])),
        ),
        (
            "value of",
            Box::new(move |e| e.xattrs = xattrs(&[(b"user.a", &big)])),
        ),
        (
            "in all",
            Box::new(move |e| e.xattrs = xattrs(&[(b"user.a", &half), (b"user.b", &half)])),
        ),
        (
            "at most 64",
            Box::new(move |e| {
                let items: Vec<(&[u8], &[u8])> = many.iter().map(|n| (&n[..], &b""[..])).collect();
                e.xattrs = xattrs(&items);
            }),
        ),
        (
            "NUL",
            Box::new(|e| e.xattrs = xattrs(&[(b"user.a\0b", b"")])),
        ),
        (
            "outside",
            Box::new(|e| e.xattrs = xattrs(&[(b"system.posix_acl_access", b"")])),
        ),
        (
            "outside",
            Box::new(|e| e.xattrs = xattrs(&[(b"evil", b"")])),
        ),
        (
            "sorted",
            Box::new(|e| e.xattrs = xattrs(&[(b"user.b", b""), (b"user.a", b"")])),
        ),
        ("owner", Box::new(|e| e.uid = Some(u32::MAX))),
        ("owner", Box::new(|e| e.gid = Some(u32::MAX))),
    ];
    for (path, (why, edit)) in [b"new".as_slice(), b"d/f.txt"]
        .iter()
        .flat_map(|p| cases.iter().map(move |c| (*p, c)))
    {
        let mut r = raw(&s.cpu.addr, &gtls, 1).await.unwrap();
        r.begin().await;
        r.send(sync_request::Msg::Ops(Ops {
            ops: vec![upsert_with(path, edit)],
        }))
        .await;
        let e = r.recv().await.expect_err("refused");
        assert_eq!(e.code(), Code::InvalidArgument, "{why}: {e}");
        assert!(e.message().contains(why), "{e} should say {why:?}");
    }
    s.assert_intact();
    let held = standby::disk::xattr::list_path(&s.cpu.workspace.join("d/f.txt")).unwrap();
    assert!(
        held.unwrap_or_default().is_empty(),
        "no attribute reached the replica"
    );
    assert!(!s.cpu.workspace.join("new").exists());
    assert!(!s.cpu.log_text().contains("panicked"), "the agent panicked");
}
