//! Finds the line of a field in a YAML document, so that a validation error
//! found after parsing can still point at `file:line`.

use std::fmt;

use yaml_rust2::{
    parser::{Event, Parser},
    scanner::Marker,
};

/// One step of a path into a YAML document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    Key(&'static str),
    Index(usize),
}

/// A path such as `services[2].ports[0].port`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldPath(pub Vec<Segment>);

impl FieldPath {
    pub fn key(mut self, key: &'static str) -> Self {
        self.0.push(Segment::Key(key));
        self
    }

    pub fn index(mut self, index: usize) -> Self {
        self.0.push(Segment::Index(index));
        self
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Key(key) if i == 0 => write!(f, "{key}")?,
                Segment::Key(key) => write!(f, ".{key}")?,
                Segment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

/// The 1-based line where the node at `path` starts, or of its deepest
/// ancestor present in the document (a missing field is reported where its
/// parent is).
pub fn line_of(source: &str, path: &FieldPath) -> Option<usize> {
    let mut events = Events {
        parser: Parser::new_from_str(source),
    };
    // Skip to the first document's root node.
    loop {
        match events.next()? {
            (Event::StreamStart | Event::DocumentStart, _) => continue,
            (event, mark) => return find(&mut events, event, mark, &path.0),
        }
    }
}

struct Events<'a> {
    parser: Parser<std::str::Chars<'a>>,
}

impl Events<'_> {
    fn next(&mut self) -> Option<(Event, Marker)> {
        self.parser.next_token().ok()
    }
}

/// Walks the node that starts with `event`, looking for `path` inside it.
fn find(events: &mut Events<'_>, event: Event, mark: Marker, path: &[Segment]) -> Option<usize> {
    let here = mark.line();
    let Some((first, rest)) = path.split_first() else {
        return Some(here);
    };
    match (event, first) {
        (Event::MappingStart(..), Segment::Key(want)) => loop {
            let (key, _) = events.next()?;
            let Event::Scalar(key, ..) = key else {
                return Some(here);
            };
            let (value, value_mark) = events.next()?;
            if key == *want {
                // A scalar value sits on its key's line; report that line.
                return find(events, value, value_mark, rest).or(Some(here));
            }
            skip(events, value)?;
        },
        (Event::SequenceStart(..), Segment::Index(want)) => {
            let mut index = 0;
            loop {
                let (item, item_mark) = events.next()?;
                if item == Event::SequenceEnd {
                    return Some(here);
                }
                if index == *want {
                    return find(events, item, item_mark, rest);
                }
                skip(events, item)?;
                index += 1;
            }
        }
        _ => Some(here),
    }
}

/// Consumes the rest of the node that starts with `event`.
fn skip(events: &mut Events<'_>, event: Event) -> Option<()> {
    let mut depth = match event {
        Event::MappingStart(..) | Event::SequenceStart(..) => 1usize,
        _ => return Some(()),
    };
    while depth > 0 {
        match events.next()?.0 {
            Event::MappingStart(..) | Event::SequenceStart(..) => depth += 1,
            Event::MappingEnd | Event::SequenceEnd => depth -= 1,
            Event::StreamEnd => return None,
            _ => {}
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
node:
  name: a
services:
  - name: one
    ports: [{ port: 80 }]
  - name: two
    ports:
      - port: 81
      - port: 82
        targetPort: 9
";

    fn path(segments: &[Segment]) -> FieldPath {
        FieldPath(segments.to_vec())
    }

    #[test]
    fn finds_nested_fields() {
        use Segment::*;
        let cases: &[(&[Segment], usize)] = &[
            (&[Key("node"), Key("name")], 2),
            (&[Key("services"), Index(0), Key("name")], 4),
            (
                &[
                    Key("services"),
                    Index(0),
                    Key("ports"),
                    Index(0),
                    Key("port"),
                ],
                5,
            ),
            (&[Key("services"), Index(1)], 6),
            (
                &[
                    Key("services"),
                    Index(1),
                    Key("ports"),
                    Index(1),
                    Key("targetPort"),
                ],
                10,
            ),
            (&[Key("services"), Index(1), Key("ports"), Index(1)], 9),
        ];
        for (segments, line) in cases {
            assert_eq!(
                line_of(DOC, &path(segments)),
                Some(*line),
                "{}",
                path(segments)
            );
        }
    }

    #[test]
    fn missing_field_points_at_its_parent() {
        use Segment::*;
        assert_eq!(
            line_of(DOC, &path(&[Key("services"), Index(1), Key("vip")])),
            Some(6)
        );
        assert_eq!(line_of(DOC, &path(&[Key("services"), Index(7)])), Some(4));
    }

    #[test]
    fn displays_like_a_field_reference() {
        let p = FieldPath::default()
            .key("services")
            .index(2)
            .key("ports")
            .index(0)
            .key("port");
        assert_eq!(p.to_string(), "services[2].ports[0].port");
    }
}
