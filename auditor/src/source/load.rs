//! Reads Kubernetes objects from YAML and JSON files (multi-document, `List` kinds) into
//! changes, keeping where each object came from so every error names a file and a line. Kinds
//! no store uses are skipped; malformed objects of the kinds it reads are errors.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::Change;
use super::kinds::{self, Reader};
use super::manifest::{ReadError, is_manifest, manifests};
use crate::decode::{Document, Strictness};

/// Where an object starts: a file and a 1-based line (of its document, or of the object inside
/// a JSON/`List` document when the line is known).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
    /// For an item of a `List`: its index.
    pub item: Option<usize>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)?;
        if let Some(i) = self.item {
            write!(f, " (items[{i}])")?;
        }
        Ok(())
    }
}

/// One change read from a file.
#[derive(Clone, Debug)]
pub struct Located {
    pub location: Location,
    /// `Kind namespace/name`, for messages.
    pub name: String,
    pub change: Change,
}

/// Which objects to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Select {
    /// Namespaces, Nodes, Pods, Services, `EndpointSlices` (and Endpoints).
    pub inventory: bool,
    /// Every kind of the policy kind table.
    pub policies: bool,
}

impl Select {
    pub const ALL: Self = Self {
        inventory: true,
        policies: true,
    };
    pub const POLICIES: Self = Self {
        inventory: false,
        policies: true,
    };
    pub const INVENTORY: Self = Self {
        inventory: true,
        policies: false,
    };

    fn wants(self, reader: &Reader) -> bool {
        if reader.is_policy() {
            self.policies
        } else {
            self.inventory
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("{}: not a YAML or JSON file (.yaml, .yml, .json)", path.display())]
    NotAManifest { path: PathBuf },
    #[error("{}:{line}: {message}", file.display())]
    Syntax {
        file: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{at}: {object}: {message}")]
    Object {
        at: Location,
        object: String,
        message: String,
    },
}

/// Loads every manifest under the given files and directories, in a stable order; stops at the
/// first error.
///
/// # Errors
/// The first file that cannot be read, parsed or converted.
pub fn load_paths(
    paths: &[PathBuf],
    select: Select,
    strictness: Strictness,
) -> Result<Vec<Located>, LoadError> {
    let mut out = Vec::new();
    for path in paths {
        for file in manifests(path)? {
            out.extend(load_file(&file, select, strictness)?);
        }
    }
    Ok(out)
}

/// Loads one file; a file named explicitly must still be YAML or JSON.
///
/// # Errors
/// When it cannot be read, is not a manifest, or holds an object that cannot be used.
pub fn load_file(
    path: &Path,
    select: Select,
    strictness: Strictness,
) -> Result<Vec<Located>, LoadError> {
    if !is_manifest(path) {
        return Err(LoadError::NotAManifest {
            path: path.to_path_buf(),
        });
    }
    let bytes = std::fs::read(path).map_err(|source| ReadError {
        path: path.to_path_buf(),
        source,
    })?;
    let text = String::from_utf8(bytes).map_err(|e| LoadError::Syntax {
        file: path.to_path_buf(),
        line: e.as_bytes()[..e.utf8_error().valid_up_to()]
            .split(|b| *b == b'\n')
            .count(),
        message: "not UTF-8 text".to_owned(),
    })?;
    load_text(path, &text, select, strictness)
}

/// Parses manifests from text; `path` decides JSON vs YAML and names the source in errors.
///
/// # Errors
/// When the text holds an object that cannot be used.
pub fn load_text(
    path: &Path,
    text: &str,
    select: Select,
    strictness: Strictness,
) -> Result<Vec<Located>, LoadError> {
    let mut out = Vec::new();
    let json = path.extension().and_then(|e| e.to_str()) == Some("json");
    let reading = Reading {
        path,
        select,
        strictness,
    };
    if json {
        reading.document(text, 1, Format::Json, &mut out)?;
    } else {
        for (start, doc) in split_documents(text) {
            reading.document(doc, start, Format::Yaml, &mut out)?;
        }
    }
    Ok(out)
}

/// Splits a YAML stream at its document markers, giving each document with its first line.
/// YAML forbids `---` and `...` at the start of a line inside content, so this is exact.
#[must_use]
pub fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut docs = Vec::new();
    let mut start_byte = 0;
    let mut start_line = 1;
    let mut offset = 0;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let body = line.trim_end_matches(['\n', '\r']);
        let marker = |m: &str| {
            body.strip_prefix(m)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
        };
        if marker("---") {
            docs.push((start_line, &text[start_byte..offset]));
            // The marker line stays with its document: it may carry content (`--- {a: 1}`).
            start_byte = offset;
            start_line = index + 1;
        } else if marker("...") {
            docs.push((start_line, &text[start_byte..offset]));
            start_byte = offset + line.len();
            start_line = index + 2;
        }
        offset += line.len();
    }
    docs.push((start_line, &text[start_byte..]));
    docs.retain(|(_, doc)| !is_blank_document(doc));
    docs
}

fn is_blank_document(doc: &str) -> bool {
    doc.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#') || l == "---"
    })
}

#[derive(Clone, Copy)]
enum Format {
    Yaml,
    Json,
}

impl Format {
    fn document(self, text: &str) -> Document<'_> {
        match self {
            Self::Yaml => Document::Yaml(text),
            Self::Json => Document::Json(text),
        }
    }
}

/// Just enough of an object to know what it is.
#[derive(Deserialize)]
struct Header {
    #[serde(default)]
    kind: Option<String>,
    #[serde(default, rename = "apiVersion")]
    api_version: Option<String>,
    #[serde(default)]
    metadata: Option<HeaderMeta>,
}

#[derive(Deserialize)]
struct HeaderMeta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
}

#[derive(Deserialize)]
struct ListDoc {
    #[serde(default)]
    items: Vec<serde_json::Value>,
}

fn display_name(header: &Header) -> String {
    let kind = header.kind.as_deref().unwrap_or("object");
    let (ns, name) = match &header.metadata {
        Some(m) => (m.namespace.as_deref(), m.name.as_deref()),
        None => (None, None),
    };
    let name = name.unwrap_or("<unnamed>");
    match ns {
        Some(ns) if !ns.is_empty() => format!("{kind} {ns}/{name}"),
        _ => format!("{kind} {name}"),
    }
}

/// A header or list, leniently (only the fields these have matter).
fn parse_shallow<T: serde::de::DeserializeOwned>(
    text: &str,
    format: Format,
) -> Result<T, crate::decode::DecodeError> {
    crate::decode::decode::<T>(format.document(text), Strictness::Lenient, &[]).map(|d| d.object)
}

struct Reading<'a> {
    path: &'a Path,
    select: Select,
    strictness: Strictness,
}

impl Reading<'_> {
    fn document(
        &self,
        text: &str,
        start_line: usize,
        format: Format,
        out: &mut Vec<Located>,
    ) -> Result<(), LoadError> {
        let path = self.path;
        let at = |line: Option<usize>| start_line + line.unwrap_or(1).saturating_sub(1);
        let header: Header = parse_shallow(text, format).map_err(|e| LoadError::Syntax {
            file: path.to_path_buf(),
            line: at(e.line),
            message: if e.message.contains("invalid type") {
                format!("not a Kubernetes object: {}", e.message)
            } else {
                e.message
            },
        })?;
        let Some(kind) = header.kind.as_deref() else {
            return Err(LoadError::Syntax {
                file: path.to_path_buf(),
                line: start_line,
                message: "not a Kubernetes object: no `kind`".to_owned(),
            });
        };
        let location = Location {
            file: path.to_path_buf(),
            line: start_line,
            item: None,
        };
        if kind == "List" || kind.ends_with("List") && header.api_version.is_some() {
            let list: ListDoc = parse_shallow(text, format).map_err(|e| LoadError::Syntax {
                file: path.to_path_buf(),
                line: at(e.line),
                message: e.message,
            })?;
            // `kind: PodList` items may omit their kind.
            let item_kind = header.kind.as_deref().and_then(|k| k.strip_suffix("List"));
            for (i, item) in list.items.into_iter().enumerate() {
                let location = Location {
                    item: Some(i),
                    ..location.clone()
                };
                self.list_item(item, item_kind, &location, out)?;
            }
            return Ok(());
        }
        let Some(reader) = kinds::reader(kind, header.api_version.as_deref()) else {
            return Ok(());
        };
        if !self.select.wants(&reader) {
            return Ok(());
        }
        let name = display_name(&header);
        let changes = reader
            .read(format.document(text), self.strictness)
            .map_err(|problem| LoadError::Object {
                at: Location {
                    line: at(problem.line),
                    ..location.clone()
                },
                object: name.clone(),
                message: problem.message,
            })?;
        push(out, &location, &name, changes);
        Ok(())
    }

    fn list_item(
        &self,
        mut item: serde_json::Value,
        item_kind: Option<&str>,
        location: &Location,
        out: &mut Vec<Located>,
    ) -> Result<(), LoadError> {
        let header: Header =
            serde_json::from_value(item.clone()).map_err(|e| LoadError::Object {
                at: location.clone(),
                object: "object".to_owned(),
                message: e.to_string(),
            })?;
        let name = display_name(&header);
        let Some(kind) = header.kind.as_deref().or(item_kind) else {
            return Ok(());
        };
        let Some(reader) = kinds::reader(kind, header.api_version.as_deref()) else {
            return Ok(());
        };
        if !self.select.wants(&reader) {
            return Ok(());
        }
        // Typed objects insist on their own apiVersion and kind, which list items may leave out.
        if let Some(map) = item.as_object_mut() {
            map.entry("kind").or_insert_with(|| kind.into());
            map.entry("apiVersion")
                .or_insert_with(|| reader.api_version().into());
        }
        let changes = reader
            .read(Document::Value(item), self.strictness)
            .map_err(|problem| LoadError::Object {
                at: location.clone(),
                object: name.clone(),
                message: problem.message,
            })?;
        push(out, location, &name, changes);
        Ok(())
    }
}

fn push(out: &mut Vec<Located>, location: &Location, name: &str, changes: Vec<Change>) {
    out.extend(changes.into_iter().map(|change| Located {
        location: location.clone(),
        name: name.to_owned(),
        change,
    }));
}
