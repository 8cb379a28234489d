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
}
