//! Formatting shared by every layer: hex digests, one-line error chains, and free text cut to
//! what a report may carry.

/// Lower-case hex of some bytes (digests, roots, nonces).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes an even number of hex digits (either case, nothing else) stand for.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// Renders an error and its sources on one line.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// The longest free text (an error, a fault's reason) an agent's report may carry; the
/// coordinator refuses a report with more (`control::wire`'s limits).
pub const REPORT_TEXT_MAX: usize = 1024;

/// `s` cut to at most `max` bytes on a character boundary.
pub fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate("short".into(), 10), "short");
        assert_eq!(truncate("abcdef".into(), 3), "abc");
        // 'é' is two bytes: cutting inside it drops it.
        assert_eq!(truncate("aé".into(), 2), "a");
        let long = truncate("ü".repeat(1000), REPORT_TEXT_MAX);
        assert!(long.len() <= REPORT_TEXT_MAX && long.chars().all(|c| c == 'ü'));
    }

    #[test]
    fn hex_round_trips_and_refuses_anything_else() {
        let bytes = [0u8, 1, 0xab, 0xff];
        assert_eq!(unhex(&hex(&bytes)).unwrap(), bytes);
        assert_eq!(unhex("ABff").unwrap(), [0xab, 0xff]);
        assert_eq!(unhex("").unwrap(), Vec::<u8>::new());
        for bad in ["abc", "+f", "-1", " f", "zz", "é0", "0x"] {
            assert_eq!(unhex(bad), None, "{bad:?}");
        }
    }
}
