//! Upload throughput through a shaped link: the client in one network namespace, moto in
//! another, the client's outgoing traffic limited by `tc tbf`. Needs root (skips without it,
//! fails under CI=true). Reports the figure; the target is 90 % of the link.

use crate::common;
use crate::server;
use crate::shaped;
use crate::store::{self, Store};

/// Link rate in bits per second, as `tc` takes it.
const RATE_MBIT: u64 = 40;

#[test]
fn upload_fills_a_shaped_link() {
    let test = "upload_fills_a_shaped_link";
    if !common::privileged(test) {
        return;
    }
    let Some(program) = server::program(test) else {
        return;
    };
    let mut net = common::netns::Net::new();
    net.host("cli");
    net.host("s3");
    let link = net.link("cli", "s3", 73);
    link.shape(&format!("{RATE_MBIT}mbit"));
    let mut cmd = net.cmd("s3", program.to_str().unwrap());
    cmd.env("PYTHONUNBUFFERED", "1");
    let s3 = server::spawn(test, cmd, &link.ip_b, 9000);

    // Six 8 MiB packs and a snapshot: 48 MiB, about 10 s at 40 Mbit/s.
    let mut st = Store::new();
    let packs: Vec<String> = (40..46)
        .map(|i| st.add_pack(&store::content(i, 8 << 20)))
        .collect();
    st.add_snapshot(1, &packs.iter().collect::<Vec<_>>());
    let netns = format!("/run/netns/{}", net.ns("cli"));
    let (bytes, secs) = shaped::upload(&s3, &netns, &st, "link", true);
    let link_bytes = (RATE_MBIT * 1_000_000 / 8) as f64;
    let achieved = bytes as f64 / secs;
    eprintln!(
        "upload through a {RATE_MBIT} Mbit/s tbf link: {bytes} bytes in {secs:.2} s = {:.1} Mbit/s, {:.0}% of the link",
        achieved * 8.0 / 1e6,
        achieved / link_bytes * 100.0
    );
    // The link is the limit: no upload can beat it (within the tbf burst).
    assert!(
        achieved <= link_bytes * 1.05,
        "{achieved} B/s through a {link_bytes} B/s link"
    );
    drop(s3);
}
