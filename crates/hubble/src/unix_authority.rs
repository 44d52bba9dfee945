//! Clients of the Hubble Unix socket may send the socket's path as the
//! request's `:authority` (grpc-java sends it as is, grpcio since 1.57
//! percent-encoded, grpc-swift likewise). The HTTP/2 server (h2) refuses
//! such an authority and resets the stream, so those clients cannot read
//! flows at all. Hubble (Go) accepts any authority there.
//!
//! `UnixAuthority` sits between such a connection and the server and
//! rewrites what the client sends: every header block is decoded (HPACK,
//! with the client's dynamic table) and encoded again, an `:authority` that
//! is not a valid authority becoming `localhost`; every other frame passes
//! byte for byte. The server's bytes are not touched. A malformed frame
//! sequence or header block ends the connection, as the server would.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

use crate::limits::Client;

const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
/// HTTP/2's default SETTINGS_MAX_FRAME_SIZE, which the server keeps: no
/// header frame may exceed it, and rewritten blocks are cut to it.
const MAX_FRAME: usize = 16_384;
/// A header block (HEADERS and its CONTINUATIONs) larger than this ends the
/// connection: gRPC requests' headers are a few hundred bytes.
const MAX_BLOCK: usize = 256 * 1024;

const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;

/// What the server is sent for an `:authority` it would refuse.
const LOCAL_AUTHORITY: &[u8] = b"localhost";

/// A Unix-socket connection whose client's header blocks are rewritten
/// (see the module comment).
pub struct UnixAuthority<T> {
    io: T,
    rewriter: Rewriter,
}

impl<T> UnixAuthority<T> {
    pub fn new(io: T) -> Self {
        UnixAuthority {
            io,
            rewriter: Rewriter::default(),
        }
    }
}

/// The client-to-server byte stream's state.
struct Rewriter {
    /// Read from the client, not yet processed (at most one frame).
    input: Vec<u8>,
    /// Processed, for the server; `sent` of it already given.
    output: Vec<u8>,
    sent: usize,
    preface_left: usize,
    /// Payload bytes of a frame passed through that are still to come.
    passthrough_left: usize,
    /// A HEADERS frame waiting for its CONTINUATIONs.
    block: Option<PendingBlock>,
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
    /// Set once the client sent something malformed: reads fail from then.
    failed: Option<String>,
}

struct PendingBlock {
    stream_id: [u8; 4],
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

impl Default for Rewriter {
    fn default() -> Self {
        Rewriter {
            input: Vec::new(),
            output: Vec::new(),
            sent: 0,
            preface_left: PREFACE_LEN,
            passthrough_left: 0,
            block: None,
            decoder: loona_hpack::Decoder::new(),
            encoder: loona_hpack::Encoder::new(),
            failed: None,
        }
    }
}

impl Rewriter {
    /// Takes `bytes` from the client and moves what can be processed to
    /// `output`.
    fn feed(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.input.extend_from_slice(bytes);
        loop {
            if self.preface_left > 0 || self.passthrough_left > 0 {
                let left = self.preface_left.max(self.passthrough_left);
                let n = left.min(self.input.len());
                if n == 0 {
                    return Ok(());
                }
                self.output.extend(self.input.drain(..n));
                if self.preface_left > 0 {
                    self.preface_left -= n;
                } else {
                    self.passthrough_left -= n;
                }
                continue;
            }
            if self.input.len() < FRAME_HEADER_LEN {
                return Ok(());
            }
            let len = u32::from_be_bytes([0, self.input[0], self.input[1], self.input[2]]) as usize;
            let kind = self.input[3];
            if kind != TYPE_HEADERS && kind != TYPE_CONTINUATION {
                if self.block.is_some() {
                    return Err("a frame other than CONTINUATION inside a header block".into());
                }
                self.output.extend(self.input.drain(..FRAME_HEADER_LEN));
                self.passthrough_left = len;
                continue;
            }
            if len > MAX_FRAME {
                return Err(format!("a header frame of {len} bytes"));
            }
            if self.input.len() < FRAME_HEADER_LEN + len {
                return Ok(());
            }
            let frame: Vec<u8> = self.input.drain(..FRAME_HEADER_LEN + len).collect();
            self.header_frame(&frame)?;
        }
    }

    fn header_frame(&mut self, frame: &[u8]) -> Result<(), String> {
        let (kind, flags) = (frame[3], frame[4]);
        let stream_id: [u8; 4] = [frame[5], frame[6], frame[7], frame[8]];
        let mut payload = &frame[FRAME_HEADER_LEN..];
        if kind == TYPE_HEADERS {
            if self.block.is_some() {
                return Err("HEADERS inside a header block".into());
            }
            if flags & FLAG_PADDED != 0 {
                let (&pad, rest) = payload
                    .split_first()
                    .ok_or("HEADERS without its pad length")?;
                let keep = rest
                    .len()
                    .checked_sub(pad as usize)
                    .ok_or("HEADERS padding longer than the frame")?;
                payload = &rest[..keep];
            }
            let priority = if flags & FLAG_PRIORITY != 0 {
                let p: [u8; 5] = payload
                    .get(..5)
                    .and_then(|p| p.try_into().ok())
                    .ok_or("HEADERS shorter than its priority")?;
                payload = &payload[5..];
                Some(p)
            } else {
                None
            };
            self.block = Some(PendingBlock {
                stream_id,
                end_stream: flags & FLAG_END_STREAM != 0,
                priority,
                fragment: payload.to_vec(),
            });
        } else {
            let block = self
                .block
                .as_mut()
                .ok_or("CONTINUATION outside a header block")?;
            if block.stream_id != stream_id {
                return Err("CONTINUATION of another stream".into());
            }
            if block.fragment.len() + payload.len() > MAX_BLOCK {
                return Err(format!("a header block over {MAX_BLOCK} bytes"));
            }
            block.fragment.extend_from_slice(payload);
        }
        if flags & FLAG_END_HEADERS != 0 {
            if let Some(block) = self.block.take() {
                self.rewrite(block)?;
            }
        }
        Ok(())
    }

    /// Decodes a whole header block and writes it again, fixed.
    fn rewrite(&mut self, block: PendingBlock) -> Result<(), String> {
        let mut headers: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        self.decoder
            .decode_with_cb(&block.fragment, |name, value| {
                let value = if &name[..] == b":authority" && !valid_authority(&value) {
                    LOCAL_AUTHORITY.to_vec()
                } else {
                    value.into_owned()
                };
                headers.push((name.into_owned(), value));
            })
            .map_err(|e| format!("a header block that does not decode: {e:?}"))?;
        let encoded = self
            .encoder
            .encode(headers.iter().map(|(n, v)| (&n[..], &v[..])));
        let mut first = true;
        let mut rest = &encoded[..];
        loop {
            let room = if first && block.priority.is_some() {
                MAX_FRAME - 5
            } else {
                MAX_FRAME
            };
            let (chunk, after) = rest.split_at(rest.len().min(room));
            let mut flags = if after.is_empty() {
                FLAG_END_HEADERS
            } else {
                0
            };
            let kind = if first {
                if block.end_stream {
                    flags |= FLAG_END_STREAM;
                }
                if block.priority.is_some() {
                    flags |= FLAG_PRIORITY;
                }
                TYPE_HEADERS
            } else {
                TYPE_CONTINUATION
            };
            let priority = if first {
                block.priority.as_ref().map(|p| &p[..])
            } else {
                None
            };
            let len = chunk.len() + priority.map_or(0, |p| p.len());
            self.output
                .extend_from_slice(&(len as u32).to_be_bytes()[1..]);
            self.output.extend_from_slice(&[kind, flags]);
            self.output.extend_from_slice(&block.stream_id);
            if let Some(p) = priority {
                self.output.extend_from_slice(p);
            }
            self.output.extend_from_slice(chunk);
            first = false;
            rest = after;
            if rest.is_empty() {
                return Ok(());
            }
        }
    }
}

/// Whether the server accepts `value` as an `:authority`.
fn valid_authority(value: &[u8]) -> bool {
    tonic::codegen::http::uri::Authority::try_from(value).is_ok()
}

impl<T: AsyncRead + Unpin> AsyncRead for UnixAuthority<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            let r = &mut this.rewriter;
            if r.sent < r.output.len() {
                let n = (r.output.len() - r.sent).min(buf.remaining());
                buf.put_slice(&r.output[r.sent..r.sent + n]);
                r.sent += n;
                if r.sent == r.output.len() {
                    r.output.clear();
                    r.sent = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if let Some(why) = &r.failed {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, why.clone())));
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.io).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if read.filled().is_empty() => {
                    // The client closed: whatever partial frame is left goes
                    // to the server as it is, which then sees the truncation.
                    r.output.append(&mut r.input);
                    if r.output.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(Ok(())) => {
                    if let Err(why) = r.feed(read.filled()) {
                        tracing::debug!(error = %why, "Hubble Unix socket: malformed HTTP/2 from a client");
                        r.failed = Some(why);
                    }
                }
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for UnixAuthority<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<T: Connected> Connected for UnixAuthority<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<T: Client> Client for UnixAuthority<T> {
    fn client(&self) -> Option<String> {
        self.io.client()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn decode_blocks(mut bytes: &[u8]) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut dec = loona_hpack::Decoder::new();
        let mut blocks = Vec::new();
        let mut block = Vec::new();
        while bytes.len() >= FRAME_HEADER_LEN {
            let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
            let (kind, flags) = (bytes[3], bytes[4]);
            let mut payload = &bytes[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len];
            if kind == TYPE_HEADERS && flags & FLAG_PRIORITY != 0 {
                payload = &payload[5..];
            }
            if kind == TYPE_HEADERS || kind == TYPE_CONTINUATION {
                block.extend_from_slice(payload);
                if flags & FLAG_END_HEADERS != 0 {
                    blocks.push(dec.decode(&block).unwrap());
                    block.clear();
                }
            }
            bytes = &bytes[FRAME_HEADER_LEN + len..];
        }
        blocks
    }

    fn request(authority: &[u8], big: usize) -> Vec<(&'static [u8], Vec<u8>)> {
        vec![
            (b":method", b"POST".to_vec()),
            (b":path", b"/observer.Observer/ServerStatus".to_vec()),
            (b":authority", authority.to_vec()),
            (b"x-big", vec![b'a'; big]),
        ]
    }

    /// Two requests over one connection (the second reuses the client's
    /// dynamic table), one padded with a priority and split into
    /// CONTINUATIONs, fed a byte at a time: the server's side sees the
    /// same headers, the path authority replaced, every other frame as it
    /// was.
    #[test]
    fn header_blocks_are_rewritten_and_other_frames_pass() {
        let mut enc = loona_hpack::Encoder::new();
        let mut client = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        client.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        let first = enc.encode(
            request(b"/run/hubble.sock", 20_000)
                .iter()
                .map(|(n, v)| (*n, &v[..])),
        );
        let mut padded = vec![3u8];
        padded.extend_from_slice(&[0, 0, 0, 0, 7]);
        let (a, b) = first.split_at(10_000);
        padded.extend_from_slice(a);
        padded.extend_from_slice(&[0, 0, 0]);
        client.extend(frame(TYPE_HEADERS, FLAG_PADDED | FLAG_PRIORITY, 1, &padded));
        client.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, b));
        let data = frame(0x0, FLAG_END_STREAM, 1, &[0, 0, 0, 0, 0]);
        client.extend(data.clone());
        let second = enc.encode(
            request(b"%2Frun%2Fhubble.sock", 2_000)
                .iter()
                .map(|(n, v)| (*n, &v[..])),
        );
        client.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS | FLAG_END_STREAM,
            3,
            &second,
        ));

        let mut r = Rewriter::default();
        for byte in &client {
            r.feed(std::slice::from_ref(byte)).unwrap();
        }
        assert!(r.input.is_empty());
        let out = &r.output;
        assert_eq!(&out[..PREFACE_LEN + 9], &client[..PREFACE_LEN + 9]);
        let blocks = decode_blocks(&out[PREFACE_LEN + 9..]);
        assert_eq!(blocks.len(), 2);
        for block in &blocks {
            let authority = block.iter().find(|(n, _)| n == b":authority").unwrap();
            assert_eq!(authority.1, b"localhost");
        }
        let big =
            |b: &Vec<(Vec<u8>, Vec<u8>)>| b.iter().find(|(n, _)| n == b"x-big").unwrap().1.len();
        assert_eq!((big(&blocks[0]), big(&blocks[1])), (20_000, 2_000));
        let pos = out.windows(data.len()).position(|w| w == &data[..]);
        assert!(pos.is_some(), "the DATA frame passed unchanged");
    }

    #[test]
    fn a_valid_authority_is_kept_and_malformed_sequences_fail() {
        let mut enc = loona_hpack::Encoder::new();
        let block = enc.encode([(&b":authority"[..], &b"localhost:4245"[..])]);
        let mut r = Rewriter {
            preface_left: 0,
            ..Default::default()
        };
        r.feed(&frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block))
            .unwrap();
        assert_eq!(decode_blocks(&r.output)[0][0].1, b"localhost:4245");

        let mut r = Rewriter {
            preface_left: 0,
            ..Default::default()
        };
        let err = r.feed(&frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &block));
        assert!(err.unwrap_err().contains("outside a header block"));
        let mut r = Rewriter {
            preface_left: 0,
            ..Default::default()
        };
        r.feed(&frame(TYPE_HEADERS, 0, 1, &block)).unwrap();
        let err = r.feed(&frame(0x0, 0, 1, &[]));
        assert!(err.unwrap_err().contains("inside a header block"));
        let mut r = Rewriter {
            preface_left: 0,
            ..Default::default()
        };
        let err = r.feed(&frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            1,
            &[0xff, 0xff, 0xff],
        ));
        assert!(err.unwrap_err().contains("does not decode"));
        let mut r = Rewriter {
            preface_left: 0,
            ..Default::default()
        };
        let err = r.feed(&frame(
            TYPE_HEADERS,
            FLAG_PADDED | FLAG_END_HEADERS,
            1,
            &[9, 1],
        ));
        assert!(err.unwrap_err().contains("padding"));
    }
}
