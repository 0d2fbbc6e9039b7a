//! Reading one manifest document (YAML or JSON text, or an already parsed JSON value) into a
//! typed object, with errors that name the line and the field path, strict or lenient about
//! fields the type does not know. Pure: the callers read the files.
//!
//! Strictness matters for policies: a misspelt `fromEndpoint` would, if ignored, silently widen
//! a narrow rule to every peer, so hand-written files are read strictly. An object the API
//! server has already validated may carry fields of a newer API than this build knows; it is
//! read leniently and the unknown fields are handed back, for the compiler to report as not
//! judged rather than drop the object.

use std::fmt;

use serde::de::DeserializeOwned;

/// Where a document comes from, and in which syntax.
#[derive(Clone, Debug)]
pub enum Document<'a> {
    Yaml(&'a str),
    Json(&'a str),
    /// An object already parsed (a list item, a dynamic object from the API).
    Value(serde_json::Value),
}

/// What unknown fields do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strictness {
    /// An unknown field is an error naming it (hand-written files: `check`, `--policies`).
    Strict,
    /// Unknown fields are handed back with the object (objects the API server validated).
    Lenient,
}

/// A document that is not the object it claims to be.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct DecodeError {
    /// 1-based line within the document, when the parser knows it.
    pub line: Option<usize>,
    /// What is wrong, starting with the field path when there is one.
    pub message: String,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// A decoded object and the fields it had that its type does not know (only those under a
/// `scope` prefix, see [`decode`]), as paths like `spec.ingress[0].fromEndpoint`.
#[derive(Clone, Debug)]
pub struct Decoded<T> {
    pub object: T,
    pub unknown: Vec<String>,
}

/// Decodes `document` as a `T`. Unknown fields count only under one of `scopes` (top-level keys
/// such as `spec`): `apiVersion`, `kind`, `status` and metadata a type leaves out are never
/// unknown in a way that matters. With no scopes, unknown fields are not looked for at all.
///
/// # Errors
/// When the document is not a `T`, or (strictly) has a field under `scopes` that `T` lacks.
pub fn decode<T: DeserializeOwned>(
    document: Document<'_>,
    strictness: Strictness,
    scopes: &[&str],
) -> Result<Decoded<T>, DecodeError> {
    if scopes.is_empty() {
        return decode_plain(document).map(|object| Decoded {
            object,
            unknown: Vec::new(),
        });
    }
    let mut unknown = Vec::new();
    let mut note = |path: serde_ignored::Path<'_>| {
        let path = path_text(&path);
        if scopes.iter().any(|scope| {
            path.strip_prefix(scope)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
        }) {
            unknown.push(path);
        }
    };
    let object = match document {
        Document::Yaml(text) => {
            let de = serde_yaml_ng::Deserializer::from_str(text);
            serde_ignored::deserialize(de, &mut note).map_err(|e| yaml_error(&e))?
        }
        Document::Json(text) => {
            let mut de = serde_json::Deserializer::from_str(text);
            let object = serde_path_to_error::deserialize(serde_ignored::Deserializer::new(
                &mut de, &mut note,
            ))
            .map_err(json_error)?;
            de.end().map_err(|e| json_end_error(&e))?;
            object
        }
        Document::Value(value) => {
            serde_path_to_error::deserialize(serde_ignored::Deserializer::new(value, &mut note))
                .map_err(value_error)?
        }
    };
    if strictness == Strictness::Strict
        && let Some(first) = unknown.first()
    {
        return Err(DecodeError {
            line: None,
            message: format!("{first}: unknown field"),
        });
    }
    Ok(Decoded { object, unknown })
}

/// [`decode`] without looking for unknown fields (`serde_ignored` builds a path, with a copy of
/// the key, for every field of every object: not worth it where nothing is looked for).
fn decode_plain<T: DeserializeOwned>(document: Document<'_>) -> Result<T, DecodeError> {
    match document {
        Document::Yaml(text) => serde_yaml_ng::from_str(text).map_err(|e| yaml_error(&e)),
        Document::Json(text) => {
            let mut de = serde_json::Deserializer::from_str(text);
            let object = serde_path_to_error::deserialize(&mut de).map_err(json_error)?;
            de.end().map_err(|e| json_end_error(&e))?;
            Ok(object)
        }
        Document::Value(value) => serde_path_to_error::deserialize(value).map_err(value_error),
    }
}

fn yaml_error(e: &serde_yaml_ng::Error) -> DecodeError {
    DecodeError {
        line: e.location().map(|l| l.line()),
        message: strip_position(&e.to_string()),
    }
}

fn json_error(e: serde_path_to_error::Error<serde_json::Error>) -> DecodeError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    DecodeError {
        line: Some(inner.line()),
        message: with_path(&path, &strip_position(&inner.to_string())),
    }
}

/// Trailing characters after a JSON document.
fn json_end_error(e: &serde_json::Error) -> DecodeError {
    DecodeError {
        line: Some(e.line()),
        message: strip_position(&e.to_string()),
    }
}

fn value_error(e: serde_path_to_error::Error<serde_json::Error>) -> DecodeError {
    let path = e.path().to_string();
    DecodeError {
        line: None,
        message: with_path(&path, &e.into_inner().to_string()),
    }
}

/// `spec.ingress[0].fromEndpoint`, from `serde_ignored`'s path.
fn path_text(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", path_text(parent)),
        Path::Map { parent, key } => {
            let parent = path_text(parent);
            if parent.is_empty() {
                key.clone()
            } else {
                format!("{parent}.{key}")
            }
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => path_text(parent),
    }
}

/// A serde message without the position the parsers append (callers print their own).
fn strip_position(text: &str) -> String {
    match text.find(" at line ") {
        Some(i) => text[..i].to_owned(),
        None => text.to_owned(),
    }
}

fn with_path(path: &str, message: &str) -> String {
    if path.is_empty() || path == "." {
        message.to_owned()
    } else {
        format!("{path}: {message}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, PartialEq)]
    struct Object {
        #[serde(default)]
        spec: Spec,
    }

    #[derive(Debug, Default, serde::Deserialize, PartialEq)]
    struct Spec {
        #[serde(default)]
        rules: Vec<Rule>,
    }

    #[derive(Debug, serde::Deserialize, PartialEq)]
    struct Rule {
        port: u16,
    }

    const TEXT: &str = "kind: X\nspec:\n  rules:\n  - port: 80\n    colour: blue\n";

    #[test]
    fn strict_names_the_unknown_field_lenient_hands_it_back() {
        let err = decode::<Object>(Document::Yaml(TEXT), Strictness::Strict, &["spec"])
            .err()
            .unwrap_or_else(|| panic!("strict accepted an unknown field"));
        assert_eq!(err.message, "spec.rules[0].colour: unknown field");
        let ok = decode::<Object>(Document::Yaml(TEXT), Strictness::Lenient, &["spec"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ok.object.spec.rules, [Rule { port: 80 }]);
        assert_eq!(ok.unknown, ["spec.rules[0].colour"]);
    }

    #[test]
    fn fields_outside_the_scopes_are_not_unknown() {
        let ok = decode::<Object>(Document::Yaml(TEXT), Strictness::Strict, &["status"]);
        assert!(ok.is_ok(), "`kind` and spec fields are outside `status`");
        let ok = decode::<Object>(Document::Yaml(TEXT), Strictness::Strict, &[]);
        assert!(ok.is_ok(), "no scopes: unknown fields are not looked for");
        let value = serde_json::json!({"kind": "X", "spec": {"rules": [{"port": 1, "x": 2}]}});
        let ok = decode::<Object>(Document::Value(value), Strictness::Lenient, &["spec"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ok.unknown, ["spec.rules[0].x"]);
    }

    #[test]
    fn type_errors_carry_line_and_path() {
        let err = decode::<Object>(
            Document::Yaml("spec:\n  rules:\n  - port: [80]\n"),
            Strictness::Strict,
            &["spec"],
        )
        .err()
        .unwrap_or_else(|| panic!("accepted a list as a port"));
        assert_eq!(err.line, Some(3));
        assert!(err.message.contains("port"), "{}", err.message);
        let err = decode::<Object>(
            Document::Json("{\"spec\": {\"rules\": [{\"port\": \"x\"}]}}"),
            Strictness::Strict,
            &["spec"],
        )
        .err()
        .unwrap_or_else(|| panic!("accepted a string as a port"));
        assert!(
            err.message.starts_with("spec.rules[0].port: "),
            "{}",
            err.message
        );
    }
}
