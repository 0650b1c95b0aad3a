//! Lets clients that put a unix socket path in `:authority` reach the server.
//!
//! tonic serves HTTP/2 through `h2`, which resets with `PROTOCOL_ERROR` any request
//! whose `:authority` is not a valid URI authority (h2 `server.rs`, "malformed
//! authority"), before tonic sees it. What clients send over a unix socket
//! (sources and versions in `docs/authority.md`):
//!
//! - grpc-go with a `unix://` / `unix:` target sends `localhost` (since v1.31, grpc-go
//!   PR #3730; before it, an empty authority, grpc-go #2628). kubernetes-csi
//!   csi-lib-utils `connection.Connect` turns a bare `/path` into `unix:///path` and
//!   dials that, so the csi-addons sidecar sends `localhost`.
//! - grpc-go with a bare path target and a custom dialer sends the path (kubelet did
//!   until kubernetes PR #112597). grpcurl `-unix` up to v1.8.9 sends the path
//!   (grpcurl #442); grpc-java sends the path (grpc-java #12664); grpc C-core since
//!   1.57 a %-encoded path (grpc #38142).
//!
//! The fix: [`AuthorityFix`] wraps an accepted unix-socket connection and rewrites
//! the client-to-server byte stream. It follows the HTTP/2 frames, decodes each
//! header block (HEADERS + CONTINUATION) with HPACK while tracking the client's
//! dynamic table, and when a block carries an `:authority` that
//! [`http::uri::Authority`] rejects, re-encodes it with that value replaced by
//! `localhost`. Until the first rewrite every byte passes through unchanged; from
//! then on every block of that connection is re-encoded as never-indexed
//! literals (the server's HPACK table no longer mirrors the client's, so nothing
//! may refer to it). All other frames pass through untouched; server-to-client
//! bytes are never touched.
//!
//! Owns: the frame walker, the bounds around loona-hpack's decoder (which keeps
//! the copy of the client's dynamic table) and a literal-only encoder. Must not:
//! buffer more than one header block, interpret
//! any other frame, or panic on client input (malformed input closes the
//! connection with an I/O error, which h2 would have done anyway).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;
use tracing::{debug, warn};

/// The authority put in place of one that `h2` would reject.
const REPLACEMENT: &[u8] = b"localhost";
/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEAD_LEN: usize = 9;
/// Largest encoded header block (all fragments of one HEADERS + CONTINUATION run).
const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// Largest raw run of header frames (fragments plus frame heads and padding).
const MAX_RAW_BLOCK: usize = 2 * MAX_HEADER_BLOCK;
/// Largest decoded header list, counted as RFC 7541 does (name + value + 32 each).
const MAX_HEADER_LIST: usize = 256 * 1024;
/// Largest dynamic table a client may ask for with a size update.
const MAX_TABLE_SIZE: usize = 64 * 1024;
/// Frames we emit stay within the smallest SETTINGS_MAX_FRAME_SIZE a peer may set.
const MAX_OUT_FRAME: usize = 16_384;
/// Bytes read from the socket per poll.
const READ_CHUNK: usize = 16 * 1024;

const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;

/// Why a connection was closed instead of being passed on.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum FixError {
    /// The header block could not be decoded.
    #[error("HPACK: {0}")]
    Hpack(#[from] HpackError),
    /// A header block exceeded [`MAX_HEADER_BLOCK`].
    #[error("header block larger than {MAX_HEADER_BLOCK} bytes")]
    BlockTooLarge,
    /// A frame other than CONTINUATION for the same stream interrupted a header block.
    #[error("expected a CONTINUATION frame for stream {0}")]
    ExpectedContinuation(u32),
    /// CONTINUATION without a HEADERS frame before it.
    #[error("CONTINUATION frame outside a header block")]
    UnexpectedContinuation,
    /// A HEADERS frame too short for its padding or priority fields.
    #[error("HEADERS frame shorter than its padding and priority fields")]
    BadHeadersFrame,
}

/// A header block that is not valid HPACK (RFC 7541).
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum HpackError {
    /// What the HPACK decoder (loona-hpack) rejected: a bad index, integer or
    /// Huffman string, a truncated block, a size update above the limit.
    #[error("{0}")]
    Invalid(String),
    /// The decoded header list exceeds [`MAX_HEADER_LIST`].
    #[error("decoded header list larger than {MAX_HEADER_LIST} bytes")]
    ListTooLarge,
}

/// An I/O adapter for one server-side connection: reads are HTTP/2 from the
/// client with any unparsable `:authority` replaced by `localhost`; writes pass
/// straight through.
pub(crate) struct AuthorityFix<IO> {
    io: IO,
    rewriter: Rewriter,
    /// Bytes ready for the server, from `pending_pos` on.
    pending: Vec<u8>,
    pending_pos: usize,
    scratch: Box<[u8]>,
    eof: bool,
}

impl<IO> AuthorityFix<IO> {
    /// Wraps a freshly accepted connection (nothing read from it yet).
    pub(crate) fn new(io: IO) -> Self {
        Self {
            io,
            rewriter: Rewriter::new(),
            pending: Vec::new(),
            pending_pos: 0,
            scratch: vec![0; READ_CHUNK].into_boxed_slice(),
            eof: false,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for AuthorityFix<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            let ready = &this.pending[this.pending_pos..];
            if !ready.is_empty() {
                let n = ready.len().min(buf.remaining());
                buf.put_slice(&ready[..n]);
                this.pending_pos += n;
                if this.pending_pos == this.pending.len() {
                    this.pending.clear();
                    this.pending_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = ReadBuf::new(&mut this.scratch);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut chunk))?;
            let n = chunk.filled().len();
            if n == 0 {
                this.eof = true;
                continue;
            }
            if let Err(e) = this.rewriter.feed(&this.scratch[..n], &mut this.pending) {
                warn!(error = %e, "closing unix socket connection: malformed HTTP/2 from client");
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl<IO: Connected> Connected for AuthorityFix<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// The first 9 bytes of a frame, parsed, plus the bytes themselves.
#[derive(Clone, Copy, Debug)]
struct FrameHead {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
    raw: [u8; FRAME_HEAD_LEN],
}

impl FrameHead {
    fn parse(raw: [u8; FRAME_HEAD_LEN]) -> Self {
        let [l0, l1, l2, kind, flags, s0, s1, s2, s3] = raw;
        Self {
            len: (usize::from(l0) << 16) | (usize::from(l1) << 8) | usize::from(l2),
            kind,
            flags,
            stream: u32::from_be_bytes([s0 & 0x7f, s1, s2, s3]),
            raw,
        }
    }
}

/// Where the walker is in the client's byte stream.
enum State {
    /// Matching the connection preface; holds how many bytes matched.
    Preface(usize),
    /// Reading a frame head.
    Head([u8; FRAME_HEAD_LEN], usize),
    /// Passing on this many more payload bytes of a frame we don't inspect.
    Forward(usize),
    /// Buffering the payload of a HEADERS or CONTINUATION frame.
    Collect(FrameHead),
    /// Not HTTP/2 with prior knowledge: everything passes; the server rejects it.
    Transparent,
}

/// One header block being assembled.
struct Block {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    /// The header block fragments, concatenated.
    fragments: Vec<u8>,
    /// The frames exactly as received, for passing on unchanged.
    raw: Vec<u8>,
}

/// The synchronous core of [`AuthorityFix`]: client bytes in, server bytes out.
pub(crate) struct Rewriter {
    state: State,
    hpack: Decoder,
    /// Set by the first rewrite; from then on every block is re-encoded.
    reencode: bool,
    frame: Vec<u8>,
    block: Option<Block>,
}

impl Rewriter {
    pub(crate) fn new() -> Self {
        Self {
            state: State::Preface(0),
            hpack: Decoder::new(),
            reencode: false,
            frame: Vec::new(),
            block: None,
        }
    }

    /// Whether this connection has had a header block rewritten.
    #[cfg(test)]
    pub(crate) fn rewrote(&self) -> bool {
        self.reencode
    }

    /// Consumes client bytes and appends what the server should read to `out`.
    pub(crate) fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), FixError> {
        while !input.is_empty() {
            match &mut self.state {
                State::Transparent => {
                    out.extend_from_slice(input);
                    return Ok(());
                }
                State::Preface(matched) => {
                    let want = &PREFACE[*matched..];
                    let n = want.len().min(input.len());
                    if input[..n] != want[..n] {
                        self.state = State::Transparent;
                        continue;
                    }
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    *matched += n;
                    if *matched == PREFACE.len() {
                        self.state = State::Head([0; FRAME_HEAD_LEN], 0);
                    }
                }
                State::Head(buf, filled) => {
                    let n = (FRAME_HEAD_LEN - *filled).min(input.len());
                    buf[*filled..*filled + n].copy_from_slice(&input[..n]);
                    *filled += n;
                    input = &input[n..];
                    if *filled == FRAME_HEAD_LEN {
                        let head = FrameHead::parse(*buf);
                        self.start_frame(head, out)?;
                    }
                }
                State::Forward(remaining) => {
                    let n = (*remaining).min(input.len());
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    *remaining -= n;
                    if *remaining == 0 {
                        self.state = State::Head([0; FRAME_HEAD_LEN], 0);
                    }
                }
                State::Collect(head) => {
                    let head = *head;
                    let n = (head.len - self.frame.len()).min(input.len());
                    self.frame.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    if self.frame.len() == head.len {
                        self.finish_frame(head, out)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn start_frame(&mut self, head: FrameHead, out: &mut Vec<u8>) -> Result<(), FixError> {
        match (&self.block, head.kind) {
            (Some(block), TYPE_CONTINUATION) if block.stream == head.stream => {}
            (Some(block), _) => return Err(FixError::ExpectedContinuation(block.stream)),
            (None, TYPE_CONTINUATION) => return Err(FixError::UnexpectedContinuation),
            (None, TYPE_HEADERS) => {}
            (None, _) => {
                out.extend_from_slice(&head.raw);
                self.state = if head.len == 0 {
                    State::Head([0; FRAME_HEAD_LEN], 0)
                } else {
                    State::Forward(head.len)
                };
                return Ok(());
            }
        }
        if head.len > MAX_HEADER_BLOCK {
            return Err(FixError::BlockTooLarge);
        }
        self.frame.clear();
        if head.len == 0 {
            self.finish_frame(head, out)
        } else {
            self.state = State::Collect(head);
            Ok(())
        }
    }

    fn finish_frame(&mut self, head: FrameHead, out: &mut Vec<u8>) -> Result<(), FixError> {
        self.state = State::Head([0; FRAME_HEAD_LEN], 0);
        let payload = std::mem::take(&mut self.frame);
        let block = if head.kind == TYPE_HEADERS {
            let (fragment, priority) = split_headers_payload(head.flags, &payload)?;
            self.block.insert(Block {
                stream: head.stream,
                end_stream: head.flags & FLAG_END_STREAM != 0,
                priority,
                fragments: fragment.to_vec(),
                raw: Vec::with_capacity(FRAME_HEAD_LEN + payload.len()),
            })
        } else {
            let block = self
                .block
                .as_mut()
                .ok_or(FixError::UnexpectedContinuation)?;
            block.fragments.extend_from_slice(&payload);
            block
        };
        block.raw.extend_from_slice(&head.raw);
        block.raw.extend_from_slice(&payload);
        if block.fragments.len() > MAX_HEADER_BLOCK || block.raw.len() > MAX_RAW_BLOCK {
            return Err(FixError::BlockTooLarge);
        }
        self.frame = payload;
        if head.flags & FLAG_END_HEADERS != 0
            && let Some(block) = self.block.take()
        {
            self.finish_block(block, out)?;
        }
        Ok(())
    }

    fn finish_block(&mut self, block: Block, out: &mut Vec<u8>) -> Result<(), FixError> {
        let fields = self.hpack.decode(&block.fragments)?;
        let bad = fields
            .iter()
            .find(|f| f.name == b":authority" && !valid_authority(&f.value));
        if let Some(field) = bad
            && !self.reencode
        {
            debug!(
                authority = %String::from_utf8_lossy(&field.value),
                stream = block.stream,
                "client sent an :authority that is not a URI authority; \
                 rewriting it to localhost on this connection"
            );
            self.reencode = true;
        }
        if !self.reencode {
            out.extend_from_slice(&block.raw);
            return Ok(());
        }
        let mut encoded = Vec::with_capacity(block.fragments.len() + 64);
        for field in &fields {
            let value: &[u8] = if field.name == b":authority" && !valid_authority(&field.value) {
                REPLACEMENT
            } else {
                &field.value
            };
            encode_literal(&mut encoded, &field.name, value);
        }
        write_header_frames(
            out,
            block.stream,
            block.end_stream,
            block.priority,
            &encoded,
        );
        Ok(())
    }
}

/// Whether `h2` accepts `value` as `:authority` (it parses it exactly like this).
fn valid_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// Splits a HEADERS payload into its header block fragment and priority fields.
fn split_headers_payload(flags: u8, payload: &[u8]) -> Result<(&[u8], Option<[u8; 5]>), FixError> {
    let mut rest = payload;
    let pad = if flags & FLAG_PADDED != 0 {
        let (&pad, tail) = rest.split_first().ok_or(FixError::BadHeadersFrame)?;
        rest = tail;
        usize::from(pad)
    } else {
        0
    };
    let priority = if flags & FLAG_PRIORITY != 0 {
        let (fields, tail) = rest
            .split_first_chunk::<5>()
            .ok_or(FixError::BadHeadersFrame)?;
        rest = tail;
        Some(*fields)
    } else {
        None
    };
    let end = rest
        .len()
        .checked_sub(pad)
        .ok_or(FixError::BadHeadersFrame)?;
    Ok((&rest[..end], priority))
}

fn write_frame_head(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    let len = u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes();
    out.extend_from_slice(&[len[1], len[2], len[3], kind, flags]);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
}

/// Emits a header block as one HEADERS frame and as many CONTINUATION frames
/// as [`MAX_OUT_FRAME`] requires.
fn write_header_frames(
    out: &mut Vec<u8>,
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    block: &[u8],
) {
    let prio_len = if priority.is_some() { 5 } else { 0 };
    let (first, mut rest) = block.split_at(block.len().min(MAX_OUT_FRAME - prio_len));
    let mut flags = 0;
    if end_stream {
        flags |= FLAG_END_STREAM;
    }
    if priority.is_some() {
        flags |= FLAG_PRIORITY;
    }
    if rest.is_empty() {
        flags |= FLAG_END_HEADERS;
    }
    write_frame_head(out, first.len() + prio_len, TYPE_HEADERS, flags, stream);
    if let Some(p) = priority {
        out.extend_from_slice(&p);
    }
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(MAX_OUT_FRAME));
        let flags = if tail.is_empty() { FLAG_END_HEADERS } else { 0 };
        write_frame_head(out, chunk.len(), TYPE_CONTINUATION, flags, stream);
        out.extend_from_slice(chunk);
        rest = tail;
    }
}

/// Appends a literal field that leaves the peer's dynamic table alone:
/// "without indexing" (0x00), or "never indexed" (0x10) if the client said so.
/// A literal field, never indexed: nothing refers to the server's dynamic
/// table, and a field the client marked never indexed stays so.
fn encode_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x10);
    encode_int(out, 7, 0x00, name.len());
    out.extend_from_slice(name);
    encode_int(out, 7, 0x00, value.len());
    out.extend_from_slice(value);
}

/// RFC 7541 §5.1 integer with an N-bit prefix; `flags` fills the bits above it.
fn encode_int(out: &mut Vec<u8>, prefix_bits: u8, flags: u8, value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max as u8);
    let mut rest = value - max;
    while rest >= 0x80 {
        out.push((rest & 0x7f) as u8 | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// One decoded header field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Field {
    pub(crate) name: Vec<u8>,
    pub(crate) value: Vec<u8>,
}

/// An HPACK decoder that mirrors the client encoder's dynamic table
/// (loona-hpack's), bounded: size updates above [`MAX_TABLE_SIZE`] and
/// decoded lists above [`MAX_HEADER_LIST`] are errors.
pub(crate) struct Decoder {
    inner: loona_hpack::Decoder<'static>,
}

impl Decoder {
    pub(crate) fn new() -> Self {
        let mut inner = loona_hpack::Decoder::new();
        inner.set_max_allowed_table_size(MAX_TABLE_SIZE);
        Self { inner }
    }

    /// Decodes one complete header block, updating the dynamic table.
    pub(crate) fn decode(&mut self, block: &[u8]) -> Result<Vec<Field>, HpackError> {
        let mut fields = Vec::new();
        let mut list_size = 0usize;
        // Repeated references to a large entry would amplify a small block:
        // past the limit nothing more is copied.
        self.inner
            .decode_with_cb(block, |name, value| {
                list_size = list_size.saturating_add(name.len() + value.len() + 32);
                if list_size <= MAX_HEADER_LIST {
                    fields.push(Field {
                        name: name.into_owned(),
                        value: value.into_owned(),
                    });
                }
            })
            .map_err(|e| HpackError::Invalid(e.to_string()))?;
        if list_size > MAX_HEADER_LIST {
            return Err(HpackError::ListTooLarge);
        }
        Ok(fields)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn pairs(fields: &[Field]) -> Vec<(String, String)> {
        fields
            .iter()
            .map(|f| {
                (
                    String::from_utf8(f.name.clone()).unwrap(),
                    String::from_utf8(f.value.clone()).unwrap(),
                )
            })
            .collect()
    }

    fn owned(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn decodes_rfc7541_c4_requests_with_huffman_and_dynamic_table() {
        let mut d = Decoder::new();
        let first = d
            .decode(&hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff"))
            .unwrap();
        assert_eq!(
            pairs(&first),
            owned(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
            ])
        );
        let second = d.decode(&hex("8286 84be 5886 a8eb 1064 9cbf")).unwrap();
        assert_eq!(
            pairs(&second),
            owned(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache"),
            ])
        );
        let third = d
            .decode(&hex(
                "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
            ))
            .unwrap();
        assert_eq!(
            pairs(&third),
            owned(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value"),
            ])
        );
    }

    #[test]
    fn decoder_tracks_an_independent_encoder_through_evictions() {
        let mut enc = loona_hpack::Encoder::new();
        let mut dec = Decoder::new();
        for round in 0..50 {
            let big = "v".repeat(200 + round * 37);
            let key = format!("x-key-{round}");
            let list: Vec<(&[u8], &[u8])> = vec![
                (b":method", b"POST"),
                (b":path", b"/identity.Identity/Probe"),
                (b":authority", b"/tmp/x.sock"),
                (b"te", b"trailers"),
                (key.as_bytes(), big.as_bytes()),
                (b"x-repeat", b"same"),
            ];
            let block = enc.encode(list.iter().copied());
            let got = dec.decode(&block).unwrap();
            let want: Vec<(Vec<u8>, Vec<u8>)> =
                list.iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect();
            let got: Vec<(Vec<u8>, Vec<u8>)> = got.into_iter().map(|f| (f.name, f.value)).collect();
            assert_eq!(got, want, "round {round}");
        }
    }

    #[test]
    fn decoder_rejects_malformed_blocks() {
        let invalid = |r: Result<Vec<Field>, HpackError>| matches!(r, Err(HpackError::Invalid(_)));
        let mut d = Decoder::new();
        assert!(invalid(d.decode(&[0x80])), "index 0");
        assert!(invalid(d.decode(&[0xbe])), "index beyond both tables");
        assert!(invalid(d.decode(&[0x41, 0x05, b'a'])), "truncated");
        assert!(
            invalid(d.decode(&[0x3f, 0xe1, 0xff, 0xff, 0xff, 0x7f])),
            "integer too long"
        );
        // EOS inside a Huffman string.
        assert!(invalid(d.decode(&[0x40, 0x81, 0xff, 0x00])), "EOS");
        // A size update above the limit.
        let mut big = vec![];
        encode_int(&mut big, 5, 0x20, MAX_TABLE_SIZE + 1);
        big.push(0x82);
        assert!(invalid(d.decode(&big)), "size update above the limit");
        // Amplification through repeated references is capped.
        let mut d = Decoder::new();
        let mut block = vec![0x40, 0x01, b'x'];
        let value = vec![b'v'; 4000];
        encode_int(&mut block, 7, 0, value.len());
        block.extend_from_slice(&value);
        block.extend(std::iter::repeat_n(0xbe, 100));
        assert_eq!(d.decode(&block), Err(HpackError::ListTooLarge));
    }

    #[test]
    fn size_update_to_zero_empties_the_table() {
        let mut d = Decoder::new();
        d.decode(&[0x40, 0x01, b'a', 0x01, b'b']).unwrap();
        // The entry is index 62 until the table is emptied.
        assert_eq!(pairs(&d.decode(&[0xbe]).unwrap()), owned(&[("a", "b")]));
        let fields = d.decode(&[0x20, 0x3f, 0xe1, 0x1f, 0x82]).unwrap();
        assert_eq!(pairs(&fields), owned(&[(":method", "GET")]));
        assert!(d.decode(&[0xbe]).is_err());
    }

    // --- frame level ---

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame_head(&mut out, payload.len(), kind, flags, stream);
        out.extend_from_slice(payload);
        out
    }

    const SETTINGS: u8 = 0x4;
    const DATA: u8 = 0x0;
    const WINDOW_UPDATE: u8 = 0x8;

    fn request_block(enc: &mut loona_hpack::Encoder<'_>, authority: &[u8]) -> Vec<u8> {
        enc.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":scheme", b"http"),
            (b":path", b"/identity.Identity/GetIdentity"),
            (b":authority", authority),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ])
    }

    /// A client connection: preface, SETTINGS, then HEADERS + DATA per request.
    fn client_stream(blocks: &[Vec<u8>]) -> Vec<u8> {
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(SETTINGS, 0, 0, &[0, 4, 0, 0, 0xff, 0xff]));
        bytes.extend(frame(WINDOW_UPDATE, 0, 0, &[0, 0, 0x10, 0]));
        for (i, block) in blocks.iter().enumerate() {
            let stream = 1 + 2 * i as u32;
            bytes.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, stream, block));
            bytes.extend(frame(DATA, FLAG_END_STREAM, stream, &[0, 0, 0, 0, 0]));
        }
        bytes
    }

    /// Frames as (kind, flags, stream, payload), after the preface.
    fn frames(bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        assert_eq!(&bytes[..PREFACE.len()], PREFACE);
        let mut rest = &bytes[PREFACE.len()..];
        let mut out = Vec::new();
        while !rest.is_empty() {
            let head = FrameHead::parse(rest[..FRAME_HEAD_LEN].try_into().unwrap());
            let payload = rest[FRAME_HEAD_LEN..FRAME_HEAD_LEN + head.len].to_vec();
            out.push((head.kind, head.flags, head.stream, payload));
            rest = &rest[FRAME_HEAD_LEN + head.len..];
        }
        out
    }

    /// Header blocks in the output, decoded by an independent decoder.
    fn decoded_blocks(bytes: &[u8]) -> Vec<Vec<(String, String)>> {
        let mut dec = loona_hpack::Decoder::new();
        let mut blocks = Vec::new();
        let mut current = Vec::new();
        for (kind, flags, _, payload) in frames(bytes) {
            if kind == TYPE_HEADERS || kind == TYPE_CONTINUATION {
                let (frag, _) = if kind == TYPE_HEADERS {
                    split_headers_payload(flags, &payload).unwrap()
                } else {
                    (&payload[..], None)
                };
                current.extend_from_slice(frag);
                if flags & FLAG_END_HEADERS != 0 {
                    let list = dec.decode(&current).unwrap();
                    blocks.push(
                        list.into_iter()
                            .map(|(n, v)| {
                                (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap())
                            })
                            .collect(),
                    );
                    current.clear();
                }
            }
        }
        blocks
    }

    fn run(input: &[u8], chunk: usize) -> (Result<Vec<u8>, FixError>, bool) {
        let mut rw = Rewriter::new();
        let mut out = Vec::new();
        for piece in input.chunks(chunk) {
            if let Err(e) = rw.feed(piece, &mut out) {
                return (Err(e), rw.rewrote());
            }
        }
        (Ok(out), rw.rewrote())
    }

    #[test]
    fn valid_authorities_pass_through_byte_for_byte() {
        for authority in [
            &b"localhost"[..],
            b"localhost:50051",
            b"[::1]:8080",
            b"10.0.0.1",
        ] {
            let mut enc = loona_hpack::Encoder::new();
            let blocks = vec![
                request_block(&mut enc, authority),
                request_block(&mut enc, authority),
            ];
            let input = client_stream(&blocks);
            for chunk in [1, 7, 4096] {
                let (out, rewrote) = run(&input, chunk);
                assert_eq!(out.unwrap(), input);
                assert!(!rewrote);
            }
        }
    }

    #[test]
    fn socket_path_authority_is_rewritten_on_every_later_block() {
        let path = b"/tmp/csi/csi-addons.sock";
        let mut enc = loona_hpack::Encoder::new();
        // The second block refers to dynamic-table entries from the first ("te").
        let blocks = vec![request_block(&mut enc, path), request_block(&mut enc, path)];
        let input = client_stream(&blocks);
        for chunk in [1, 5, 100_000] {
            let (out, rewrote) = run(&input, chunk);
            let out = out.unwrap();
            assert!(rewrote);
            let decoded = decoded_blocks(&out);
            assert_eq!(decoded.len(), 2);
            for block in &decoded {
                assert_eq!(
                    block,
                    &owned(&[
                        (":method", "POST"),
                        (":scheme", "http"),
                        (":path", "/identity.Identity/GetIdentity"),
                        (":authority", "localhost"),
                        ("content-type", "application/grpc"),
                        ("te", "trailers"),
                    ])
                );
            }
            // Non-header frames are unchanged and in order.
            let kinds: Vec<(u8, u8, u32)> = frames(&out).iter().map(|f| (f.0, f.1, f.2)).collect();
            assert_eq!(
                kinds,
                vec![
                    (SETTINGS, 0, 0),
                    (WINDOW_UPDATE, 0, 0),
                    (TYPE_HEADERS, FLAG_END_HEADERS, 1),
                    (DATA, FLAG_END_STREAM, 1),
                    (TYPE_HEADERS, FLAG_END_HEADERS, 3),
                    (DATA, FLAG_END_STREAM, 3),
                ]
            );
        }
    }

    #[test]
    fn indexed_path_authority_from_the_dynamic_table_is_rewritten() {
        // Block 1 inserts ":authority: /x.sock" (literal with incremental indexing,
        // name index 1); block 2 refers to it as index 62.
        let mut block1 = vec![0x83, 0x86, 0x41, 0x07];
        block1.extend_from_slice(b"/x.sock");
        let block2 = vec![0x83, 0x86, 0xbe];
        let (out, rewrote) = run(&client_stream(&[block1, block2]), 3);
        assert!(rewrote);
        let decoded = decoded_blocks(&out.unwrap());
        let want = owned(&[
            (":method", "POST"),
            (":scheme", "http"),
            (":authority", "localhost"),
        ]);
        assert_eq!(decoded, vec![want.clone(), want]);
    }

    #[test]
    fn empty_and_huffman_coded_authorities_are_rewritten() {
        let mut huff = vec![0x83, 0x01];
        // The RFC 7541 Huffman code of the path (python hpack's encoder).
        let coded = [
            0x62, 0xcb, 0x6a, 0x60, 0x88, 0x32, 0xc3, 0x92, 0x43, 0xd4, 0x86, 0x10, 0x72, 0x75,
            0x2a, 0x7f,
        ];
        assert_eq!(
            loona_hpack::huffman::HuffmanDecoder::new()
                .decode(&coded)
                .unwrap(),
            b"/run/csi-addons/socket"
        );
        encode_int(&mut huff, 7, 0x80, coded.len());
        huff.extend_from_slice(&coded);
        for block in [vec![0x83, 0x81], vec![0x83, 0x01, 0x00], huff] {
            let (out, rewrote) = run(&client_stream(&[block]), 2);
            assert!(rewrote);
            assert_eq!(
                decoded_blocks(&out.unwrap()),
                vec![owned(&[(":method", "POST"), (":authority", "localhost")])]
            );
        }
    }

    #[test]
    fn padded_priority_and_continuation_input_is_reassembled() {
        let mut enc = loona_hpack::Encoder::new();
        let block = request_block(&mut enc, b"/tmp/a.sock");
        let (a, b) = block.split_at(10);
        let mut payload = vec![3u8]; // pad length
        payload.extend_from_slice(&[0x80, 0, 0, 0, 0x10]); // priority
        payload.extend_from_slice(a);
        payload.extend_from_slice(&[0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_PADDED | FLAG_PRIORITY | FLAG_END_STREAM,
            1,
            &payload,
        ));
        input.extend(frame(TYPE_CONTINUATION, 0, 1, &b[..3]));
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &b[3..]));
        let (out, rewrote) = run(&input, 4);
        let out = out.unwrap();
        assert!(rewrote);
        let f = frames(&out);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].1, FLAG_END_STREAM | FLAG_PRIORITY | FLAG_END_HEADERS);
        assert_eq!(&f[0].3[..5], &[0x80, 0, 0, 0, 0x10]);
        assert_eq!(
            decoded_blocks(&out)[0][3],
            (":authority".into(), "localhost".into())
        );
    }

    #[test]
    fn large_rewritten_block_is_split_into_continuation_frames() {
        let big = "b".repeat(40_000);
        let mut enc = loona_hpack::Encoder::new();
        let block = enc.encode([
            (&b":authority"[..], &b"/tmp/x.sock"[..]),
            (b"x-big", big.as_bytes()),
        ]);
        let mut input = PREFACE.to_vec();
        let (a, b) = block.split_at(16_000);
        input.extend(frame(TYPE_HEADERS, 0, 5, a));
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 5, b));
        let (out, _) = run(&input, 10_000);
        let out = out.unwrap();
        let f = frames(&out);
        assert_eq!(f.len(), 3);
        assert!(
            f.iter()
                .all(|(_, _, s, p)| *s == 5 && p.len() <= MAX_OUT_FRAME)
        );
        assert_eq!(f[0].0, TYPE_HEADERS);
        assert_eq!(f[0].1 & FLAG_END_HEADERS, 0);
        assert_eq!((f[2].0, f[2].1), (TYPE_CONTINUATION, FLAG_END_HEADERS));
        let decoded = decoded_blocks(&out);
        assert_eq!(decoded[0][0], (":authority".into(), "localhost".into()));
        assert_eq!(decoded[0][1].1.len(), 40_000);
    }

    #[test]
    fn protocol_violations_close_the_connection() {
        let headers_open = frame(TYPE_HEADERS, 0, 1, &[0x82]);
        let cases: Vec<(Vec<u8>, FixError)> = vec![
            (
                frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &[0x82]),
                FixError::UnexpectedContinuation,
            ),
            (
                [headers_open.clone(), frame(DATA, 0, 1, &[])].concat(),
                FixError::ExpectedContinuation(1),
            ),
            (
                [
                    headers_open,
                    frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 3, &[0x82]),
                ]
                .concat(),
                FixError::ExpectedContinuation(1),
            ),
            (
                frame(TYPE_HEADERS, FLAG_PADDED | FLAG_END_HEADERS, 1, &[5, 0x82]),
                FixError::BadHeadersFrame,
            ),
            (
                frame(TYPE_HEADERS, FLAG_PRIORITY | FLAG_END_HEADERS, 1, &[0, 0]),
                FixError::BadHeadersFrame,
            ),
            (
                frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &[0xff]),
                FixError::Hpack(Decoder::new().decode(&[0xff]).unwrap_err()),
            ),
            (
                {
                    let mut head = Vec::new();
                    write_frame_head(&mut head, MAX_HEADER_BLOCK + 1, TYPE_HEADERS, 0, 1);
                    head
                },
                FixError::BlockTooLarge,
            ),
            (
                [frame(TYPE_HEADERS, 0, 1, &[0x82])]
                    .into_iter()
                    .chain(std::iter::repeat_n(
                        frame(TYPE_CONTINUATION, 0, 1, &[]),
                        MAX_RAW_BLOCK / 9,
                    ))
                    .collect::<Vec<_>>()
                    .concat(),
                FixError::BlockTooLarge,
            ),
        ];
        for (frames, want) in cases {
            let input = [PREFACE.to_vec(), frames].concat();
            assert_eq!(run(&input, 1000).0, Err(want.clone()));
            assert_eq!(run(&input, 1).0, Err(want));
        }
    }

    #[test]
    fn non_http2_input_passes_through_untouched() {
        let input = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        assert_eq!(run(&input, 1).0.unwrap(), input);
        let half = [&PREFACE[..10], b"garbage"].concat();
        assert_eq!(run(&half, 3).0.unwrap(), half);
    }

    #[tokio::test]
    async fn adapter_serves_rewritten_bytes_and_passes_writes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(64);
        let mut fixed = AuthorityFix::new(server);
        let mut enc = loona_hpack::Encoder::new();
        let input = client_stream(&[request_block(&mut enc, b"/tmp/y.sock")]);
        let (expected, _) = run(&input, input.len());
        let writer = tokio::spawn(async move {
            client.write_all(&input).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        fixed.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, expected.unwrap());
        fixed.write_all(b"server bytes").await.unwrap();
        fixed.shutdown().await.unwrap();
        drop(fixed);
        assert_eq!(writer.await.unwrap(), b"server bytes");
    }
}
