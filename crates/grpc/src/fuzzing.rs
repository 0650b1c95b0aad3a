//! Entry points for the cargo-fuzz targets (`fuzz/`, through the root
//! crate's `fuzzing` module) into this crate's private parsers. Not an API.

/// The HTTP/2 `:authority` rewriter, fed in two pieces split at the first
/// byte's value (connections deliver bytes in arbitrary chunks).
pub fn authority(data: &[u8]) {
    let split = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    let mut r = crate::authority::Rewriter::new();
    let mut out = Vec::new();
    if r.feed(&data[..split], &mut out).is_ok() {
        let _ = r.feed(&data[split..], &mut out);
    }
}

/// The HPACK decoder behind the rewriter.
pub fn hpack(data: &[u8]) {
    let mut d = crate::authority::Decoder::new();
    for block in data.split(|b| *b == 0xff) {
        if d.decode(block).is_err() {
            return;
        }
    }
}
