//! Reading Kubernetes manifests as `kubectl get pv -o yaml` (or `-o json`)
//! writes them: one object or a `List`/`PersistentVolumeList` of `items`, in
//! YAML (possibly several `---` documents) or JSON. Objects are kept as
//! generic JSON values; [`super::plan::examine`] decides what each one is, so
//! that one odd object gets its own message instead of failing the file.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

/// One object of a manifest file.
#[derive(Debug, Clone, PartialEq)]
pub struct ManifestObject {
    /// Where it came from, for messages: `file`, `file: document 2`,
    /// `file: items[3]`.
    pub source: String,
    /// The object.
    pub value: Value,
}

/// A manifest file that cannot be read at all.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not JSON.
    #[error("{source_name} is not valid JSON: {error}")]
    Json {
        /// The file.
        source_name: String,
        /// The parse error, with line and column.
        error: serde_json::Error,
    },
    /// The file is not YAML.
    #[error("{source_name} is not valid YAML: {error}")]
    Yaml {
        /// The file.
        source_name: String,
        /// The parse error, with line and column.
        error: yaml_serde::Error,
    },
}

/// Reads and splits a manifest file.
pub fn read_file(path: &Path) -> Result<Vec<ManifestObject>, ManifestError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Io {
        path: name.clone(),
        source,
    })?;
    parse(&text, &name)
}

/// Splits manifest text into objects: JSON when it starts with `{` or `[`,
/// YAML otherwise; lists are expanded into their items.
pub fn parse(text: &str, source_name: &str) -> Result<Vec<ManifestObject>, ManifestError> {
    let trimmed = text.trim_start();
    let docs: Vec<Value> = if trimmed.starts_with('{') || trimmed.starts_with('[') {
        let mut out = Vec::new();
        for v in serde_json::Deserializer::from_str(text).into_iter::<Value>() {
            out.push(v.map_err(|error| ManifestError::Json {
                source_name: source_name.to_owned(),
                error,
            })?);
        }
        out
    } else {
        let mut out = Vec::new();
        for doc in yaml_serde::Deserializer::from_str(text) {
            out.push(
                Value::deserialize(doc).map_err(|error| ManifestError::Yaml {
                    source_name: source_name.to_owned(),
                    error,
                })?,
            );
        }
        out
    };
    let several = docs.iter().filter(|d| !d.is_null()).count() > 1;
    let mut objects = Vec::new();
    for (i, doc) in docs.into_iter().enumerate() {
        let here = if several {
            format!("{source_name}: document {}", i + 1)
        } else {
            source_name.to_owned()
        };
        match doc {
            Value::Null => {}
            Value::Array(items) => push_items(&mut objects, &here, items),
            Value::Object(ref map) if is_list(map) => {
                if let Some(Value::Array(items)) = map.get("items") {
                    push_items(&mut objects, &here, items.clone());
                }
            }
            value => objects.push(ManifestObject {
                source: here,
                value,
            }),
        }
    }
    Ok(objects)
}

fn is_list(map: &serde_json::Map<String, Value>) -> bool {
    let kind = map.get("kind").and_then(Value::as_str).unwrap_or("");
    (kind == "List" || kind.ends_with("List")) && matches!(map.get("items"), Some(Value::Array(_)))
}

fn push_items(objects: &mut Vec<ManifestObject>, here: &str, items: Vec<Value>) {
    for (j, value) in items.into_iter().enumerate() {
        objects.push(ManifestObject {
            source: format!("{here}: items[{j}]"),
            value,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_list_is_expanded() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- kind: PersistentVolume\n  metadata: {name: a}\n- kind: PersistentVolume\n  metadata: {name: b}\nmetadata:\n  resourceVersion: \"\"\n";
        let objs = parse(text, "pvs.yaml").unwrap();
        assert_eq!(objs.len(), 2);
        assert_eq!(objs[1].source, "pvs.yaml: items[1]");
        assert_eq!(objs[1].value["metadata"]["name"], "b");
    }

    #[test]
    fn multi_document_yaml_and_empty_documents() {
        let text = "---\nkind: PersistentVolume\nmetadata: {name: a}\n---\n---\nkind: ConfigMap\n";
        let objs = parse(text, "f").unwrap();
        assert_eq!(objs.len(), 2);
        assert_eq!(objs[0].source, "f: document 1");
        assert_eq!(objs[1].source, "f: document 3");
        assert_eq!(objs[1].value["kind"], "ConfigMap");
    }

    #[test]
    fn json_single_and_list() {
        let one = r#"{"kind":"PersistentVolume","metadata":{"name":"a"}}"#;
        assert_eq!(parse(one, "f").unwrap()[0].source, "f");
        let list = r#"{"kind":"PersistentVolumeList","apiVersion":"v1","items":[{"kind":"PersistentVolume"}]}"#;
        assert_eq!(parse(list, "f").unwrap()[0].source, "f: items[0]");
    }

    #[test]
    fn broken_files_name_the_file() {
        let e = parse("{\"kind\": ", "bad.json").unwrap_err();
        assert!(
            e.to_string().starts_with("bad.json is not valid JSON"),
            "{e}"
        );
        let e = parse("kind: [unclosed\n", "bad.yaml").unwrap_err();
        assert!(
            e.to_string().starts_with("bad.yaml is not valid YAML"),
            "{e}"
        );
    }
}
