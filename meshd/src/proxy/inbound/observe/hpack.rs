//! An HPACK decoder (RFC 7541) for header blocks meshd only reads: every
//! block of a direction decoded in order, so the dynamic table stays the
//! sender's. Hostile input gets an error, never a panic: integers are
//! bounded, every length is checked against the block, the table cannot
//! grow past the limit it was made with, and a Huffman string must end in
//! at most seven bits of EOS padding.

use std::{collections::VecDeque, sync::OnceLock};

/// What cannot be decoded.
#[derive(Debug, PartialEq, Eq)]
pub struct Error;

/// The size HPACK's dynamic table starts at.
const DEFAULT_SIZE: usize = 4096;
/// What an entry costs beyond its bytes (RFC 7541 §4.1).
const ENTRY_OVERHEAD: usize = 32;

/// A dynamic table entry: name and value.
type Entry = (Box<[u8]>, Box<[u8]>);

pub struct Decoder {
    table: VecDeque<Entry>,
    /// Bytes the table holds, as HPACK counts them.
    size: usize,
    /// The table's size now (set by the sender's size updates).
    max: usize,
    /// What a size update may set at most.
    limit: usize,
}

impl Decoder {
    /// A decoder whose sender may grow the table up to `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            table: VecDeque::new(),
            size: 0,
            max: DEFAULT_SIZE.min(limit),
            limit,
        }
    }

    /// Decodes one whole header block, handing each field to `on`.
    pub fn decode(&mut self, block: &[u8], mut on: impl FnMut(&[u8], &[u8])) -> Result<(), Error> {
        let mut at = 0;
        let mut scratch = (Vec::new(), Vec::new());
        while at < block.len() {
            let first = block[at];
            if first & 0x80 != 0 {
                // Indexed field.
                let index = integer(block, &mut at, 7)?;
                let (name, value) = self.get(index)?;
                on(name, value);
            } else if first & 0x40 != 0 {
                // Literal, added to the table.
                let index = integer(block, &mut at, 6)?;
                let name = self.name(block, &mut at, index, &mut scratch.0)?;
                let value = string(block, &mut at, &mut scratch.1)?;
                on(&name, &value);
                self.insert(name.into(), value.into());
            } else if first & 0x20 != 0 {
                // Dynamic table size update.
                let size = integer(block, &mut at, 5)?;
                if size > self.limit {
                    return Err(Error);
                }
                self.max = size;
                self.evict(0);
            } else {
                // Literal without indexing, or never indexed.
                let index = integer(block, &mut at, 4)?;
                let name = self.name(block, &mut at, index, &mut scratch.0)?;
                let value = string(block, &mut at, &mut scratch.1)?;
                on(&name, &value);
            }
        }
        Ok(())
    }

    fn get(&self, index: usize) -> Result<(&[u8], &[u8]), Error> {
        match index {
            0 => Err(Error),
            1..=61 => {
                let (name, value) = STATIC[index - 1];
                Ok((name.as_bytes(), value.as_bytes()))
            }
            _ => self
                .table
                .get(index - 62)
                .map(|(n, v)| (&**n, &**v))
                .ok_or(Error),
        }
    }

    /// A literal's name: an index's (if not 0), else the string that follows.
    fn name(
        &self,
        block: &[u8],
        at: &mut usize,
        index: usize,
        scratch: &mut Vec<u8>,
    ) -> Result<Vec<u8>, Error> {
        if index == 0 {
            string(block, at, scratch)
        } else {
            Ok(self.get(index)?.0.to_vec())
        }
    }

    fn insert(&mut self, name: Box<[u8]>, value: Box<[u8]>) {
        let size = name.len() + value.len() + ENTRY_OVERHEAD;
        // An entry larger than the table empties it (RFC 7541 §4.4).
        self.evict(size);
        if size <= self.max {
            self.size += size;
            self.table.push_front((name, value));
        }
    }

    /// Evicts the oldest entries until `room` more bytes fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max {
            let Some((name, value)) = self.table.pop_back() else {
                self.size = 0;
                return;
            };
            self.size -= name.len() + value.len() + ENTRY_OVERHEAD;
        }
    }
}

/// An integer with an `prefix`-bit prefix (RFC 7541 §5.1), at most 2^28.
fn integer(block: &[u8], at: &mut usize, prefix: u8) -> Result<usize, Error> {
    let mask = (1usize << prefix) - 1;
    let first = *block.get(*at).ok_or(Error)?;
    *at += 1;
    let mut value = usize::from(first) & mask;
    if value < mask {
        return Ok(value);
    }
    let mut shift = 0;
    loop {
        let byte = *block.get(*at).ok_or(Error)?;
        *at += 1;
        if shift > 21 {
            return Err(Error);
        }
        value += usize::from(byte & 0x7f) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
}

/// A string literal (RFC 7541 §5.2), Huffman-decoded if it is coded so.
fn string(block: &[u8], at: &mut usize, scratch: &mut Vec<u8>) -> Result<Vec<u8>, Error> {
    let huffman = block.get(*at).ok_or(Error)? & 0x80 != 0;
    let length = integer(block, at, 7)?;
    let end = at.checked_add(length).ok_or(Error)?;
    let raw = block.get(*at..end).ok_or(Error)?;
    *at = end;
    if huffman {
        scratch.clear();
        decode_huffman(raw, scratch)?;
        Ok(scratch.clone())
    } else {
        Ok(raw.to_vec())
    }
}

/// The Huffman code as a binary tree: `node[bit]` is the next node, or a
/// byte (`LEAF | byte`), or 0 where no code goes.
fn tree() -> &'static [[u16; 2]] {
    const LEAF: u16 = 0x8000;
    static TREE: OnceLock<Vec<[u16; 2]>> = OnceLock::new();
    TREE.get_or_init(|| {
        let mut nodes = vec![[0u16; 2]];
        for (byte, &(code, length)) in CODES.iter().enumerate() {
            let mut node = 0;
            for i in (0..length).rev() {
                let bit = usize::from((code >> i) & 1 == 1);
                if i == 0 {
                    nodes[node][bit] = LEAF | byte as u16;
                } else {
                    if nodes[node][bit] == 0 {
                        nodes.push([0; 2]);
                        nodes[node][bit] = (nodes.len() - 1) as u16;
                    }
                    node = usize::from(nodes[node][bit]);
                }
            }
        }
        nodes
    })
}

/// Appends the bytes `coded` decodes to, checking its EOS padding.
fn decode_huffman(coded: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
    let tree = tree();
    let mut node = 0usize;
    // Bits read since the last byte decoded, and whether all were ones.
    let (mut pending, mut ones) = (0u8, true);
    for &octet in coded {
        for i in (0..8).rev() {
            let bit = (octet >> i) & 1;
            let next = tree[node][usize::from(bit)];
            if next == 0 {
                return Err(Error);
            }
            pending += 1;
            ones &= bit == 1;
            if next & 0x8000 != 0 {
                out.push((next & 0xff) as u8);
                node = 0;
                pending = 0;
                ones = true;
            } else {
                node = usize::from(next);
            }
        }
    }
    if pending > 7 || !ones {
        return Err(Error);
    }
    Ok(())
}

/// RFC 7541 Appendix A.
const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// RFC 7541 Appendix B: each byte's Huffman code (right-aligned) and
/// its length in bits. (EOS, 30 ones, only ever appears as padding.)
pub const CODES: [(u32, u8); 256] = [
    (0x1ff8, 13),
    (0x7fffd8, 23),
    (0xfffffe2, 28),
    (0xfffffe3, 28),
    (0xfffffe4, 28),
    (0xfffffe5, 28),
    (0xfffffe6, 28),
    (0xfffffe7, 28),
    (0xfffffe8, 28),
    (0xffffea, 24),
    (0x3ffffffc, 30),
    (0xfffffe9, 28),
    (0xfffffea, 28),
    (0x3ffffffd, 30),
    (0xfffffeb, 28),
    (0xfffffec, 28),
    (0xfffffed, 28),
    (0xfffffee, 28),
    (0xfffffef, 28),
    (0xffffff0, 28),
    (0xffffff1, 28),
    (0xffffff2, 28),
    (0x3ffffffe, 30),
    (0xffffff3, 28),
    (0xffffff4, 28),
    (0xffffff5, 28),
    (0xffffff6, 28),
    (0xffffff7, 28),
    (0xffffff8, 28),
    (0xffffff9, 28),
    (0xffffffa, 28),
    (0xffffffb, 28),
    (0x14, 6),
    (0x3f8, 10),
    (0x3f9, 10),
    (0xffa, 12),
    (0x1ff9, 13),
    (0x15, 6),
    (0xf8, 8),
    (0x7fa, 11),
    (0x3fa, 10),
    (0x3fb, 10),
    (0xf9, 8),
    (0x7fb, 11),
    (0xfa, 8),
    (0x16, 6),
    (0x17, 6),
    (0x18, 6),
    (0x0, 5),
    (0x1, 5),
    (0x2, 5),
    (0x19, 6),
    (0x1a, 6),
    (0x1b, 6),
    (0x1c, 6),
    (0x1d, 6),
    (0x1e, 6),
    (0x1f, 6),
    (0x5c, 7),
    (0xfb, 8),
    (0x7ffc, 15),
    (0x20, 6),
    (0xffb, 12),
    (0x3fc, 10),
    (0x1ffa, 13),
    (0x21, 6),
    (0x5d, 7),
    (0x5e, 7),
    (0x5f, 7),
    (0x60, 7),
    (0x61, 7),
    (0x62, 7),
    (0x63, 7),
    (0x64, 7),
    (0x65, 7),
    (0x66, 7),
    (0x67, 7),
    (0x68, 7),
    (0x69, 7),
    (0x6a, 7),
    (0x6b, 7),
    (0x6c, 7),
    (0x6d, 7),
    (0x6e, 7),
    (0x6f, 7),
    (0x70, 7),
    (0x71, 7),
    (0x72, 7),
    (0xfc, 8),
    (0x73, 7),
    (0xfd, 8),
    (0x1ffb, 13),
    (0x7fff0, 19),
    (0x1ffc, 13),
    (0x3ffc, 14),
    (0x22, 6),
    (0x7ffd, 15),
    (0x3, 5),
    (0x23, 6),
    (0x4, 5),
    (0x24, 6),
    (0x5, 5),
    (0x25, 6),
    (0x26, 6),
    (0x27, 6),
    (0x6, 5),
    (0x74, 7),
    (0x75, 7),
    (0x28, 6),
    (0x29, 6),
    (0x2a, 6),
    (0x7, 5),
    (0x2b, 6),
    (0x76, 7),
    (0x2c, 6),
    (0x8, 5),
    (0x9, 5),
    (0x2d, 6),
    (0x77, 7),
    (0x78, 7),
    (0x79, 7),
    (0x7a, 7),
    (0x7b, 7),
    (0x7ffe, 15),
    (0x7fc, 11),
    (0x3ffd, 14),
    (0x1ffd, 13),
    (0xffffffc, 28),
    (0xfffe6, 20),
    (0x3fffd2, 22),
    (0xfffe7, 20),
    (0xfffe8, 20),
    (0x3fffd3, 22),
    (0x3fffd4, 22),
    (0x3fffd5, 22),
    (0x7fffd9, 23),
    (0x3fffd6, 22),
    (0x7fffda, 23),
    (0x7fffdb, 23),
    (0x7fffdc, 23),
    (0x7fffdd, 23),
    (0x7fffde, 23),
    (0xffffeb, 24),
    (0x7fffdf, 23),
    (0xffffec, 24),
    (0xffffed, 24),
    (0x3fffd7, 22),
    (0x7fffe0, 23),
    (0xffffee, 24),
    (0x7fffe1, 23),
    (0x7fffe2, 23),
    (0x7fffe3, 23),
    (0x7fffe4, 23),
    (0x1fffdc, 21),
    (0x3fffd8, 22),
    (0x7fffe5, 23),
    (0x3fffd9, 22),
    (0x7fffe6, 23),
    (0x7fffe7, 23),
    (0xffffef, 24),
    (0x3fffda, 22),
    (0x1fffdd, 21),
    (0xfffe9, 20),
    (0x3fffdb, 22),
    (0x3fffdc, 22),
    (0x7fffe8, 23),
    (0x7fffe9, 23),
    (0x1fffde, 21),
    (0x7fffea, 23),
    (0x3fffdd, 22),
    (0x3fffde, 22),
    (0xfffff0, 24),
    (0x1fffdf, 21),
    (0x3fffdf, 22),
    (0x7fffeb, 23),
    (0x7fffec, 23),
    (0x1fffe0, 21),
    (0x1fffe1, 21),
    (0x3fffe0, 22),
    (0x1fffe2, 21),
    (0x7fffed, 23),
    (0x3fffe1, 22),
    (0x7fffee, 23),
    (0x7fffef, 23),
    (0xfffea, 20),
    (0x3fffe2, 22),
    (0x3fffe3, 22),
    (0x3fffe4, 22),
    (0x7ffff0, 23),
    (0x3fffe5, 22),
    (0x3fffe6, 22),
    (0x7ffff1, 23),
    (0x3ffffe0, 26),
    (0x3ffffe1, 26),
    (0xfffeb, 20),
    (0x7fff1, 19),
    (0x3fffe7, 22),
    (0x7ffff2, 23),
    (0x3fffe8, 22),
    (0x1ffffec, 25),
    (0x3ffffe2, 26),
    (0x3ffffe3, 26),
    (0x3ffffe4, 26),
    (0x7ffffde, 27),
    (0x7ffffdf, 27),
    (0x3ffffe5, 26),
    (0xfffff1, 24),
    (0x1ffffed, 25),
    (0x7fff2, 19),
    (0x1fffe3, 21),
    (0x3ffffe6, 26),
    (0x7ffffe0, 27),
    (0x7ffffe1, 27),
    (0x3ffffe7, 26),
    (0x7ffffe2, 27),
    (0xfffff2, 24),
    (0x1fffe4, 21),
    (0x1fffe5, 21),
    (0x3ffffe8, 26),
    (0x3ffffe9, 26),
    (0xffffffd, 28),
    (0x7ffffe3, 27),
    (0x7ffffe4, 27),
    (0x7ffffe5, 27),
    (0xfffec, 20),
    (0xfffff3, 24),
    (0xfffed, 20),
    (0x1fffe6, 21),
    (0x3fffe9, 22),
    (0x1fffe7, 21),
    (0x1fffe8, 21),
    (0x7ffff3, 23),
    (0x3fffea, 22),
    (0x3fffeb, 22),
    (0x1ffffee, 25),
    (0x1ffffef, 25),
    (0xfffff4, 24),
    (0xfffff5, 24),
    (0x3ffffea, 26),
    (0x7ffff4, 23),
    (0x3ffffeb, 26),
    (0x7ffffe6, 27),
    (0x3ffffec, 26),
    (0x3ffffed, 26),
    (0x7ffffe7, 27),
    (0x7ffffe8, 27),
    (0x7ffffe9, 27),
    (0x7ffffea, 27),
    (0x7ffffeb, 27),
    (0xffffffe, 28),
    (0x7ffffec, 27),
    (0x7ffffed, 27),
    (0x7ffffee, 27),
    (0x7ffffef, 27),
    (0x7fffff0, 27),
    (0x3ffffee, 26),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(decoder: &mut Decoder, block: &[u8]) -> Result<Vec<(String, String)>, Error> {
        let mut fields = Vec::new();
        decoder.decode(block, |n, v| {
            fields.push((
                String::from_utf8_lossy(n).into_owned(),
                String::from_utf8_lossy(v).into_owned(),
            ))
        })?;
        Ok(fields)
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    /// RFC 7541 C.4: three requests with Huffman coding, one table.
    #[test]
    fn the_rfcs_huffman_request_examples_decode_with_their_table() {
        let mut decoder = Decoder::new(4096);
        let first = hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff");
        assert_eq!(
            decode(&mut decoder, &first),
            Ok(pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com")
            ]))
        );
        let second = hex("8286 84be 5886 a8eb 1064 9cbf");
        assert_eq!(
            decode(&mut decoder, &second),
            Ok(pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache")
            ]))
        );
        let third = hex("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf");
        assert_eq!(
            decode(&mut decoder, &third),
            Ok(pairs(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value")
            ]))
        );
        assert_eq!(decoder.size, 164);
    }

    /// RFC 7541 C.6: responses with Huffman coding and evictions (a
    /// 256-byte table).
    #[test]
    fn the_rfcs_huffman_response_examples_evict_as_the_rfc_does() {
        let mut decoder = Decoder::new(256);
        decoder.max = 256;
        let first = hex(
            "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6
             2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
        );
        assert_eq!(
            decode(&mut decoder, &first),
            Ok(pairs(&[
                (":status", "302"),
                ("cache-control", "private"),
                ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
                ("location", "https://www.example.com")
            ]))
        );
        assert_eq!(decoder.size, 222);
        let second = hex("4883 640e ffc1 c0bf");
        assert_eq!(
            decode(&mut decoder, &second),
            Ok(pairs(&[
                (":status", "307"),
                ("cache-control", "private"),
                ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
                ("location", "https://www.example.com")
            ]))
        );
        assert_eq!(decoder.size, 222);
    }

    #[test]
    fn hostile_blocks_are_errors_not_panics() {
        for block in [
            &[0xff, 0xff, 0xff, 0xff][..],
            &[0x80],                                           // index 0
            &[0xbe],                                           // index 62, empty table
            &[0x40, 0x05, b'a'],                               // a name longer than the block
            &[0x3f, 0xff, 0xff, 0xff, 0x7f],                   // a size update over the limit
            &[0x0f, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],       // an integer too large
            &[0x00, 0x81, 0x00, 0x00],                         // Huffman padding of zeros
            &[0x00, 0x85, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00], // EOS inside
        ] {
            assert_eq!(
                decode(&mut Decoder::new(4096), block),
                Err(Error),
                "{block:02x?}"
            );
        }
    }

    #[test]
    fn an_entry_larger_than_the_table_empties_it() {
        let mut decoder = Decoder::new(64);
        decoder.max = 64;
        let mut block = vec![0x40, 0x01, b'a', 0x7f, 0x00];
        block.extend([b'v'; 127]);
        assert!(decode(&mut decoder, &block).is_ok());
        assert_eq!((decoder.size, decoder.table.len()), (0, 0));
    }
}
