//! zstd with per-thread contexts: creating a context per call costs more than compressing a
//! small file.

use std::cell::RefCell;
use std::io;

thread_local! {
    static COMPRESSORS: RefCell<Vec<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(Vec::new()) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

pub fn compress(data: &[u8], level: i32) -> io::Result<Vec<u8>> {
    COMPRESSORS.with(|c| {
        let mut c = c.borrow_mut();
        if !c.iter().any(|(l, _)| *l == level) {
            c.push((level, zstd::bulk::Compressor::new(level)?));
        }
        let (_, z) = c.iter_mut().find(|(l, _)| *l == level).expect("just added");
        z.compress(data)
    })
}

/// The data compressed, when that pays: not at level 0 (compression off), not for inputs under
/// 512 bytes, and not when it saves less than 1/32 of the size (the receiver would spend more
/// time decompressing than the connection saves).
pub fn if_smaller(data: &[u8], level: i32) -> Option<Vec<u8>> {
    if level == 0 || data.len() < 512 {
        return None;
    }
    let c = compress(data, level).ok()?;
    (c.len() < data.len() - data.len() / 32).then_some(c)
}

/// Decompresses at most `capacity` bytes (more is an error).
pub fn decompress(data: &[u8], capacity: usize) -> io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new()?);
        }
        d.as_mut().expect("set").decompress(data, capacity)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn roundtrip_and_bound() {
        let data = b"hello hello hello hello hello hello".repeat(100);
        let c = super::compress(&data, 1).unwrap();
        assert!(c.len() < data.len());
        assert_eq!(super::decompress(&c, data.len()).unwrap(), data);
        assert!(super::decompress(&c, data.len() - 1).is_err());
    }

    #[test]
    fn if_smaller_only_when_it_pays() {
        let text = b"hello hello hello hello hello hello".repeat(100);
        assert!(super::if_smaller(&text, 0).is_none());
        assert!(super::if_smaller(&text[..511], 1).is_none());
        let c = super::if_smaller(&text, 1).expect("repetitive text compresses");
        assert_eq!(super::decompress(&c, text.len()).unwrap(), text);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 56) as u8
            })
            .collect();
        assert!(super::if_smaller(&noise, 1).is_none());
    }
}
