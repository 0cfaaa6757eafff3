//! The JSON documents of the Kubernetes API the stand-in answers with:
//! `Status` errors, discovery, server-side tables; and the small encodings
//! it needs (timestamps, UIDs, generated names, continue tokens).

use serde_json::{Value, json};

use super::store::Kind;
use crate::{
    random::random_bytes,
    time::{format_rfc3339, parse_rfc3339, unix_now},
};

/// An error answered as the real server does: a `Status` object with the
/// HTTP code, a `reason` and a message.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub(crate) code: u16,
    pub(crate) reason: &'static str,
    pub(crate) message: String,
    pub(crate) details: Option<Value>,
}

impl ApiError {
    pub(crate) fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    /// `404` for a path the server does not serve.
    pub(crate) fn no_route() -> Self {
        Self {
            details: Some(json!({})),
            ..Self::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            )
        }
    }

    /// `404` for an object that does not exist.
    pub(crate) fn not_found(kind: Kind, name: &str) -> Self {
        Self {
            details: Some(object_details(kind, name)),
            ..Self::new(
                404,
                "NotFound",
                format!("{} \"{name}\" not found", kind.resource_name()),
            )
        }
    }

    pub(crate) fn already_exists(kind: Kind, name: &str) -> Self {
        Self {
            details: Some(object_details(kind, name)),
            ..Self::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", kind.resource_name()),
            )
        }
    }

    pub(crate) fn method_not_allowed() -> Self {
        Self {
            details: Some(json!({})),
            ..Self::new(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            )
        }
    }

    /// The real watch cache's answer to a resourceVersion older than its
    /// history.
    pub(crate) fn too_old(requested: u64, oldest: u64) -> Self {
        Self::new(
            410,
            "Expired",
            format!("too old resource version: {requested} ({oldest})"),
        )
    }

    /// A list `continue` token from before the history's start.
    pub(crate) fn continue_expired() -> Self {
        Self::new(
            410,
            "Expired",
            "The provided continue parameter is too old to display a consistent list result. \
             You can start a new list without the continue parameter.",
        )
    }

    pub(crate) fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

fn object_details(kind: Kind, name: &str) -> Value {
    let mut details = json!({ "name": name, "kind": kind.plural() });
    if !kind.group().is_empty() {
        details["group"] = json!(kind.group());
    }
    details
}

/// `GET /version`.
pub(crate) fn version() -> Value {
    json!({
        "major": "1",
        "minor": "32",
        "gitVersion": "v1.32.0-lattice-standin",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.23.4",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// `GET /api`.
pub(crate) fn core_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [
            { "clientCIDR": "0.0.0.0/0", "serverAddress": server_address }
        ],
    })
}

fn events_group() -> Value {
    json!({
        "name": "events.k8s.io",
        "versions": [{ "groupVersion": "events.k8s.io/v1", "version": "v1" }],
        "preferredVersion": { "groupVersion": "events.k8s.io/v1", "version": "v1" },
    })
}

fn apps_group() -> Value {
    json!({
        "name": "apps",
        "versions": [{ "groupVersion": "apps/v1", "version": "v1" }],
        "preferredVersion": { "groupVersion": "apps/v1", "version": "v1" },
    })
}

/// `GET /apis`.
pub(crate) fn group_list() -> Value {
    json!({ "kind": "APIGroupList", "apiVersion": "v1", "groups": [apps_group(), events_group()] })
}

/// `GET /apis/apps`.
pub(crate) fn apps_group_doc() -> Value {
    let mut group = apps_group();
    group["kind"] = json!("APIGroup");
    group["apiVersion"] = json!("v1");
    group
}

/// `GET /apis/apps/v1`.
pub(crate) fn apps_resources() -> Value {
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": "apps/v1",
        "resources": [resource(Kind::DaemonSet, READ, &["ds"])],
    })
}

/// `GET /apis/events.k8s.io`.
pub(crate) fn events_group_doc() -> Value {
    let mut group = events_group();
    group["kind"] = json!("APIGroup");
    group["apiVersion"] = json!("v1");
    group
}

fn resource(kind: Kind, verbs: &[&str], short: &[&str]) -> Value {
    let mut r = json!({
        "name": kind.plural(),
        "singularName": kind.kind().to_lowercase(),
        "namespaced": kind.namespaced(),
        "kind": kind.kind(),
        "verbs": verbs,
    });
    if !short.is_empty() {
        r["shortNames"] = json!(short);
    }
    r
}

const READ: &[&str] = &["get", "list", "watch"];
const EVENT_VERBS: &[&str] = &["create", "get", "list", "patch", "watch"];

/// `GET /api/v1`.
pub(crate) fn core_resources() -> Value {
    let mut pods = resource(Kind::Pod, READ, &["po"]);
    pods["categories"] = json!(["all"]);
    json!({
        "kind": "APIResourceList",
        "groupVersion": "v1",
        "resources": [
            pods,
            resource(Kind::Namespace, READ, &["ns"]),
            resource(Kind::Event, EVENT_VERBS, &["ev"]),
        ],
    })
}

/// `GET /apis/events.k8s.io/v1`.
pub(crate) fn events_resources() -> Value {
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": "events.k8s.io/v1",
        "resources": [resource(Kind::EventV1, EVENT_VERBS, &["ev"])],
    })
}

/// `GET /openapi/v3`: the group-versions with a document.
pub(crate) fn openapi_v3_root() -> Value {
    let entry = |gv: &str| json!({ "serverRelativeURL": format!("/openapi/v3/{gv}?hash=STANDIN") });
    json!({ "paths": {
        "api/v1": entry("api/v1"),
        "apis/apps/v1": entry("apis/apps/v1"),
        "apis/events.k8s.io/v1": entry("apis/events.k8s.io/v1"),
    } })
}

/// `GET /openapi/v3/<group-version>`: just enough OpenAPI for kubectl to
/// see that the server validates fields itself (a `fieldValidation` query
/// parameter on each kind's operations), so `kubectl create` sends
/// `fieldValidation=Strict` instead of downloading schemas. No schemas.
pub(crate) fn openapi_v3(kinds: &[Kind]) -> Value {
    let mut paths = serde_json::Map::new();
    for kind in kinds {
        let prefix = match kind.group() {
            "" => "/api/v1".to_owned(),
            group => format!("/apis/{group}/v1"),
        };
        let collection = if kind.namespaced() {
            format!("{prefix}/namespaces/{{namespace}}/{}", kind.plural())
        } else {
            format!("{prefix}/{}", kind.plural())
        };
        let operation = json!({
            "x-kubernetes-group-version-kind": {
                "group": kind.group(), "version": "v1", "kind": kind.kind(),
            },
            "parameters": [{
                "name": "fieldValidation", "in": "query",
                "schema": { "type": "string", "uniqueItems": true },
            }],
            "responses": {},
        });
        paths.insert(collection.clone(), json!({ "post": operation }));
        paths.insert(
            format!("{collection}/{{name}}"),
            json!({ "patch": operation, "put": operation }),
        );
    }
    json!({
        "openapi": "3.0.0",
        "info": { "title": "Kubernetes", "version": "v1.32.0" },
        "paths": paths,
    })
}

/// How the client asked to see objects (`Accept: ...;as=...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Render {
    Full,
    /// `as=PartialObjectMetadata(List);g=meta.k8s.io;v=v1`.
    Metadata,
    /// `as=Table;g=meta.k8s.io;v=v1`, with `includeObject` rows.
    Table(IncludeObject),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IncludeObject {
    None,
    Metadata,
    Object,
}

impl Render {
    /// From the `Accept` header: the first media type offered that the
    /// stand-in serves (real clients list their preference first).
    pub(crate) fn from_accept(accept: &str, include: Option<&str>) -> Self {
        for media in accept.split(',') {
            let params: Vec<&str> = media.split(';').map(str::trim).collect();
            let has = |p: &str| params.contains(&p);
            if params[0] != "application/json" && params[0] != "*/*" {
                continue;
            }
            if has("as=Table") {
                if !has("v=v1") {
                    continue; // only the meta.k8s.io/v1 Table
                }
                return Render::Table(match include {
                    Some("None") => IncludeObject::None,
                    Some("Object") => IncludeObject::Object,
                    _ => IncludeObject::Metadata,
                });
            }
            if has("as=PartialObjectMetadata") || has("as=PartialObjectMetadataList") {
                return Render::Metadata;
            }
            if params.iter().all(|p| !p.starts_with("as=")) {
                return Render::Full;
            }
        }
        Render::Full
    }

    pub(crate) fn content_type(self, list: bool) -> &'static str {
        match (self, list) {
            (Render::Full, _) => "application/json",
            (Render::Metadata, false) => {
                "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
            }
            (Render::Metadata, true) => {
                "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
            }
            (Render::Table(_), _) => "application/json;as=Table;g=meta.k8s.io;v=v1",
        }
    }

    /// One object as this rendering shows it.
    pub(crate) fn object(self, kind: Kind, object: &Value) -> Value {
        match self {
            Render::Full => object.clone(),
            Render::Metadata => partial(object),
            Render::Table(include) => table(kind, &[object], include, None),
        }
    }

    /// A list of objects (the list `metadata` is given).
    pub(crate) fn list(self, kind: Kind, items: &[Value], metadata: Value) -> Value {
        match self {
            // List items carry no apiVersion/kind on the real server.
            Render::Full => json!({
                "kind": format!("{}List", kind.kind()),
                "apiVersion": kind.api_version(),
                "metadata": metadata,
                "items": items.iter().map(strip_type).collect::<Vec<_>>(),
            }),
            Render::Metadata => json!({
                "kind": "PartialObjectMetadataList",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": metadata,
                "items": items.iter().map(partial).collect::<Vec<_>>(),
            }),
            Render::Table(include) => {
                let refs: Vec<&Value> = items.iter().collect();
                table(kind, &refs, include, Some(metadata))
            }
        }
    }
}

fn strip_type(object: &Value) -> Value {
    let mut item = object.clone();
    if let Some(map) = item.as_object_mut() {
        map.remove("apiVersion");
        map.remove("kind");
    }
    item
}

fn partial(object: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": object["metadata"],
    })
}

fn column(name: &str, ty: &str, format: &str, priority: u8, description: &str) -> Value {
    json!({ "name": name, "type": ty, "format": format, "description": description,
            "priority": priority })
}

/// A server-side `Table` (what `kubectl get` prints without `-o`): the
/// real server's columns for pods and namespaces, `Name` and `Created At`
/// (its default) for events.
fn table(kind: Kind, objects: &[&Value], include: IncludeObject, metadata: Option<Value>) -> Value {
    let columns = match kind {
        Kind::Pod => vec![
            column("Name", "string", "name", 0, "Name of the pod"),
            column(
                "Ready",
                "string",
                "",
                0,
                "The aggregate readiness state of this pod",
            ),
            column(
                "Status",
                "string",
                "",
                0,
                "The aggregate status of the containers",
            ),
            column(
                "Restarts",
                "integer",
                "",
                0,
                "The number of times the containers restarted",
            ),
            column("Age", "string", "", 0, "Time since creation"),
            column("IP", "string", "", 1, "The pod's IP address"),
            column("Node", "string", "", 1, "The node the pod is assigned to"),
        ],
        Kind::Namespace => vec![
            column("Name", "string", "name", 0, "Name of the namespace"),
            column("Status", "string", "", 0, "The status of the namespace"),
            column("Age", "string", "", 0, "Time since creation"),
        ],
        Kind::Event | Kind::EventV1 => vec![
            column("Name", "string", "name", 0, "Name of the object"),
            column("Created At", "date", "", 0, "Time of creation"),
        ],
        Kind::DaemonSet => vec![
            column("Name", "string", "name", 0, "Name of the daemon set"),
            column("Desired", "integer", "", 0, "Pods that should run"),
            column("Current", "integer", "", 0, "Pods running"),
            column("Ready", "integer", "", 0, "Pods ready"),
            column("Age", "string", "", 0, "Time since creation"),
        ],
    };
    let rows: Vec<Value> = objects
        .iter()
        .map(|object| {
            let name = object["metadata"]["name"].clone();
            let created = object["metadata"]["creationTimestamp"].clone();
            let age = age(created.as_str());
            let cells = match kind {
                Kind::Pod => {
                    let statuses = object["status"]["containerStatuses"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default();
                    let total = object["spec"]["containers"]
                        .as_array()
                        .map_or(statuses.len(), Vec::len);
                    let ready = statuses.iter().filter(|s| s["ready"] == true).count();
                    let restarts: u64 = statuses
                        .iter()
                        .filter_map(|s| s["restartCount"].as_u64())
                        .sum();
                    let status = object["status"]["reason"]
                        .as_str()
                        .or(object["status"]["phase"].as_str())
                        .unwrap_or("Unknown");
                    let or_none = |v: &Value| v.as_str().unwrap_or("<none>").to_owned();
                    json!([
                        name,
                        format!("{ready}/{total}"),
                        status,
                        restarts,
                        age,
                        or_none(&object["status"]["podIP"]),
                        or_none(&object["spec"]["nodeName"]),
                    ])
                }
                Kind::Namespace => json!([
                    name,
                    object["status"]["phase"].as_str().unwrap_or("Active"),
                    age
                ]),
                Kind::Event | Kind::EventV1 => json!([name, created]),
                Kind::DaemonSet => {
                    let count = |f: &str| object["status"][f].as_u64().unwrap_or(0);
                    json!([
                        name,
                        count("desiredNumberScheduled"),
                        count("currentNumberScheduled"),
                        count("numberReady"),
                        age
                    ])
                }
            };
            let mut row = json!({ "cells": cells });
            match include {
                IncludeObject::None => {}
                IncludeObject::Metadata => row["object"] = partial(object),
                IncludeObject::Object => row["object"] = (*object).clone(),
            }
            row
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata.unwrap_or_else(|| json!({})),
        "columnDefinitions": columns,
        "rows": rows,
    })
}

/// Age as `kubectl` shows it (`42s`, `5m3s`, `3h`, `2d`).
fn age(created: Option<&str>) -> String {
    let Some(secs) = created.and_then(parse_rfc3339) else {
        return "<unknown>".to_owned();
    };
    let d = unix_now().saturating_sub(secs);
    match d {
        0..120 => format!("{d}s"),
        120..600 if d % 60 != 0 => format!("{}m{}s", d / 60, d % 60),
        120..10800 => format!("{}m", d / 60),
        10800..172800 => format!("{}h", d / 3600),
        _ => format!("{}d", d / 86400),
    }
}

/// Now as RFC 3339 in UTC with seconds, the real `metav1.Time` format.
pub(crate) fn now_rfc3339() -> String {
    format_rfc3339(unix_now())
}

/// A random (version 4) UUID, as the real server assigns `metadata.uid`.
pub(crate) fn uid() -> String {
    crate::random::random_uuid()
}

/// The 5 characters the real server appends to a `generateName`.
pub(crate) fn name_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    random_bytes::<5>()
        .iter()
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect()
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_encode(data: &[u8]) -> String {
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes().filter(|c| *c != b'=') {
        let v = B64.iter().position(|x| *x == c)? as u32;
        acc = acc << 6 | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// A list `continue` token, shaped as the real server's (base64 of a JSON
/// object with the list's resourceVersion and the key to start after).
pub(crate) fn continue_token(rv: u64, last_key: &str) -> String {
    let token = json!({ "v": "meta.k8s.io/v1", "rv": rv, "start": format!("{last_key}\u{0}") });
    base64_encode(token.to_string().as_bytes())
}

/// The resourceVersion and start key of a `continue` token.
pub(crate) fn parse_continue(token: &str) -> Option<(u64, String)> {
    let json: Value = serde_json::from_slice(&base64_decode(token)?).ok()?;
    if json["v"] != "meta.k8s.io/v1" {
        return None;
    }
    Some((json["rv"].as_u64()?, json["start"].as_str()?.to_owned()))
}

/// RFC 7386 JSON merge patch (also used for strategic merge and apply
/// patches, which agree with it on maps and scalars).
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    let map = target.as_object_mut().expect("just made an object");
    for (key, value) in patch {
        if value.is_null() {
            map.remove(key);
        } else {
            merge_patch(map.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continue_token_round_trip() {
        let token = continue_token(42, "ns/pod-1");
        assert_eq!(
            parse_continue(&token),
            Some((42, "ns/pod-1\u{0}".to_owned()))
        );
        assert_eq!(parse_continue("garbage!"), None);
        assert_eq!(base64_encode(b"ab"), "YWI=");
        assert_eq!(base64_decode("YWI=").unwrap(), b"ab");
    }

    #[test]
    fn accept_negotiation() {
        let kubectl = "application/json;as=Table;v=v1;g=meta.k8s.io,\
                       application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";
        assert_eq!(
            Render::from_accept(kubectl, None),
            Render::Table(IncludeObject::Metadata)
        );
        assert_eq!(Render::from_accept("application/json", None), Render::Full);
        assert_eq!(
            Render::from_accept(
                "application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json",
                None
            ),
            Render::Full
        );
        assert_eq!(
            Render::from_accept(
                "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1",
                None
            ),
            Render::Metadata
        );
    }

    #[test]
    fn merge_patch_rfc7386() {
        let mut doc = json!({ "a": 1, "b": { "c": 2, "d": 3 } });
        merge_patch(&mut doc, &json!({ "a": null, "b": { "c": 4 }, "e": [1] }));
        assert_eq!(doc, json!({ "b": { "c": 4, "d": 3 }, "e": [1] }));
    }
}
