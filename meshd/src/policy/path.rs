//! Request paths as the backend will see them, before any route or policy
//! looks at them: what a rule matches must be what the backend serves, or
//! `/public/../admin` walks past a rule on `/admin`. Istio's
//! `pathNormalization` choices; pure string work.

use std::fmt;

/// How much a path is normalized (Istio's names, kebab-case).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Normalization {
    /// RFC 3986: percent-escapes of unreserved characters decoded, `.` and
    /// `..` segments resolved, `\` taken as `/`.
    Base,
    /// `base`, and runs of `/` merged into one — the default: nginx and
    /// most frameworks merge them, so `//admin` is `/admin` to the backend.
    #[default]
    MergeSlashes,
    /// `merge-slashes`, and `%2F` / `%5C` decoded to `/` (for backends
    /// that decode them before routing).
    DecodeAndMergeSlashes,
}

/// Why a path was refused (answered 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// Not starting with `/` (an HTTP/2 `:path` may try).
    NotAbsolute,
    /// A `%` not followed by two hex digits.
    BadEscape,
    /// An encoded `/` or `\` the mode does not decode: the backend might.
    EncodedSlash,
    /// A control character, or a decoded NUL.
    Control,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotAbsolute => "the path does not start with /",
            Self::BadEscape => "a % not followed by two hex digits",
            Self::EncodedSlash => "an encoded / or \\ (not decoded in this mode)",
            Self::Control => "a control character",
        })
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~".contains(&b)
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// The normalized form of `path` (without its query), or why it is refused.
pub fn normalize(path: &str, mode: Normalization) -> Result<String, Invalid> {
    if !path.starts_with('/') {
        return Err(Invalid::NotAbsolute);
    }
    // Most paths are normal already: nothing to decode, merge or resolve.
    let plain = path
        .bytes()
        .all(|b| b > 0x20 && b != 0x7f && b != b'%' && b != b'\\');
    if plain && !path.contains("//") && !path.contains("/.") {
        return Ok(path.to_owned());
    }
    // 1. Escapes: unreserved ones decoded (and slashes, when the mode says);
    //    the rest kept, upper-cased.
    // Bytes, not chars: a non-ASCII byte stays the byte it was (pushing it
    // as a char would re-encode it, and change the path the backend gets).
    let bytes = path.as_bytes();
    let mut decoded: Vec<u8> = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b < 0x20 || b == 0x7f {
            return Err(Invalid::Control);
        }
        if b != b'%' {
            decoded.push(if b == b'\\' { b'/' } else { b });
            i += 1;
            continue;
        }
        let (Some(hi), Some(lo)) = (
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(Invalid::BadEscape);
        };
        let value = hi << 4 | lo;
        match value {
            b'/' | b'\\' if mode == Normalization::DecodeAndMergeSlashes => decoded.push(b'/'),
            b'/' | b'\\' => return Err(Invalid::EncodedSlash),
            0 => return Err(Invalid::Control),
            v if unreserved(v) => decoded.push(v),
            v => {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                decoded.extend([b'%', HEX[usize::from(v >> 4)], HEX[usize::from(v & 15)]]);
            }
        }
        i += 3;
    }
    // Only ASCII was decoded, so the path is as valid UTF-8 as it came.
    let decoded = String::from_utf8(decoded).map_err(|_| Invalid::Control)?;
    // 2. Segments: `.` dropped, `..` pops, empty ones merged when asked.
    let merge = mode != Normalization::Base;
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    let mut segments: Vec<&str> = Vec::new();
    let mut parts = decoded[1..].split('/').peekable();
    while let Some(segment) = parts.next() {
        match segment {
            "." => {}
            ".." => {
                segments.pop();
            }
            "" if merge || parts.peek().is_none() => {}
            other => segments.push(other),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if out.is_empty() || trailing {
        out.push('/');
    }
    Ok(out)
}

/// Whether `method` is a lower- or mixed-case spelling of a standard
/// method: refused, as Envoy's parser does, since a rule on `DELETE` would
/// not see it while a lenient backend might act on it.
pub fn miscased_method(method: &str) -> bool {
    const STANDARD: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
    ];
    !STANDARD.contains(&method) && STANDARD.iter().any(|m| m.eq_ignore_ascii_case(method))
}

#[cfg(test)]
mod tests {
    use super::*;
    use Normalization::*;

    #[test]
    fn non_ascii_bytes_are_kept_as_they_came() {
        // Found by fuzzing (`cargo xtask fuzz --target path_policy`): the
        // bytes of a non-ASCII character were pushed as chars, re-encoding
        // them, so the backend got another path and normalizing twice
        // changed it again.
        for mode in [
            Normalization::Base,
            Normalization::MergeSlashes,
            Normalization::DecodeAndMergeSlashes,
        ] {
            let once = normalize("//\u{1cf}/./é", mode).expect("valid");
            assert!(once.ends_with("/\u{1cf}/é"), "{once:?}");
            assert_eq!(normalize(&once, mode).as_deref(), Ok(once.as_str()));
        }
    }

    #[test]
    fn paths_normalize_as_the_backend_will_see_them() {
        let cases: [(&str, Normalization, Result<&str, Invalid>); 22] = [
            ("/admin", MergeSlashes, Ok("/admin")),
            ("//admin", MergeSlashes, Ok("/admin")),
            ("//admin", Base, Ok("//admin")),
            ("/./admin", Base, Ok("/admin")),
            ("/public/../admin", Base, Ok("/admin")),
            ("/public/../../admin", Base, Ok("/admin")),
            ("/%61dmin", Base, Ok("/admin")),
            ("/%7euser", Base, Ok("/~user")),
            ("/a%20b", Base, Ok("/a%20b")),
            ("/a%2fb", MergeSlashes, Err(Invalid::EncodedSlash)),
            ("/a%5Cb", Base, Err(Invalid::EncodedSlash)),
            ("/a%2Fb", DecodeAndMergeSlashes, Ok("/a/b")),
            ("/a\\..\\admin", Base, Ok("/admin")),
            ("/a/", MergeSlashes, Ok("/a/")),
            ("/a/.", MergeSlashes, Ok("/a/")),
            ("/a/b/..", MergeSlashes, Ok("/a/")),
            ("/", MergeSlashes, Ok("/")),
            ("/..", MergeSlashes, Ok("/")),
            ("admin", MergeSlashes, Err(Invalid::NotAbsolute)),
            ("/%zz", MergeSlashes, Err(Invalid::BadEscape)),
            ("/%4", MergeSlashes, Err(Invalid::BadEscape)),
            ("/a%00", MergeSlashes, Err(Invalid::Control)),
        ];
        for (path, mode, want) in cases {
            let got = normalize(path, mode);
            assert_eq!(got.as_deref().map_err(|e| *e), want, "{path} {mode:?}");
        }
    }

    #[test]
    fn lower_case_standard_methods_are_refused() {
        assert!(miscased_method("delete"));
        assert!(miscased_method("Get"));
        assert!(!miscased_method("DELETE"));
        assert!(!miscased_method("PURGE"), "an extension method is its own");
    }
}
