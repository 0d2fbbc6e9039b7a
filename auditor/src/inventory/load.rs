//! Reads Kubernetes objects from YAML and JSON files and directories (recursive, multi-document,
//! `List` kinds), keeping where each object came from so every error names a file and a line.
//! The only module of the model that does I/O; unknown kinds are skipped, malformed ones are not.

use std::fmt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::api::networking::v1 as networking;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::policy::cilium::CiliumPolicy;

/// Where an object starts: a file and a 1-based line (of its document, or of the object inside
/// a JSON/`List` document when the line is known).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub file: PathBuf,
    pub line: usize,
    /// For an item of a `List`: its index.
    pub item: Option<usize>,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)?;
        if let Some(i) = self.item {
            write!(f, " (items[{i}])")?;
        }
        Ok(())
    }
}

/// An object of a kind the model uses.
#[derive(Clone, Debug)]
pub enum Object {
    Namespace(Box<core::Namespace>),
    Node(Box<core::Node>),
    Pod(Box<core::Pod>),
    Service(Box<core::Service>),
    EndpointSlice(Box<discovery::EndpointSlice>),
    Endpoints(Box<core::Endpoints>),
    NetworkPolicy(Box<networking::NetworkPolicy>),
    CiliumNetworkPolicy(Box<CiliumPolicy>),
    CiliumClusterwideNetworkPolicy(Box<CiliumPolicy>),
}

impl Object {
    pub fn is_policy(&self) -> bool {
        matches!(
            self,
            Self::NetworkPolicy(_)
                | Self::CiliumNetworkPolicy(_)
                | Self::CiliumClusterwideNetworkPolicy(_)
        )
    }
}

#[derive(Clone, Debug)]
pub struct Located {
    pub source: Source,
    /// `Kind namespace/name`, for messages.
    pub name: String,
    pub object: Object,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a YAML or JSON file (.yaml, .yml, .json)", path.display())]
    NotAManifest { path: PathBuf },
    #[error("{}:{line}: {message}", file.display())]
    Syntax {
        file: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{source_at}: {object}: {message}")]
    Object {
        source_at: Source,
        object: String,
        message: String,
    },
}

const KINDS: &[(&str, &str)] = &[
    ("Namespace", "v1"),
    ("Node", "v1"),
    ("Pod", "v1"),
    ("Service", "v1"),
    ("Endpoints", "v1"),
    ("EndpointSlice", "discovery.k8s.io/v1"),
    ("NetworkPolicy", "networking.k8s.io/v1"),
    ("CiliumNetworkPolicy", "cilium.io/v2"),
    ("CiliumClusterwideNetworkPolicy", "cilium.io/v2"),
];

/// Loads every manifest under the given files and directories, in a stable order.
pub fn load_paths(paths: &[PathBuf]) -> Result<Vec<Located>, LoadError> {
    let mut out = Vec::new();
    for path in paths {
        let meta = std::fs::metadata(path).map_err(|source| LoadError::Read {
            path: path.clone(),
            source,
        })?;
        if meta.is_dir() {
            let mut files = Vec::new();
            collect_dir(path, &mut files)?;
            files.sort();
            for file in files {
                load_file(&file, &mut out)?;
            }
        } else {
            load_file(path, &mut out)?;
        }
    }
    Ok(out)
}

fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

fn collect_dir(dir: &Path, files: &mut Vec<PathBuf>) -> Result<(), LoadError> {
    let read_err = |source| LoadError::Read {
        path: dir.to_path_buf(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        let path = entry.path();
        // Hidden entries are editor and VCS state (`.git`), not manifests.
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let kind = entry.file_type().map_err(read_err)?;
        if kind.is_dir() {
            collect_dir(&path, files)?;
        } else if is_manifest(&path) {
            files.push(path);
        }
    }
    Ok(())
}

/// Loads one file; a file named explicitly must still be YAML or JSON.
pub fn load_file(path: &Path, out: &mut Vec<Located>) -> Result<(), LoadError> {
    if !is_manifest(path) {
        return Err(LoadError::NotAManifest {
            path: path.to_path_buf(),
        });
    }
    let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let text = String::from_utf8(bytes).map_err(|e| LoadError::Syntax {
        file: path.to_path_buf(),
        line: 1 + e.as_bytes()[..e.utf8_error().valid_up_to()]
            .iter()
            .filter(|b| **b == b'\n')
            .count(),
        message: "not UTF-8 text".to_owned(),
    })?;
    load_text(path, &text, out)
}

/// Parses manifests from text; `path` decides JSON vs YAML and names the source in errors.
pub fn load_text(path: &Path, text: &str, out: &mut Vec<Located>) -> Result<(), LoadError> {
    let json = path.extension().and_then(|e| e.to_str()) == Some("json");
    if json {
        parse_document(path, text, 1, Format::Json, out)
    } else {
        for (start, doc) in split_documents(text) {
            parse_document(path, doc, start, Format::Yaml, out)?;
        }
        Ok(())
    }
}

/// Splits a YAML stream at its document markers, giving each document with its first line.
/// YAML forbids `---` and `...` at the start of a line inside content, so this is exact.
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

/// A serde error message without the position the YAML crate appends (we print our own).
fn yaml_message(e: &serde_yaml_ng::Error) -> String {
    let text = e.to_string();
    match text.find(" at line ") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

fn parse_as<T: DeserializeOwned>(text: &str, format: Format) -> Result<T, (Option<usize>, String)> {
    match format {
        // The YAML crate's messages already name the field path.
        Format::Yaml => serde_yaml_ng::from_str(text)
            .map_err(|e| (e.location().map(|l| l.line()), yaml_message(&e))),
        Format::Json => {
            let mut de = serde_json::Deserializer::from_str(text);
            let parsed = serde_path_to_error::deserialize(&mut de).map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner();
                let line = inner.line();
                let msg = strip_json_position(&inner.to_string());
                (Some(line), with_path(&path, &msg))
            })?;
            de.end()
                .map_err(|e| (Some(e.line()), strip_json_position(&e.to_string())))?;
            Ok(parsed)
        }
    }
}

fn strip_json_position(text: &str) -> String {
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

fn parse_document(
    path: &Path,
    text: &str,
    start_line: usize,
    format: Format,
    out: &mut Vec<Located>,
) -> Result<(), LoadError> {
    let at = |line: Option<usize>| start_line + line.unwrap_or(1).saturating_sub(1);
    let header: Header = parse_as(text, format).map_err(|(line, message)| LoadError::Syntax {
        file: path.to_path_buf(),
        line: at(line),
        message: if message.contains("invalid type") {
            format!("not a Kubernetes object: {message}")
        } else {
            message
        },
    })?;
    let Some(kind) = header.kind.as_deref() else {
        return Err(LoadError::Syntax {
            file: path.to_path_buf(),
            line: start_line,
            message: "not a Kubernetes object: no `kind`".to_owned(),
        });
    };
    let source = Source {
        file: path.to_path_buf(),
        line: start_line,
        item: None,
    };
    if kind == "List" || kind.ends_with("List") && header.api_version.is_some() {
        let list: ListDoc =
            parse_as(text, format).map_err(|(line, message)| LoadError::Syntax {
                file: path.to_path_buf(),
                line: at(line),
                message,
            })?;
        for (i, item) in list.items.into_iter().enumerate() {
            let item_header: Header =
                serde_json::from_value(item.clone()).map_err(|e| LoadError::Object {
                    source_at: Source {
                        item: Some(i),
                        ..source.clone()
                    },
                    object: "object".to_owned(),
                    message: e.to_string(),
                })?;
            let source = Source {
                item: Some(i),
                ..source.clone()
            };
            let name = display_name(&item_header);
            let Some(kind) = item_header.kind.as_deref().or_else(|| {
                // `kind: PodList` items may omit their kind.
                header.kind.as_deref().and_then(|k| k.strip_suffix("List"))
            }) else {
                continue;
            };
            if let Some(object) = typed_from_value(kind, item, &source, &name)? {
                out.push(Located {
                    source,
                    name,
                    object,
                });
            }
        }
        return Ok(());
    }
    if !known(kind, header.api_version.as_deref()) {
        return Ok(());
    }
    let name = display_name(&header);
    let object =
        typed_from_text(kind, text, format).map_err(|(line, message)| LoadError::Object {
            source_at: Source {
                line: at(line),
                ..source.clone()
            },
            object: name.clone(),
            message,
        })?;
    out.push(Located {
        source,
        name,
        object,
    });
    Ok(())
}

/// Only the API groups we model: a `Service` of some CRD group is not a core Service.
fn known(kind: &str, api_version: Option<&str>) -> bool {
    KINDS
        .iter()
        .any(|(k, v)| *k == kind && api_version.is_none_or(|a| a == *v))
}

fn typed_from_text(
    kind: &str,
    text: &str,
    format: Format,
) -> Result<Object, (Option<usize>, String)> {
    Ok(match kind {
        "Namespace" => Object::Namespace(Box::new(parse_as(text, format)?)),
        "Node" => Object::Node(Box::new(parse_as(text, format)?)),
        "Pod" => Object::Pod(Box::new(parse_as(text, format)?)),
        "Service" => Object::Service(Box::new(parse_as(text, format)?)),
        "Endpoints" => Object::Endpoints(Box::new(parse_as(text, format)?)),
        "EndpointSlice" => Object::EndpointSlice(Box::new(parse_as(text, format)?)),
        "NetworkPolicy" => Object::NetworkPolicy(Box::new(parse_as(text, format)?)),
        "CiliumNetworkPolicy" => Object::CiliumNetworkPolicy(Box::new(parse_as(text, format)?)),
        "CiliumClusterwideNetworkPolicy" => {
            Object::CiliumClusterwideNetworkPolicy(Box::new(parse_as(text, format)?))
        }
        other => return Err((None, format!("unsupported kind {other}"))),
    })
}

fn from_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        with_path(&path, &e.into_inner().to_string())
    })
}

fn typed_from_value(
    kind: &str,
    mut value: serde_json::Value,
    source: &Source,
    name: &str,
) -> Result<Option<Object>, LoadError> {
    let api_version = value.get("apiVersion").and_then(|v| v.as_str());
    if !known(kind, api_version) {
        return Ok(None);
    }
    // Typed objects insist on their own apiVersion and kind, which list items may leave out.
    if let (Some(map), Some((_, version))) = (
        value.as_object_mut(),
        KINDS.iter().find(|(k, _)| *k == kind),
    ) {
        map.entry("kind").or_insert_with(|| kind.into());
        map.entry("apiVersion").or_insert_with(|| (*version).into());
    }
    let err = |message| LoadError::Object {
        source_at: source.clone(),
        object: name.to_owned(),
        message,
    };
    Ok(Some(match kind {
        "Namespace" => Object::Namespace(Box::new(from_value(value).map_err(err)?)),
        "Node" => Object::Node(Box::new(from_value(value).map_err(err)?)),
        "Pod" => Object::Pod(Box::new(from_value(value).map_err(err)?)),
        "Service" => Object::Service(Box::new(from_value(value).map_err(err)?)),
        "Endpoints" => Object::Endpoints(Box::new(from_value(value).map_err(err)?)),
        "EndpointSlice" => Object::EndpointSlice(Box::new(from_value(value).map_err(err)?)),
        "NetworkPolicy" => Object::NetworkPolicy(Box::new(from_value(value).map_err(err)?)),
        "CiliumNetworkPolicy" => {
            Object::CiliumNetworkPolicy(Box::new(from_value(value).map_err(err)?))
        }
        "CiliumClusterwideNetworkPolicy" => {
            Object::CiliumClusterwideNetworkPolicy(Box::new(from_value(value).map_err(err)?))
        }
        _ => return Ok(None),
    }))
}
